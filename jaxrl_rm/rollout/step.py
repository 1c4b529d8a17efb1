"""Device side of the slot engine: prompt prefill into a shared prompt cache, and a jitted
multi-step decode over `S` sample slots with per-slot positions, lengths and random draws.

Two caches (each in the model's `KVCache` layout, see `models.transformer.KVCache`), and a third
when prompts share prefixes:

* prompt cache: `[P, kv, Sp, Dh]` per layer (scanned: `[L, P, kv, Sp, Dh]`) - one row per *prompt
  slot*, the prompt right-padded (token i at slot i, RoPE position i); plus `prompt_hidden
  [P, D]`, the final hidden state of each prompt's last token (its first completion token is
  drawn from it).
* completion cache: `[S, kv, Sc, Dh]` per layer (scanned: `[L, S, kv, Sc, Dh]`) - one row per
  *sample slot*; generated token n of a slot sits at slot n, RoPE position `prompt_len + n`.
* prefix cache (`EngineSpec.prefix_len > 0`): `[Q, kv, Sq, Dh]` per layer - one row per *prefix
  slot*, a prefix several prompts share. Only prefill reads it: a prompt's prefill attends to its
  prefix there and writes prefix + rest into its prompt slot, so decoding never sees it.

A sample slot reads its prompt through `prompt_of[s]` (an index into the prompt slots), so the
G samples of a prompt share one copy of its K/V: the prompt costs `Sp` cache slots once instead
of G times. Attention is exact: the scores against the prompt part and against the completion
part are concatenated before one float32 softmax (the same set of keys, masks and positions as
the contiguous cache of `sampling.generate`; only the summation order differs). The prompt rows
are gathered per layer inside the step (`[S, kv, Sp, Dh]`, one layer at a time - see `_attend`), a
transient that is the price of keeping one stored copy.

Once no request waits, `compact_jit` moves the running samples into a smaller slot count (the
engine's slot levels), so the tail of a long-tailed run decodes fewer, fuller slots.

Per-slot state (host-owned `int32`/`bool` `[S]` arrays, passed in and returned every sync):
`tok` (last drawn token, not yet in the cache), `n` (tokens generated so far), `active`,
`stopped` (ended on a stop id), `prompt_of`, `plen` (prompt length), `limit` (the request's
`max_new_tokens`), `seed`, `row`. The draw of generated token n of a slot is
`uniform(fold_in(fold_in(key(seed), row), n))` - the same function of (seed, row, step) as
`sampling.generate`'s `_uniforms`, so a sample is the same whatever slot, batch or arrival order
it ran in, and equals `generate`'s row `row` for the same seed (up to float rounding).

A freshly inserted slot (`n == 0`) runs the step on a dummy token (its write lands on completion
slot 0, which its first real token overwrites) and takes its logits from `prompt_hidden`, so
insertion needs no separate program and never changes a compiled shape.

`EngineSpec.kv_cache_dtype="int8"`: both caches hold `models.transformer.QuantizedKV` leaves (int8
K/V, a float32 scale per token and KV head, same axes), written quantized (`kv_set`) and read
dequantized after the prompt-row gather; `generate(kv_cache_dtype="int8")` quantizes the same way,
so the two samplers still agree for a seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_rm.models.transformer import (_NEG_INF, apply_rope, kv_layer, kv_set, read_kv, rope_cos_sin,
                                         rope_inv_freq)
from jaxrl_rm.parallel.rules import kv_head_axis
from jaxrl_rm.sampling.distribution import sample_tokens, unfiltered_logprobs
from jaxrl_rm.sampling.sampler import BATCH_AXES, _StaticGraph

TRACE_COUNT = {"prefill": 0, "decode": 0, "compact": 0}  # incremented on every trace (tests check no recompiles)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Static part of the engine's programs (hashable: it keys the jit cache)."""

    num_slots: int         # S sample slots (of one slot group)
    num_prompt_slots: int  # P prompt slots
    prompt_len: int        # Sp: prompt cache slots per prompt (the longest prompt allowed)
    gen_len: int           # Sc: completion cache slots per sample (the largest max_new_tokens)
    prefill_rows: int      # most prompts per prefill call (calls use 1, 2, 4, ... up to it)
    top_k: int
    use_top_p: bool
    greedy: bool
    num_stop_slots: int
    pad_id: int
    kv_cache_dtype: str | None = None  # both caches: None = compute dtype, "int8" = `QuantizedKV` leaves
    prefix_len: int = 0        # Sq: prefix cache slots per shared prefix (0: no prefix sharing)
    num_prefix_slots: int = 0  # Q prefix slots


class SlotArrays(NamedTuple):
    """Per-slot scalars, each `[S]` (int32 unless noted); see the module docstring."""

    tok: jax.Array
    n: jax.Array
    active: jax.Array   # bool
    stopped: jax.Array  # bool
    prompt_of: jax.Array
    plen: jax.Array
    limit: jax.Array
    seed: jax.Array
    row: jax.Array


def empty_slots(shape=()) -> SlotArrays:
    """Host `SlotArrays` of idle slots, each field `np.ndarray` of `shape` (e.g. `(S,)`)."""
    z = np.zeros(shape, np.int32)
    return SlotArrays(tok=z, n=z, active=z.astype(bool), stopped=z.astype(bool), prompt_of=z, plen=z + 1,
                      limit=z, seed=z, row=z)


class DeviceState(NamedTuple):
    """Everything that stays on device between syncs (donated to each call).

    prompt_cache / completion_cache: `KVCache`s (see module docstring); prompt_hidden `[P, D]`;
    out_tok `[S, Sc]` int32, out_logp / out_base `[S, Sc]` float32: the tokens, sampler log-probs
    and unfiltered log-probs of each slot's current sample.
    """

    prompt_cache: list | tuple
    prompt_hidden: jax.Array
    completion_cache: list | tuple
    out_tok: jax.Array
    out_logp: jax.Array
    out_base: jax.Array
    prefix_cache: list | tuple | None = None  # `[Q, kv, Sq, Dh]` per layer when prefixes are shared


def init_state(model, spec: EngineSpec) -> DeviceState:
    """Zeroed device state for one slot group."""
    s, sc = spec.num_slots, spec.gen_len
    return DeviceState(
        prompt_cache=model.init_cache(spec.num_prompt_slots, spec.prompt_len, spec.kv_cache_dtype),
        prompt_hidden=jnp.zeros((spec.num_prompt_slots, model.config.hidden_size), model.dtype),
        completion_cache=model.init_cache(s, sc, spec.kv_cache_dtype),
        out_tok=jnp.full((s, sc), spec.pad_id, jnp.int32),
        out_logp=jnp.zeros((s, sc), jnp.float32),
        out_base=jnp.zeros((s, sc), jnp.float32),
        prefix_cache=(model.init_cache(spec.num_prefix_slots, spec.prefix_len, spec.kv_cache_dtype)
                      if spec.prefix_len else None))


def _rows(x, idx):
    """Index the row axis (-4) of a cache leaf `[..., R, kv, S, Dh]` (or an int8 cache's scale leaf
    `[..., R, kv, S, 1]`)."""
    return (slice(None),) * (x.ndim - 4) + (idx,)


def _prefill_core(graphdef, state, dstate: DeviceState, ids, lens, dest, pre_of, pre_len, *, spec: EngineSpec,
                  into: str = "prompt"):
    """Prefill B token blocks (B <= `spec.prefill_rows`) and write them into slots `dest`.

    into="prompt": prompts (or, after a shared prefix, the rest of them) into prompt slots, with
    the final hidden state of each one's last token. ids `[B, W]` right-padded (W <= Sp, a width
    bucket); lens `[B]` (>= 1); pre_of / pre_len `[B]`: the prefix slot each row extends and its
    length (0: none) - the block attends to that prefix (read from the prefix cache), takes RoPE
    positions after it, and the prompt slot receives prefix + block contiguously (so decoding
    reads it like any prompt; only the prefill is shared).
    into="prefix": shared prefixes into prefix slots (ids `[B, W]`, W <= Sq; pre_of / pre_len
    unused).
    dest `[B]`: `>=` the slot count drops the row (filler). Returns the new `DeviceState`.
    """
    TRACE_COUNT["prefill"] += 1
    model = nnx.merge(graphdef.graphdef, state)
    b, width = ids.shape
    block = jnp.arange(width, dtype=jnp.int32)[None, :]
    cache = model.init_cache(b, width, spec.kv_cache_dtype)  # int8: quantized here, copied as stored
    q = spec.prefix_len if into == "prompt" else 0
    if q:
        # the prefix rows this block extends, then room for the block: one contiguous cache whose
        # causal slot order (prefix slots < block slots) is the token order
        prefix = jax.tree.map(lambda c: c[_rows(c, pre_of)], dstate.prefix_cache)
        cache = jax.tree.map(lambda a, f: jnp.concatenate([a, f.astype(a.dtype)], axis=-2), prefix, cache)
        slots = jnp.arange(q + width, dtype=jnp.int32)[None, :]
        kv_mask = (slots < pre_len[:, None]) | ((slots >= q) & (slots < q + lens[:, None]))
        hidden, cache = model.decode(ids, cache, positions=pre_len[:, None] + block, cache_index=q, kv_mask=kv_mask)
        # the prompt slot stores the whole prompt, prefix then the rest, contiguous from slot 0 (so
        # decoding reads it as any other prompt): slot t <- t in the prefix, q + t - pre_len after it
        n = min(spec.prompt_len, q + width)  # the longest prompt this call can hold
        t = jnp.arange(n, dtype=jnp.int32)[None, :]
        src = jnp.minimum(jnp.where(t < pre_len[:, None], t, q + t - pre_len[:, None]), q + width - 1)
        cache = jax.tree.map(lambda c: jnp.take_along_axis(c, src.reshape((1,) * (c.ndim - 4) + (b, 1, n, 1)),
                                                           axis=-2), cache)
    else:
        hidden, cache = model.decode(ids, cache, positions=jnp.broadcast_to(block, (b, width)), cache_index=0,
                                     kv_mask=block < lens[:, None])

    def put(dst, src):  # a block narrower than the slot fills its first columns
        return dst.at[_rows(dst, dest) + (slice(None), slice(0, src.shape[-2]))].set(src.astype(dst.dtype),
                                                                                     mode="drop")

    if into == "prefix":
        return dstate._replace(prefix_cache=jax.tree.map(put, dstate.prefix_cache, cache))
    last = hidden[jnp.arange(b), lens - 1]  # [B, D]
    pcache = jax.tree.map(put, dstate.prompt_cache, cache)
    phidden = dstate.prompt_hidden.at[dest].set(last.astype(dstate.prompt_hidden.dtype), mode="drop")
    return dstate._replace(prompt_cache=pcache, prompt_hidden=phidden)


prefill_jit = jax.jit(_prefill_core, static_argnames=("graphdef", "spec", "into"), donate_argnames=("dstate",))


def _compact_core(dstate: DeviceState, idx):
    """Keep the sample slots `idx [S']` (in that order): the completion cache rows and output
    buffers are gathered into an `S'`-slot state; the prompt cache is unchanged. Used once no
    request waits, so that the tail of a run decodes fewer, fuller slots."""
    TRACE_COUNT["compact"] += 1
    cc = jax.tree.map(lambda c: c[_rows(c, idx)], dstate.completion_cache)
    return dstate._replace(completion_cache=cc, out_tok=dstate.out_tok[idx], out_logp=dstate.out_logp[idx],
                           out_base=dstate.out_base[idx])


compact_jit = jax.jit(_compact_core)


def _qkv(attn, h, cos, sin):
    """Projections of one decode token per slot: h `[S, 1, D]` -> q `[S, 1, H, Dh]`, k, v
    `[S, 1, kv, Dh]` (same math as `Attention.__call__`)."""
    b = h.shape[0]
    q = attn.q_proj(h).reshape(b, 1, attn.num_heads, attn.head_dim)
    k = attn.k_proj(h).reshape(b, 1, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(h).reshape(b, 1, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _zero_from(x):
    """int32 0 that data-depends on x (the sign bit of one element, shifted out)."""
    bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
    sign = jax.lax.shift_right_logical(bits, jnp.uint32(31))
    return jax.lax.shift_right_logical(sign, jnp.uint32(1)).astype(jnp.int32)


def _attend(attn, q, pk, pv, ck, cv, prompt_of, pmask, cmask):
    """Exact attention of one query per slot over its prompt (shared) and its completion.

    q `[S, 1, H, Dh]`; pk/pv `[P, kv, Sp, Dh]` (one layer's prompt cache); ck/cv `[S, kv, Sc,
    Dh]` (this step's key already written); prompt_of `[S]`; pmask `[S, Sp]`, cmask `[S, Sc]` bool.
    -> `[S, 1, D]`. An int8 cache (`QuantizedKV` pk/pv/ck/cv) is gathered leaf by leaf and read
    dequantized: keys in q's dtype, values in q's dtype (plain caches: in their own dtype).
    """
    s, _, h, dh = q.shape
    kv = attn.num_kv_heads
    g = h // kv
    # Gather this layer's prompt rows only once its query exists, so that XLA can neither hoist
    # the (loop-invariant) gathers out of the decode loop nor run every layer's gather up front -
    # either would hold a per-sample copy of every layer's prompt K/V, the very memory the shared
    # cache saves. `_zero_from(q)` is 0 computed from q (XLA keeps the dependency; an
    # optimization barrier is dropped before scheduling on CPU). Adding it costs one pass over
    # this layer's stored prompt rows (`[P, ...]`, 1/G of the gathered `[S, ...]`).
    zero = _zero_from(q)
    qh = q.reshape(s, kv, g, dh)

    def gather(c):
        """[S, kv, Sp, Dh]: this layer's prompt rows, each leaf of an int8 cache alike (with one
        prompt slot XLA turns the gather into a broadcast of the cache, so the dependency rides on
        the data as well as on the index)."""
        return jax.tree.map(lambda a: (a + zero.astype(a.dtype))[prompt_of + zero], c)

    n_p = jax.tree.leaves(pk)[0].shape[-2]
    kp, vp = read_kv(gather(pk), gather(pv), q.dtype)
    ck, cv = read_kv(ck, cv, q.dtype)
    scale = 1.0 / math.sqrt(dh)
    sp = jnp.einsum("bkgd,bksd->bkgs", qh, kp, preferred_element_type=jnp.float32) * scale
    sc = jnp.einsum("bkgd,bksd->bkgs", qh, ck, preferred_element_type=jnp.float32) * scale
    scores = jnp.concatenate([jnp.where(pmask[:, None, None], sp, _NEG_INF),
                              jnp.where(cmask[:, None, None], sc, _NEG_INF)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(cv.dtype)
    out = (jnp.einsum("bkgs,bksd->bkgd", probs[..., :n_p], vp)
           + jnp.einsum("bkgs,bksd->bkgd", probs[..., n_p:], cv))
    return attn.o_proj(out.reshape(s, 1, h * dh).astype(q.dtype))


def _block(block, x, cos, sin, attend):
    """Pre-norm decoder layer around `attend(q, k, v) -> attention output` (`Block.__call__`)."""
    q, k, v = _qkv(block.attn, block.input_norm(x), cos, sin)
    x = x + attend(q, k, v)
    return x + block.mlp(block.post_attn_norm(x))


def _layers(model, x, cos, sin, pcache, ccache, widx, prompt_of, pmask, cmask):
    """All layers for one token per slot; writes each slot's key/value at completion slot
    `widx [S]` (a scatter, in place in the loop carry; quantized for an int8 cache, `kv_set`).
    Returns (x, completion cache)."""
    s = x.shape[0]
    ar = jnp.arange(s)

    if not model.scan_layers:
        new_cache = []
        for layer, (pk, pv), (ck, cv) in zip(model.layers, pcache, ccache):
            def attend(q, k, v, pk=pk, pv=pv, ck=ck, cv=cv):
                ck = kv_set(ck, (ar, slice(None), widx), k[:, 0])
                cv = kv_set(cv, (ar, slice(None), widx), v[:, 0])
                new_cache.append((ck, cv))
                return _attend(layer.attn, q, pk, pv, ck, cv, prompt_of, pmask, cmask)

            x = _block(layer, x, cos, sin, attend)
        return x, new_cache

    graphdef, stacked = nnx.split(model.layers)

    def body(carry, xs):
        x, (ck, cv) = carry
        st, i, pk, pv = xs
        block = nnx.merge(graphdef, st)
        written = {}

        def attend(q, k, v):
            ck2 = kv_set(ck, (i, ar, slice(None), widx), k[:, 0])
            cv2 = kv_set(cv, (i, ar, slice(None), widx), v[:, 0])
            written["kv"] = (ck2, cv2)
            return _attend(block.attn, q, pk, pv, kv_layer(ck2, i), kv_layer(cv2, i), prompt_of, pmask, cmask)

        x = _block(block, x, cos, sin, attend)
        return (x, written["kv"]), None

    ids = jnp.arange(model.config.num_hidden_layers, dtype=jnp.int32)
    pk, pv = pcache
    (x, ccache), _ = jax.lax.scan(body, (x, tuple(ccache)), (stacked, ids, pk, pv))
    return x, ccache


def draw_uniforms(seed, row, step):
    """`[S]` uniforms: `uniform(fold_in(fold_in(key(seed), row), step))` per slot - the draw of
    `sampling.generate` for row `row` at step `step` with `seed=seed` (see its `_uniforms`)."""
    def one(s, r, t):
        key = jax.random.key(s)
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, r), t), (), jnp.float32)

    return jax.vmap(one)(seed, row, step)


def _step_fn(graphdef, state, head, stops, temperature, top_p, *, spec: EngineSpec):
    """`step(slots, dstate, go) -> (slots, dstate)`: one decode step over the slots of one group.

    Slots with `active & go` draw a token; the others keep their state (`go` False freezes a whole
    group: `_decode_groups`). Every slot still writes the key/value of its last token at completion
    slot `n - 1`, which for a slot that did not move rewrites the same values - so freezing needs
    no select over the cache.
    """
    model = nnx.merge(graphdef.graphdef, state)
    cfg = model.config
    inv_freq = rope_inv_freq(cfg)
    if head is None:
        head = (model.lm_head_weight(),)
    sp_, sc_ = spec.prompt_len, spec.gen_len
    ar = jnp.arange(spec.num_slots)
    embed = model.embed[...]

    def lm_logits(hidden):
        h = hidden.astype(model.dtype)
        parts = [jnp.dot(h, w.astype(model.dtype), preferred_element_type=jnp.float32) for w in head]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def step(sl, ds, go):
        n = sl.n
        prompt_of = sl.prompt_of
        pmask = jnp.arange(sp_)[None, :] < sl.plen[:, None]
        x = embed[sl.tok][:, None].astype(model.dtype)  # [S, 1, D]
        pos = jnp.maximum(sl.plen + n - 1, 0)[:, None].astype(jnp.int32)
        cos, sin = rope_cos_sin(pos, inv_freq)
        widx = jnp.maximum(n - 1, 0)
        cmask = jnp.arange(sc_)[None, :] < jnp.maximum(n, 1)[:, None]
        x, ccache = _layers(model, x, cos, sin, ds.prompt_cache, ds.completion_cache, widx, prompt_of,
                            pmask, cmask)
        hidden = model.final_norm(x)[:, 0]
        hidden = jnp.where((n == 0)[:, None], ds.prompt_hidden[prompt_of].astype(hidden.dtype), hidden)
        logits = lm_logits(hidden)
        u = draw_uniforms(sl.seed, sl.row, n)
        tok, logp = sample_tokens(logits, u, temperature=temperature, top_k=spec.top_k, top_p=top_p,
                                  use_top_p=spec.use_top_p, greedy=spec.greedy)
        filtered = not spec.greedy and (spec.top_k > 0 or spec.use_top_p)
        base = unfiltered_logprobs(logits, tok, temperature=temperature) if filtered else logp
        live = sl.active & go
        col = jnp.where(live, n, sc_)  # out of range: dropped
        out_tok = ds.out_tok.at[ar, col].set(tok, mode="drop")
        out_logp = ds.out_logp.at[ar, col].set(logp, mode="drop")
        out_base = ds.out_base.at[ar, col].set(base, mode="drop")
        n_new = n + live.astype(jnp.int32)
        hit = live & jnp.isin(tok, stops)
        active = jnp.where(live, ~hit & (n_new < sl.limit), sl.active)
        sl = sl._replace(tok=jnp.where(live, tok, sl.tok), n=n_new, active=active, stopped=sl.stopped | hit)
        ds = ds._replace(completion_cache=ccache, out_tok=out_tok, out_logp=out_logp, out_base=out_base)
        return sl, ds

    return step


def _keep_going(slots: SlotArrays, want_free):
    """A group decodes on while a slot is active and fewer than `want_free` slots are free."""
    return jnp.any(slots.active) & (jnp.sum(~slots.active) < want_free)


def _decode_core(graphdef, state, head, dstate: DeviceState, slots: SlotArrays, stops, temperature, top_p,
                 max_steps, want_free, *, spec: EngineSpec):
    """Up to `max_steps` decode steps over all slots, on device.

    head: tuple of `[D, V_i]` LM-head column blocks or None (= `model.lm_head_weight()`);
    stops `[num_stop_slots]` int32 (-1 unused); temperature, top_p f32 scalars; max_steps,
    want_free int32 scalars. Exits early once no slot is active, or once at least `want_free`
    slots are inactive (the host has requests waiting for them).
    Returns (DeviceState, SlotArrays, steps run int32).
    """
    TRACE_COUNT["decode"] += 1
    step = _step_fn(graphdef, state, head, stops, temperature, top_p, spec=spec)

    def body(carry):
        i, sl, ds = carry
        sl, ds = step(sl, ds, jnp.bool_(True))
        return i + 1, sl, ds

    def cond(carry):
        i, sl, _ = carry
        return (i < max_steps) & _keep_going(sl, want_free)

    i, slots, dstate = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, dstate))
    return dstate, slots, i


decode_jit = jax.jit(_decode_core, static_argnames=("graphdef", "spec"), donate_argnames=("dstate",))


# --- slot groups over a mesh ----------------------------------------------------------------------
# On a mesh, the engine stacks one slot group per data shard (`data x fsdp` devices) along a leading
# group axis `[n, ...]` of every device-state leaf, placed over ("data", "fsdp"), and runs the
# programs above under `jax.vmap`: group g's slots, prompt slots and caches live on its own shard,
# its samples read only its own prompt slots, so GSPMD partitions the step without moving a cache
# (the only cross-shard traffic is the decode loop's "any group still running" flag, and the
# weights' own tensor/fsdp collectives). The KV-head axis of the caches follows the tensor axis
# when it divides the KV heads, as in `sampling.generate`.
def group_sharding(mesh, x, *, cache: bool = False) -> NamedSharding:
    """Placement of a stacked group leaf `x` `[n, ...]`: groups over ("data", "fsdp"); for a cache
    leaf (`[n, (L,) R, kv, S, Dh]`, or an int8 cache's scales) its KV heads over "tensor" when that
    divides them."""
    parts = [BATCH_AXES] + [None] * (x.ndim - 1)
    if cache:
        parts[-3] = kv_head_axis(mesh, x.shape[-3])
    return NamedSharding(mesh, P(*parts))


def _is_cache(path) -> bool:
    return any(getattr(k, "name", None) in ("prompt_cache", "completion_cache", "prefix_cache") for k in path)


def _place_groups(tree, mesh):
    """Pin every leaf of stacked `DeviceState` / `SlotArrays` / steps (inside a program) to its
    group sharding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(x, group_sharding(mesh, x, cache=_is_cache(path))), tree)


def _stacked_init(model, spec: EngineSpec, groups: int) -> DeviceState:
    """`init_state` of `groups` slot groups, stacked `[groups, ...]` (unplaced)."""
    return jax.vmap(lambda _: init_state(model, spec))(jnp.arange(groups))


def abstract_groups(model, spec: EngineSpec, groups: int, mesh) -> DeviceState:
    """The stacked device state of `groups` slot groups as placed `jax.ShapeDtypeStruct`s (for
    `init_groups`, and for compiling the group programs ahead of time; `model` may be abstract)."""
    abstract = jax.eval_shape(lambda: _stacked_init(model, spec, groups))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=group_sharding(mesh, x, cache=_is_cache(path))),
        abstract)


def init_groups(model, spec: EngineSpec, groups: int, mesh) -> DeviceState:
    """Zeroed device state of `groups` slot groups, stacked `[groups, ...]` and placed over the
    mesh's data axes (each device allocates only its own groups' caches)."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract_groups(model, spec, groups, mesh))
    return jax.jit(lambda: _stacked_init(model, spec, groups), out_shardings=shardings)()


def _prefill_groups(graphdef, state, dstate, ids, lens, dest, pre_of, pre_len, *, spec: EngineSpec, mesh,
                    into: str = "prompt"):
    """`_prefill_core` per group: ids `[n, B, width]`, lens / dest / pre_of / pre_len `[n, B]`."""
    out = jax.vmap(lambda ds, *rows: _prefill_core(graphdef, state, ds, *rows, spec=spec, into=into))(
        _place_groups(dstate, mesh), ids, lens, dest, pre_of, pre_len)
    return _place_groups(out, mesh)


prefill_groups_jit = jax.jit(_prefill_groups, static_argnames=("graphdef", "spec", "mesh", "into"),
                             donate_argnames=("dstate",))


def _decode_groups(graphdef, state, head, dstate, slots, stops, temperature, top_p, max_steps, want_free, *,
                   spec: EngineSpec, mesh):
    """`_decode_core` for stacked groups: dstate / slots `[n, ...]`, want_free `[n]`. One loop for
    all groups, each step vmapped over them; a group whose exit condition holds is frozen (its slots
    draw nothing) while the others go on - not a `vmap` of the loop, whose batched exit would
    select between the old and new state of every cache at every step. -> (dstate, slots, steps
    `[n]`: the steps each group took)."""
    TRACE_COUNT["decode"] += 1
    step = jax.vmap(_step_fn(graphdef, state, head, stops, temperature, top_p, spec=spec))
    going = jax.vmap(_keep_going)
    dstate, slots, want_free = _place_groups((dstate, slots, want_free), mesh)

    def body(carry):
        i, sl, ds, steps = carry
        go = going(sl, want_free)
        sl, ds = step(sl, ds, go)
        sl, ds = _place_groups((sl, ds), mesh)
        return i + 1, sl, ds, steps + go.astype(jnp.int32)

    def cond(carry):
        i, sl, _, _ = carry
        return (i < max_steps) & jnp.any(going(sl, want_free))

    zero = jnp.zeros_like(want_free)
    _, slots, dstate, steps = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, dstate, zero))
    return _place_groups((dstate, slots, steps), mesh)


decode_groups_jit = jax.jit(_decode_groups, static_argnames=("graphdef", "spec", "mesh"),
                            donate_argnames=("dstate",))


def _compact_groups(dstate, idx, *, mesh):
    """`_compact_core` per group: idx `[n, S']`."""
    return _place_groups(jax.vmap(_compact_core)(_place_groups(dstate, mesh), idx), mesh)


compact_groups_jit = jax.jit(_compact_groups, static_argnames=("mesh",), donate_argnames=("dstate",))


def decode_groups_program(model, state, spec: EngineSpec, groups: int, mesh):
    """`decode_groups_jit` and its arguments as placed `jax.ShapeDtypeStruct`s, for compiling the
    mesh engine's decode ahead of time (as `sampling.sampler.generate_program` does for the static
    sampler): `jitted.lower(*args, **kwargs).compile()` is what `SlotEngine(mesh=mesh)` runs with
    `groups` slot groups of `spec`. model may be abstract (`nnx.eval_shape`); state: its weights as
    placed `ShapeDtypeStruct`s (an `nnx.State`)."""
    replicated = NamedSharding(mesh, P())
    per_slot = lambda dtype: jax.ShapeDtypeStruct((groups, spec.num_slots), dtype,
                                                  sharding=NamedSharding(mesh, P(BATCH_AXES, None)))
    i32, flag = per_slot(jnp.int32), per_slot(jnp.bool_)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    args = (_StaticGraph(nnx.split(model)[0], model.config), state, None, abstract_groups(model, spec, groups, mesh),
            SlotArrays(i32, i32, flag, flag, i32, i32, i32, i32, i32),
            jax.ShapeDtypeStruct((spec.num_stop_slots,), jnp.int32, sharding=replicated),
            scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32),
            jax.ShapeDtypeStruct((groups,), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES))))
    return decode_groups_jit, args, {"spec": spec, "mesh": mesh}
