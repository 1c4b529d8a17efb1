"""Batched autoregressive sampling: jitted prefill + `lax.while_loop` decode over a KV cache.

Layout (left padding): prompts are left-padded to a bucketed length `P`, so every row writes
its next key/value at the same cache slot `P + t` (one `dynamic_update_slice`, in place); a row's
RoPE positions count only its real tokens (`prompt_len + t`), so padding changes nothing
numerically. The prompts are prefilled once (`[R, P]`) and the cache is repeated for the
`num_samples` rows of each prompt; only the last prompt position goes through the LM head.

Decode: a `lax.while_loop` per phase that exits as soon as every row has stopped. The cache is
head-major (`[B, kv, W, Dh]` per layer, or `[L, B, kv, W, Dh]` for a model with scanned layers;
see `models.transformer.KVCache`) and *grows* between up to four
phases (`decode_windows`: W = P + N/4, P + N/2, ..., P + N), so attention reads only slots that
can already be filled - on CPU a decode step is memory-bound and the K/V reads cost about as
much as the weight reads. The cache and loop state never leave one jitted function: XLA updates
the while-loop carry in place (the in-jit equivalent of donating it); the weights are passed in,
never donated. Sampling reads one uniform per row per step (`distribution.sample_tokens`),
drawn up front as a function of (seed, row, step) only. `kv_cache_dtype="int8"` stores the cache
as `models.transformer.QuantizedKV` leaves (int8 K/V plus a float32 scale per token and KV head,
same axes, so growing, repeating and sharding it are the same tree ops).

CPU specifics (measured on 2 cores; see benchmarks/generate.py): XLA:CPU runs one program's
matmuls on one core, so without a mesh the rows are split into shards decoded concurrently from
host threads (`_host_splits`); a tied LM head is used as a materialised `[D, V]` transpose,
cached while the embedding array is unchanged (`_decode_head`).

Compilation: one executable per (graphdef, prompt-row bucket, prompt-length bucket,
generation-length bucket, num_samples, static sampling switches, mesh). `max_new_tokens`,
temperature, top_p and the seed are runtime values, so a training run recompiles only when a
batch falls into a new bucket (`bucket_length`).

Sharding: with `mesh=`, prompt rows (and so the cache and every per-row array) are sharded over
`("data", "fsdp")`; KV heads over `"tensor"` when they divide it. The weights are used with
whatever sharding they already have (replicated, or tensor-sharded by `jaxrl_rm.parallel`), and
XLA's partitioner inserts the collectives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_rm.models.transformer import kv_cache_dtype_name
from jaxrl_rm.parallel.mesh import replicate
from jaxrl_rm.parallel.rules import batch_shards, kv_head_axis
from jaxrl_rm.sampling.distribution import sample_tokens, unfiltered_logprobs

FINISH_STOP = "stop"      # the row produced one of `stop_token_ids` (included in the completion)
FINISH_LENGTH = "length"  # the row reached `max_new_tokens`

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Completions of one `generate` call; row `i * num_samples + j` is sample j of prompt i.

    tokens:      `[N, max_new_tokens]` int32 completion ids, `pad_id` after the end.
    mask:        `[N, max_new_tokens]` bool, True on generated tokens (a stop token included).
    logprobs:    `[N, max_new_tokens]` float32 log-prob of each token under the distribution it
                 was sampled from (temperature, then top-k, then top-p, renormalised; greedy:
                 temperature 1, unfiltered); 0 where `mask` is False.
    lengths:     `[N]` int32, `mask.sum(-1)`.
    finish_reason: `[N]` numpy str array, `"stop"` or `"length"`.
    prompt_tokens: `[N, P]` int32 the prompts as fed, left-padded with `pad_id` (P = longest
                 prompt after truncation); `prompt_lengths` `[N]` int32.
    unfiltered_logprobs: `[N, max_new_tokens]` float32 `log_softmax(logits / temperature)` of
                 each token *before* top-k / top-p (greedy: temperature 1), 0 where `mask` is
                 False, when `return_unfiltered_logprobs=True`; else None. This is what a
                 teacher-forced trainer recomputes (`completion_logprobs`, `token_logprobs`), so
                 `exp(trainer - unfiltered)` measures the train/infer mismatch and nothing else;
                 without filters it equals `logprobs`.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish_reason: np.ndarray
    prompt_tokens: jax.Array
    prompt_lengths: jax.Array
    unfiltered_logprobs: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def completions(self) -> list[list[int]]:
        """Per row, the generated ids (stop token included) as Python lists."""
        toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
        return [toks[i, :lens[i]].tolist() for i in range(toks.shape[0])]

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """Prompt + completion, left-padded: (ids `[N, P + T]` int32, attention mask bool).

        Feeding these to `model(ids, attention_mask=mask)` (teacher forcing) gives logits whose
        positions `P-1 .. P+T-2` predict `tokens`; see `teacher_forced_logprobs`.
        """
        p = self.prompt_tokens.shape[1]
        ids = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
        pmask = jnp.arange(p)[None, :] >= (p - self.prompt_lengths)[:, None]
        return ids, jnp.concatenate([pmask, self.mask], axis=1)


# --- buckets ------------------------------------------------------------------------------------
def bucket_length(n: int, *, minimum: int = 16) -> int:
    """Shape bucket for a length: powers of two up to 1024, then multiples of 1024."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 1024) * 1024


def bucket_rows(n: int, multiple: int = 1) -> int:
    """Row bucket: 1, 2, 4, 8, then multiples of 8; rounded up to a multiple of `multiple`."""
    n = max(int(n), 1)
    b = 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return -(-b // multiple) * multiple


def decode_windows(prompt_len: int, gen_len: int, *, max_phases: int = 4, min_phase: int = 32) -> tuple[int, ...]:
    """Cache sizes of the decode phases: the cache grows from `prompt_len + gen_len/phases` to
    `prompt_len + gen_len` in up to `max_phases` steps of at least `min_phase` slots (each phase
    is one compiled `while_loop`, so more phases trade compile time for less K/V traffic)."""
    phases = max(1, min(max_phases, gen_len // min_phase))
    step = -(-gen_len // phases)
    return tuple(prompt_len + min(gen_len, step * (i + 1)) for i in range(phases))


# --- prompts ------------------------------------------------------------------------------------
def _as_ragged(prompts, prompt_lengths, padding_side) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        ids = np.asarray(prompts)
        if prompt_lengths is None:
            return [row.astype(np.int64) for row in ids]
        lens = np.asarray(prompt_lengths).reshape(-1)
        if lens.shape[0] != ids.shape[0]:
            raise ValueError(f"prompt_lengths has {lens.shape[0]} entries for {ids.shape[0]} prompts")
        if (lens < 0).any() or (lens > ids.shape[1]).any():
            raise ValueError(f"prompt_lengths must be in [0, {ids.shape[1]}], got {lens.tolist()}")
        if padding_side == "left":
            return [ids[i, ids.shape[1] - n:] for i, n in enumerate(lens)]
        if padding_side == "right":
            return [ids[i, :n] for i, n in enumerate(lens)]
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is only used with a padded [B, L] array of prompts")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not hasattr(prompts, "__iter__"):
        raise TypeError("prompts must be a list of token-id lists or a padded [B, L] array; "
                        "for text use jaxrl_rm.sampling.generate_text")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise TypeError(f"prompts[{i}] is a string; token ids are expected "
                            "(use jaxrl_rm.sampling.generate_text for text)")
        out.append(np.asarray(p, dtype=np.int64).reshape(-1))
    return out


def _prepare_prompts(prompts, *, vocab_size, max_prompt_len, truncate, prompt_lengths, padding_side):
    rows = _as_ragged(prompts, prompt_lengths, padding_side)
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if r.min() < 0 or r.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): "
                             f"min {int(r.min())}, max {int(r.max())}")
    if max_prompt_len is not None:
        too_long = [(i, r.size) for i, r in enumerate(rows) if r.size > max_prompt_len]
        if too_long:
            if truncate == "left":
                rows = [r[-max_prompt_len:] for r in rows]
            elif truncate == "error":
                i, n = too_long[0]
                raise ValueError(
                    f"prompt {i} has {n} tokens > max_prompt_len={max_prompt_len} "
                    f"({len(too_long)} prompt(s) too long); raise max_prompt_len or pass "
                    f"truncate_prompt='left' to keep the last {max_prompt_len} tokens")
            else:
                raise ValueError(f"truncate_prompt must be 'error' or 'left', got {truncate!r}")
    return rows


# --- the jitted core ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static part of one compiled sampler (hashable: it keys the jit cache)."""

    rows: int            # prompt rows (bucketed)
    prompt_len: int      # P (bucketed)
    gen_len: int         # N (bucketed) - size of the output buffers
    num_samples: int
    top_k: int
    use_top_p: bool
    greedy: bool
    num_stop_slots: int  # size of the (runtime) stop-id array, padded with -1
    pad_id: int
    unfiltered: bool
    mesh: Any
    windows: tuple[int, ...] = ()  # cache sizes of the decode phases (last = prompt_len + gen_len)
    kv_cache_dtype: str | None = None  # None: the compute dtype; "int8": `QuantizedKV` leaves


def _constrain_cache(cache, spec: _Spec, num_kv_heads: int):
    """Pin a KV cache's sharding: rows over (data, fsdp), KV heads over tensor when they divide
    it. Every cache leaf is `[..., B, kv, S, Dh]` (a leading layer dim in the scanned layout,
    replicated), so this works for either `KVCache` layout (and for int8 `QuantizedKV` leaves, whose
    values and scales share those axes)."""
    if spec.mesh is None:
        return cache
    heads = kv_head_axis(spec.mesh, num_kv_heads)
    return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(
        c, NamedSharding(spec.mesh, P(*([None] * (c.ndim - 4)), BATCH_AXES, heads, None, None))), cache)


def _constrain(tree, sharding):
    return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)


class _StaticGraph:
    """Hashable handle on an NNX GraphDef for `jax.jit`'s static-argument cache.

    GraphDefs compare by value but may not hash (a `ModelConfig` with a `rope_scaling` dict), so
    hash the config's repr and the graph size, and compare the GraphDefs themselves.
    """

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef, config):
        self.graphdef = graphdef
        self._hash = hash((repr(config), len(repr(type(graphdef))), getattr(graphdef, "num_leaves", 0)))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _StaticGraph) and self._hash == other._hash and self.graphdef == other.graphdef


TRACE_COUNT = {"n": 0}  # incremented on every trace of the sampler core (tests check caching)


def _generate_core(graphdef, state, head, prompt_ids, prompt_lens, live, uniforms, temperature, top_p,
                   max_new_tokens, stops, *, spec: _Spec):
    """head: `[D, V]` LM head or None (= `model.lm_head_weight()`); prompt_ids `[R, P]` int32
    left-padded; prompt_lens `[R]`; live `[R]` bool (False = filler row of the bucket); uniforms
    `[N, R*n]` f32 in [0, 1): the draw of each row at each step; temperature, top_p: f32 scalars;
    max_new_tokens: i32 scalar; stops: `[num_stop_slots]` int32 stop ids (-1 = unused slot).

    Returns tokens `[R*n, N]` int32, logp `[R*n, N]` f32, lengths `[R*n]` i32,
    stopped `[R*n]` bool, and unfiltered logp `[R*n, N]` f32 (or None).
    """
    TRACE_COUNT["n"] += 1
    model = nnx.merge(graphdef.graphdef, state)
    r, p, n_gen, ns = spec.rows, spec.prompt_len, spec.gen_len, spec.num_samples
    b = r * ns
    s = p + n_gen
    cfg = model.config

    def sample(logits, t):
        """logits `[B, V]` f32 at step t -> (tok, logp, unfiltered logp or None)."""
        u = jax.lax.dynamic_index_in_dim(uniforms, t, axis=0, keepdims=False)
        tok, logp = sample_tokens(logits, u, temperature=temperature, top_k=spec.top_k, top_p=top_p,
                                  use_top_p=spec.use_top_p, greedy=spec.greedy)
        base = None
        if spec.unfiltered:  # without filters the sampled distribution is the unfiltered one
            filtered = not spec.greedy and (spec.top_k > 0 or spec.use_top_p)
            base = unfiltered_logprobs(logits, tok, temperature=temperature) if filtered else logp
        return tok, logp, base

    if head is None:
        head = (model.lm_head_weight(),)

    def lm_logits(hidden):
        """hidden `[B, D]` -> logits `[B, V]` f32 (same math as `Transformer.logits`)."""
        h = hidden.astype(model.dtype)
        parts = [jnp.dot(h, w.astype(model.dtype), preferred_element_type=jnp.float32) for w in head]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    # Prefill the prompts once (a cache of exactly P slots), then give each sample its copy.
    slots_p = jnp.arange(p)[None, :]
    pad_start = (p - prompt_lens)[:, None]  # [R, 1] first real slot of each row
    positions = jnp.maximum(slots_p - pad_start, 0).astype(jnp.int32)
    pcache = _constrain_cache(model.init_cache(r, p, spec.kv_cache_dtype), spec, cfg.num_key_value_heads)
    hidden, pcache = model.decode(prompt_ids, pcache, positions=positions, cache_index=0,
                                  kv_mask=slots_p >= pad_start)
    logits = lm_logits(hidden[:, -1])  # [R, V] f32: only the last position needs the head
    if ns > 1:
        logits = jnp.repeat(logits, ns, axis=0)
        pcache = jax.tree.map(lambda c: jnp.repeat(c, ns, axis=-4), pcache)  # rows: axis -4
        prompt_lens = jnp.repeat(prompt_lens, ns)
        live = jnp.repeat(live, ns)
    kv_mask = jnp.arange(s)[None, :] >= (p - prompt_lens)[:, None]  # [B, S], fixed for the run

    def record(t, tok, logp, base, finished, lengths, bufs):
        """Write step t's token for rows still running; update finished / lengths."""
        active = ~finished
        tok = jnp.where(active, tok, spec.pad_id)
        cols = [tok, jnp.where(active, logp, 0.0)]
        if spec.unfiltered:
            cols.append(jnp.where(active, base, 0.0))
        bufs = tuple(jax.lax.dynamic_update_slice(buf, col[None, :].astype(buf.dtype), (t, 0))
                     for buf, col in zip(bufs, cols))
        finished = finished | (active & jnp.isin(tok, stops))
        return tok, finished, lengths + active.astype(jnp.int32), bufs

    # Output buffers are [N, B] (time-major) so each step writes one contiguous row.
    bufs = (jnp.full((n_gen, b), spec.pad_id, jnp.int32), jnp.zeros((n_gen, b), jnp.float32))
    if spec.unfiltered:
        bufs = bufs + (jnp.zeros((n_gen, b), jnp.float32),)
    bufs = tuple(_constrain(x, None if spec.mesh is None else NamedSharding(spec.mesh, P(None, BATCH_AXES)))
                 for x in bufs)
    stopped = ~live  # filler rows start finished so they never hold the loop open
    tok, logp, base = sample(logits, 0)
    tok, stopped, lengths, bufs = record(0, tok, logp, base, stopped, jnp.zeros((b,), jnp.int32), bufs)

    def grow(cache, size):
        """Pad the slot axis (-2) of every cache leaf to `size` (either `KVCache` layout)."""
        def pad(c):
            return jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, size - c.shape[-2]), (0, 0)])
        return _constrain_cache(jax.tree.map(pad, cache), spec, cfg.num_key_value_heads)

    def phase(window):
        """Decode steps t = .., window - P over a cache of `window` slots (static)."""
        mask_w = kv_mask[:, :window]

        def cond(carry):
            t, _, _, finished, _, _ = carry
            return (t < max_new_tokens) & (t <= window - p) & ~jnp.all(finished)

        def body(carry):
            t, tok, cache, finished, lengths, bufs = carry
            pos = (prompt_lens + t - 1)[:, None].astype(jnp.int32)
            hidden, cache = model.decode(tok[:, None], cache, positions=pos, cache_index=p + t - 1,
                                         kv_mask=mask_w)
            logits = lm_logits(hidden[:, 0])
            new_tok, logp, base = sample(logits, t)
            new_tok, finished, lengths, bufs = record(t, new_tok, logp, base, finished, lengths, bufs)
            return t + 1, new_tok, cache, finished, lengths, bufs

        return cond, body

    # The cache grows between phases so that attention reads only slots that can be filled
    # (decode is memory-bound on CPU: K/V reads cost as much as the weight reads at S ~ 200).
    carry = (jnp.int32(1), tok, pcache, stopped, lengths, bufs)
    for window in spec.windows:
        t, tok, cache, stopped, lengths, bufs = carry
        cond, body = phase(window)
        carry = jax.lax.while_loop(cond, body, (t, tok, grow(cache, window), stopped, lengths, bufs))
    _, _, _, stopped, lengths, bufs = carry
    stopped = stopped & live
    out = [buf.T for buf in bufs]
    return out[0], out[1], lengths, stopped, (out[2] if spec.unfiltered else None)


_generate_jit = jax.jit(_generate_core, static_argnames=("graphdef", "spec"))


_HEAD_CACHE: dict = {}


def _decode_head(model):
    """The LM head `[D, V]` to pass to the sampler core, or None to take it inside the jit.

    A tied head is the transposed embedding. XLA:CPU's matmul reading `[V, D]` transposed is ~25%
    slower than reading `[D, V]`, and the decode step is dominated by that matmul at small D, so
    on CPU the transpose is materialised once and reused while the embedding array is the same
    object (it is recomputed after every weight update). Elsewhere (TPU/GPU) the matmul units take
    either layout, and nothing is cached.
    """
    tied = model.lm_head is None
    w = model.embed[...] if tied else model.lm_head.kernel[...]
    if any(d.platform != "cpu" for d in w.sharding.device_set):
        return None
    if not tied and _HEAD_SPLIT == 1:
        return None
    hit = _HEAD_CACHE.get("head")
    if hit is not None and hit[0] is w:
        return hit[1]
    _HEAD_CACHE.clear()  # drop the previous weights' copy before making a new one
    head = _split_head_jit(w, tied=tied, parts=_HEAD_SPLIT)
    _HEAD_CACHE["head"] = (w, head)
    return head


_HEAD_SPLIT = 2


@functools.partial(jax.jit, static_argnames=("tied", "parts"))
def _split_head_jit(w, *, tied, parts):
    head = w.T if tied else w
    v = head.shape[1]
    edges = [v * i // parts for i in range(parts + 1)]
    return tuple(head[:, a:b] for a, b in zip(edges[:-1], edges[1:]))


@functools.partial(jax.jit, static_argnames=("steps", "rows", "mesh"))
def _uniforms(key, *, steps, rows, mesh):
    """`[steps, rows]` float32 uniforms in [0, 1): the draw of row j at step t is a function of
    (key, j, t) only, so samples do not depend on the batch's buckets, shards or host splits."""
    def draw(t, j):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, j), t), (), jnp.float32)

    u = jax.vmap(lambda t: jax.vmap(lambda j: draw(t, j))(jnp.arange(rows)))(jnp.arange(steps))
    return u if mesh is None else _constrain(u, NamedSharding(mesh, P(None, BATCH_AXES)))


_MIN_ROWS_PER_SPLIT = 8
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0))),
                                                  thread_name_prefix="jaxrl_rm-sampler")


def _host_splits(model, rows: int, mesh) -> int:
    """How many row shards to decode concurrently (CPU only, no mesh).

    XLA:CPU executes one program's matmuls on a single core (YNNPACK fusions do not split across
    the intra-op pool here), so a batch decoded as one program leaves the other cores idle, while
    independent executions dispatched from different host threads run in parallel. Each shard
    re-reads the weights, so shards keep at least `_MIN_ROWS_PER_SPLIT` rows.
    """
    if mesh is not None:
        return 1
    w = model.embed[...]
    if any(d.platform != "cpu" for d in w.sharding.device_set) or len(w.sharding.device_set) > 1:
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, rows // _MIN_ROWS_PER_SPLIT))


def _stop_slots(n_stops: int) -> int:
    """Size of the runtime stop-id array (a power of two >= 4, so few shapes compile)."""
    return max(4, 1 << (max(n_stops, 1) - 1).bit_length())


def _make_spec(cfg, *, rows, prompt_len, gen_len, num_samples, top_k, top_p, greedy, num_stop_slots,
               pad_id, unfiltered, mesh, kv_cache_dtype=None) -> _Spec:
    """The static part of a sampler program (what one compilation covers)."""
    k = top_k if (not greedy and top_k and top_k < cfg.vocab_size) else 0
    return _Spec(rows=rows, prompt_len=prompt_len, gen_len=gen_len, num_samples=num_samples, top_k=k,
                 use_top_p=(not greedy and top_p < 1.0), greedy=bool(greedy), num_stop_slots=num_stop_slots,
                 pad_id=int(pad_id), unfiltered=bool(unfiltered), mesh=mesh,
                 windows=decode_windows(prompt_len, gen_len), kv_cache_dtype=kv_cache_dtype_name(kv_cache_dtype))


def generate_program(model, state, *, prompts: int, prompt_len: int, num_samples: int, max_new_tokens: int,
                     mesh, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                     unfiltered: bool = False, num_stops: int = 1, kv_cache_dtype=None):
    """The jitted program `generate` runs for `prompts` prompts of up to `prompt_len` tokens, and
    its arguments as `jax.ShapeDtypeStruct`s placed as `generate` places them, for compiling
    ahead of time (`jaxrl_rm.plan`): returns `(jitted, args, kwargs)`, so that
    `jitted.lower(*args, **kwargs).compile()` is the prefill + decode loop `generate` would run
    on `mesh` (an accelerator mesh: one row split, no CPU head cache).

    model: the `Transformer` (may be abstract, from `nnx.eval_shape`); state: its weights as
    `ShapeDtypeStruct`s with shardings (an `nnx.State` or pure dict). kv_cache_dtype: as in
    `generate`.
    """
    cfg = model.config
    shards = batch_shards(mesh)
    rows, p, n = bucket_rows(prompts, shards), bucket_length(prompt_len), bucket_length(max_new_tokens)
    spec = _make_spec(cfg, rows=rows, prompt_len=p, gen_len=n, num_samples=num_samples, top_k=top_k,
                      top_p=top_p, greedy=greedy, num_stop_slots=_stop_slots(num_stops), pad_id=0,
                      unfiltered=unfiltered, mesh=mesh, kv_cache_dtype=kv_cache_dtype)

    def placed(shape, dtype, row_dim=0):
        parts = [None] * len(shape)
        parts[row_dim] = BATCH_AXES
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*parts)))

    replicated = NamedSharding(mesh, P())
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    if not isinstance(state, nnx.State):
        abstract_state = nnx.state(model)
        nnx.replace_by_pure_dict(abstract_state, state)
        state = abstract_state
    args = (_StaticGraph(nnx.split(model)[0], cfg), state, None,
            placed((rows, p), jnp.int32), placed((rows,), jnp.int32), placed((rows,), jnp.bool_),
            placed((n, rows * num_samples), jnp.float32, row_dim=1),
            scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32),
            jax.ShapeDtypeStruct((spec.num_stop_slots,), jnp.int32, sharding=replicated))
    return _generate_jit, args, {"spec": spec}


# --- public API ---------------------------------------------------------------------------------
def _put_rows(x: np.ndarray, mesh) -> jax.Array:
    """Global host array -> device array with rows sharded over ("data", "fsdp") (multi-host safe)."""
    sharding = NamedSharding(mesh, P(BATCH_AXES, *([None] * (x.ndim - 1))))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _stop_ids(stop_token_ids) -> tuple[int, ...]:
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, (int, np.integer)):
        return (int(stop_token_ids),)
    return tuple(sorted({int(s) for s in stop_token_ids}))


def check_sampling(*, temperature: float, top_p: float, top_k: int, greedy: bool) -> None:
    """The sampling settings every sampler takes (`generate`, `rollout.SlotEngine`), or a ValueError
    naming the bad one; ignored when `greedy`."""
    if greedy:
        return
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def generate(model, prompts, *, num_samples: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] | int | None = (),
             seed: int | jax.Array = 0, greedy: bool = False, mesh: jax.sharding.Mesh | None = None,
             max_prompt_len: int | None = None, truncate_prompt: str = "error",
             prompt_lengths=None, padding_side: str = "left", pad_id: int | None = None,
             return_unfiltered_logprobs: bool = False, host_threads: int | None = None,
             kv_cache_dtype=None) -> GenerationResult:
    """Sample `num_samples` completions for each prompt.

    model: `jaxrl_rm.models.Transformer` (any compute dtype; sampler math is float32).
    prompts: ragged token ids (list of `[L_i]` lists/arrays), or a padded `[B, L]` array with
        `prompt_lengths` `[B]` and `padding_side` ('left' | 'right'); without lengths every
        column of the array is a real token.
    max_new_tokens: completion budget T (the result has T columns).
    temperature / top_k / top_p: applied in that order (top_k=0 and top_p=1 disable them);
        greedy=True takes the argmax (temperature and filters ignored).
    stop_token_ids: ids that end a row (kept in the completion, `finish_reason="stop"`).
    seed: int or PRNG key. Row j's draw at step t is a function of (seed, j, t) only: same seed
        and same prompts -> same samples, whatever the buckets, mesh or host threads (up to
        float rounding in the logits, which can differ with the batch shape).
    mesh: shard prompt rows over ("data", "fsdp") (rows padded to a multiple of that size).
    max_prompt_len: a longer prompt is an error, or with truncate_prompt='left' keeps its last
        `max_prompt_len` tokens. Default: `max_position_embeddings - max_new_tokens`.
    pad_id: filler id in `tokens` after a row ends (default: model's pad id, else 0).
    return_unfiltered_logprobs: also return `log_softmax(logits / temperature)` of each sampled
        token before top-k / top-p (`GenerationResult.unfiltered_logprobs`): the log-prob a
        teacher-forced trainer recomputes. Costs one more pass over the logits per step only
        when a filter is on.
    host_threads: CPU without a mesh only: split the rows into this many shards decoded
        concurrently from host threads (default `_host_splits`: one per core, >= 8 rows each).
        XLA:CPU runs one program's matmuls on one core; independent executions run in parallel.
        Results do not depend on it (each row's random draws are fixed by `seed` and its index).
    kv_cache_dtype: None / "compute" (the model's compute dtype), "int8" (each K / V stored as
        int8 with a float32 scale per (token, KV head), `models.transformer.QuantizedKV`: 0.53x
        the bytes of a bf16 cache at head_dim 64; log-probs drift slightly, see README), or
        another float dtype.

    Returns a `GenerationResult` with `B * num_samples` rows (row i*num_samples + j is sample j
    of prompt i).
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
    if max_prompt_len is None:
        max_prompt_len = max(cfg.max_position_embeddings - max_new_tokens, 1)
    rows = _prepare_prompts(prompts, vocab_size=cfg.vocab_size, max_prompt_len=max_prompt_len,
                            truncate=truncate_prompt, prompt_lengths=prompt_lengths,
                            padding_side=padding_side)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    shards = 1 if mesh is None else batch_shards(mesh)
    n_prompts = len(rows)
    longest = max(r.size for r in rows)
    splits = _host_splits(model, n_prompts * num_samples, mesh) if host_threads is None else max(1, host_threads)
    r_bucket = bucket_rows(n_prompts, shards * splits)
    p_bucket = bucket_length(longest)
    n_bucket = bucket_length(max_new_tokens)
    ids = np.full((r_bucket, p_bucket), pad_id, np.int32)
    lens = np.zeros((r_bucket,), np.int32)
    for i, r in enumerate(rows):
        ids[i, p_bucket - r.size:] = r
        lens[i] = r.size
    lens[n_prompts:] = 1  # filler rows: one pad token, never live
    live = np.arange(r_bucket) < n_prompts

    stops = _stop_ids(stop_token_ids)
    stop_arr = np.full((_stop_slots(len(stops)),), -1, np.int32)
    stop_arr[:len(stops)] = stops
    spec = _make_spec(cfg, rows=r_bucket // splits, prompt_len=p_bucket, gen_len=n_bucket,
                      num_samples=num_samples, top_k=top_k, top_p=top_p, greedy=greedy,
                      num_stop_slots=len(stop_arr), pad_id=pad_id,
                      unfiltered=return_unfiltered_logprobs, mesh=mesh, kv_cache_dtype=kv_cache_dtype)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    # One uniform per row and step, drawn up front for the whole batch (so samples do not depend
    # on how the rows are split below); the loop does no PRNG work.
    uniforms = _uniforms(key, steps=n_bucket, rows=r_bucket * num_samples, mesh=mesh)
    args = (ids, lens, live)
    if mesh is not None:  # every process holds the same global prompts; each places its rows
        args = tuple(_put_rows(np.asarray(a), mesh) for a in args)
    graphdef, state = nnx.split(model)
    static = (_StaticGraph(graphdef, cfg), state, _decode_head(model))
    scalars = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens), jnp.asarray(stop_arr))

    def run(i):  # shard i of `splits`: prompt rows [i*R/k, (i+1)*R/k) and their samples
        r0, r1 = i * spec.rows, (i + 1) * spec.rows
        part = tuple(a[r0:r1] for a in args) if splits > 1 else args
        u = uniforms[:, r0 * num_samples:r1 * num_samples] if splits > 1 else uniforms
        out = _generate_jit(*static, *part, u, *scalars, spec=spec)
        return jax.block_until_ready(out) if splits > 1 else out

    if splits == 1:
        toks, logp, lengths, stopped, base = run(0)
    else:  # concurrent executions from host threads: each gets a core (see `_host_splits`)
        outs = list(_EXECUTOR.map(run, range(splits)))
        toks, logp, lengths, stopped, base = (
            None if outs[0][j] is None else jnp.concatenate([o[j] for o in outs]) for j in range(5))
    # Multi-host: rows live on different processes; make them readable on every process.
    toks, logp, lengths, stopped, base = replicate((toks, logp, lengths, stopped, base), mesh)

    nrow = n_prompts * num_samples
    toks, logp, lengths = toks[:nrow, :max_new_tokens], logp[:nrow, :max_new_tokens], lengths[:nrow]
    mask = jnp.arange(max_new_tokens)[None, :] < lengths[:, None]
    finish = np.where(np.asarray(stopped[:nrow]), FINISH_STOP, FINISH_LENGTH)
    prompt_tokens = jnp.asarray(np.repeat(ids[:n_prompts, p_bucket - longest:], num_samples, axis=0))
    prompt_lens = jnp.asarray(np.repeat(lens[:n_prompts], num_samples))
    return GenerationResult(
        tokens=toks, mask=mask, logprobs=logp, lengths=lengths, finish_reason=finish,
        prompt_tokens=prompt_tokens, prompt_lengths=prompt_lens,
        unfiltered_logprobs=None if base is None else base[:nrow, :max_new_tokens])


def _teacher_forced_core(graphdef, state, ids, attn, tokens, mask, temperature, *, prompt_len, top_k, top_p):
    from jaxrl_rm.sampling.distribution import token_logprobs

    model = nnx.merge(graphdef.graphdef, state)
    t = tokens.shape[1]
    hidden = model.hidden_states(ids, attention_mask=attn)[:, prompt_len - 1:prompt_len - 1 + t]
    logp = token_logprobs(model.logits(hidden), tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return jnp.where(mask, logp, 0.0)


_teacher_forced_jit = jax.jit(_teacher_forced_core, static_argnames=("graphdef", "prompt_len", "top_k", "top_p"))


def teacher_forced_logprobs(model, result: GenerationResult, *, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Recompute the completion log-probs with one teacher-forced forward pass over
    `result.sequences()` (a check of train/infer consistency): `[N, T]` float32, 0 where
    `result.mask` is False. Same filter definition as the sampler (`distribution.token_logprobs`);
    with `top_k=0, top_p=1` this is `log_softmax(logits / temperature)` of the chosen tokens.
    """
    ids, attn = result.sequences()
    graphdef, state = nnx.split(model)
    return _teacher_forced_jit(_StaticGraph(graphdef, model.config), state, ids, attn, result.tokens, result.mask,
                               jnp.float32(temperature), prompt_len=int(result.prompt_tokens.shape[1]),
                               top_k=int(top_k), top_p=float(top_p))
