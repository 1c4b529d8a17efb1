"""`token_logprobs`: the log-prob hot loop of RL post-training, behind one call.

Why this exists: every RL step computes `log softmax(hidden @ lm_head / T)[target]` for every
token (policy, old policy, reference policy), and the dense way materialises `[N, V]` logits
several times over under autodiff. All fast implementations here share one differentiable
primitive, `_stats`, that returns per-token statistics `(lse, z_target[, entropy])` and has a
`jax.custom_vjp` whose backward recomputes blocks of logits instead of saving any `[N, V]`
buffer. `logp = z_target - lse`; the entropy is returned as is. Every implementation first casts
the head to the hidden's (compute) dtype, as the model's logits and the sampler do, so training
and sampling log-probs come from the same matmul (bf16 compute, float32 parameters included).

Implementations (`impl=`):

* `"reference"`: dense float32 (`reference.py`), the oracle;
* `"chunked"`: pure JAX streaming over vocab and token blocks (`chunked.py`); default on CPU;
* `"pallas"`: Pallas kernels, Mosaic on TPU (`pallas_tpu.py`), Triton on GPU (`pallas_gpu.py`),
  `interpret=True` on CPU (how the tests run them); default on TPU (`_AUTO` says why not GPU);
* under a mesh: `token_logprobs(..., mesh=mesh)` (or `token_logprobs_sharded`) runs any of the
  above per shard under `jax.shard_map`: tokens split over the mesh's `data` and `fsdp` axes
  (each chip computes only its own tokens' log-probs; without shard_map XLA cannot partition
  the token loop or a Pallas custom call and all-gathers the whole `[N, D]` hidden onto every
  chip), and, when the head is vocab-sharded over `tensor`, partial statistics combined across
  that axis. Every trainer passes its mesh.

Old-policy / reference log-probs only run the forward (no residuals are used unless
differentiated).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrl_rm.kernels import chunked as _chunked
from jaxrl_rm.kernels._math import vary_like
from jaxrl_rm.kernels.reference import reference_stats, token_logprobs_reference

IMPLS = ("auto", "reference", "chunked", "pallas")
# What `impl="auto"` runs, per backend, and the evidence:
#   tpu -> "pallas": Mosaic kernels; compiled for v5e / v5p / v6e at D 896-8192 and V up to 152k
#          with working memory within the chunked path's (tests/test_tpu_aot.py,
#          `benchmarks/logprob.py --tpu-aot`, docs/accelerators.md). No TPU has timed them yet.
#   gpu -> "chunked": XLA with cuBLAS matmuls, memory-lean and correct at every width. The Triton
#          kernels are correct in interpret mode and lower for CUDA, but have not run on a GPU
#          here (no device was lent): until `benchmarks/device/logprob_gpu.py` shows them
#          faster on an H100/H200, "pallas" on GPU is opt-in.
#   cpu -> "chunked" (benchmarks/logprob.py: >= 16x less memory than dense at <= 1.0x the time).
_AUTO = {"tpu": "pallas", "gpu": "chunked"}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static (hashable) description of one call; the custom VJP's non-differentiable arg."""

    impl: str  # "chunked" | "pallas"
    temperature: float
    with_entropy: bool
    block_tokens: int | None
    block_vocab: int | None
    platform: str  # pallas flavour: "tpu" | "gpu" (ignored by chunked)
    interpret: bool


def _blocks(plan: _Plan) -> dict:
    return {k: v for k, v in (("block_tokens", plan.block_tokens),
                              ("block_vocab", plan.block_vocab)) if v is not None}


def _forward(plan: _Plan, hidden, lm_head, targets):
    if plan.impl == "chunked":
        return _chunked.forward(hidden, lm_head, targets, temperature=plan.temperature,
                                with_entropy=plan.with_entropy, **_blocks(plan))
    if plan.platform == "tpu":
        from jaxrl_rm.kernels import pallas_tpu as mod
    else:
        from jaxrl_rm.kernels import pallas_gpu as mod
    return mod.forward(hidden, lm_head, targets, temperature=plan.temperature,
                       with_entropy=plan.with_entropy, interpret=plan.interpret, **_blocks(plan))


def _backward(plan: _Plan, hidden, lm_head, targets, lse, a, b, c):
    if plan.impl == "chunked":
        return _chunked.backward(hidden, lm_head, targets, lse, a, b, c,
                                 temperature=plan.temperature, **_blocks(plan))
    if plan.platform == "tpu":
        from jaxrl_rm.kernels import pallas_tpu as mod
    else:
        from jaxrl_rm.kernels import pallas_gpu as mod
    return mod.backward(hidden, lm_head, targets, lse, a, b, c, temperature=plan.temperature,
                        interpret=plan.interpret, **_blocks(plan))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(plan: _Plan, hidden, lm_head, targets):
    """`(lse, z_target)` or `(lse, z_target, entropy)`, each `[N] float32`."""
    out, _ = _stats_fwd(plan, hidden, lm_head, targets)
    return out


def _stats_fwd(plan, hidden, lm_head, targets):
    lse, zt, ent = _forward(plan, hidden, lm_head, targets)
    out = (lse, zt, ent) if plan.with_entropy else (lse, zt)
    return out, (hidden, lm_head, targets, lse, ent)


def _stats_bwd(plan, res, cts):
    hidden, lm_head, targets, lse, ent = res
    g_lse, g_zt = cts[0], cts[1]
    inv_t = jnp.float32(1.0 / plan.temperature)
    a = g_zt * inv_t
    if plan.with_entropy:
        g_ent = cts[2]
        b = (g_lse - g_ent * ent) * inv_t
        c = -g_ent * inv_t
    else:
        b, c = g_lse * inv_t, None
    d_hidden, d_lm_head = _backward(plan, hidden, lm_head, targets, lse, a, b, c)
    return d_hidden, d_lm_head, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def _check_shapes(hidden, lm_head, targets):
    if hidden.ndim != 2 or lm_head.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            f"token_logprobs expects hidden [N, D], lm_head [D, V], targets [N]; got "
            f"{hidden.shape}, {lm_head.shape}, {targets.shape} (flatten [B, T] to [B*T] first)")
    if hidden.shape[1] != lm_head.shape[0]:
        raise ValueError(f"hidden [N, D={hidden.shape[1]}] does not match lm_head "
                         f"[D={lm_head.shape[0]}, V]")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} tokens, hidden has {hidden.shape[0]}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integers, got {targets.dtype}")


def _head_in_compute_dtype(hidden, lm_head):
    """`lm_head` cast to `hidden.dtype` (the compute dtype), as `Transformer.logits` and the sampler
    use it. With bf16 compute and float32 parameters an uncast head would make the matmul float32
    at `Precision.HIGHEST` (multi-pass on TPU/GPU) and give log-probs the sampler never computed.
    The cast's transpose returns `d_lm_head` in the head's own dtype (float32 parameters keep
    float32 gradients)."""
    return lm_head if lm_head.dtype == hidden.dtype else lm_head.astype(hidden.dtype)


def _resolve(impl: str, pallas_platform: str | None, interpret: bool | None):
    """`impl="auto"` -> concrete impl by backend; the Pallas flavour and interpret mode."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = _AUTO.get(backend, "chunked")
    platform = pallas_platform or ("gpu" if backend == "gpu" else "tpu")
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"pallas_platform={platform!r}; expected 'tpu' or 'gpu'")
    if interpret is None:
        interpret = backend != platform
    return impl, platform, interpret


def token_logprobs(hidden, lm_head, targets, *, temperature: float = 1.0,
                   with_entropy: bool = False, impl: str = "auto",
                   block_tokens: int | None = None, block_vocab: int | None = None,
                   pallas_platform: str | None = None, interpret: bool | None = None,
                   mesh: jax.sharding.Mesh | None = None, vocab_axis: str = "tensor",
                   token_axes: Sequence[str] = ("data", "fsdp")):
    """Log-probability of each target token (and the entropy) under `softmax(h @ W / T)`.

    Args:
      hidden: `[N, D]` float32 or bf16 final hidden states (flatten `[B, T, D]` first); its
        dtype is the compute dtype.
      lm_head: `[D, V]` the unembedding, any float dtype; every implementation first casts it to
        `hidden.dtype` (bf16 hidden + float32 head -> a bf16 matmul at default precision with
        float32 accumulation, exactly the sampler's logits); `d_lm_head` comes back in
        `lm_head.dtype`.
      targets: `[N] int32` token ids in `[0, V)` (the streaming implementations treat an id
        outside as matching no column, i.e. logit 0; the textbook reference gives NaN).
      temperature: logits are `hidden @ lm_head / temperature` (static Python float).
      with_entropy: also return the entropy of the temperature-scaled softmax.
      impl: `"auto"` (Pallas on TPU, chunked elsewhere: see `_AUTO` for the evidence),
        `"reference"`, `"chunked"`, `"pallas"` (interpret mode on CPU).
      block_tokens, block_vocab: block sizes; None picks the implementation's default.
      pallas_platform: `"tpu"` (Mosaic) or `"gpu"` (Triton) kernels; None = current backend
        (the Mosaic kernels on CPU).
      interpret: run Pallas kernels in interpret mode; None = when the backend is not the
        kernels' platform (e.g. on CPU).
      mesh: if given and it has more than one device, run under `jax.shard_map`
        (`token_logprobs_sharded`): tokens split over `token_axes`, `lm_head`'s vocab over
        `vocab_axis` (when `V` divides over it; otherwise each shard takes the whole head).
        Trainers pass theirs so the per-chip work and memory scale as 1/chips.

    Returns:
      `logp: [N] float32`, or `(logp, entropy)` both `[N] float32`. Differentiable w.r.t.
      `hidden` and `lm_head` (both outputs); float32 accumulation throughout.
    """
    _check_shapes(hidden, lm_head, targets)
    lm_head = _head_in_compute_dtype(hidden, lm_head)
    if mesh is not None and mesh.size > 1:
        if lm_head.shape[1] % mesh.shape.get(vocab_axis, 1):
            vocab_axis = None  # a vocab that does not divide: whole on each shard, tokens still split
        return token_logprobs_sharded(
            hidden, lm_head, targets, mesh=mesh, temperature=temperature,
            with_entropy=with_entropy, impl=impl, block_tokens=block_tokens,
            block_vocab=block_vocab, pallas_platform=pallas_platform, interpret=interpret,
            vocab_axis=vocab_axis, token_axes=token_axes)
    if impl == "reference":
        return token_logprobs_reference(hidden, lm_head, targets, temperature=temperature,
                                        with_entropy=with_entropy)
    lse, zt, ent = _local_stats(hidden, lm_head, targets, temperature=temperature,
                                with_entropy=with_entropy, impl=impl,
                                block_tokens=block_tokens, block_vocab=block_vocab,
                                pallas_platform=pallas_platform, interpret=interpret)
    logp = zt - lse
    return (logp, ent) if with_entropy else logp


def _local_stats(hidden, lm_head, targets, *, temperature, with_entropy, impl, block_tokens,
                 block_vocab, pallas_platform, interpret):
    """`(lse, z_target, entropy or None)` of the local vocab, `[N] float32` each."""
    if impl == "reference":  # dense, differentiated by plain autodiff
        return reference_stats(hidden, lm_head, targets, temperature=temperature,
                               with_entropy=with_entropy)
    impl, platform, interpret = _resolve(impl, pallas_platform, interpret)
    if hidden.shape[0] == 0:  # nothing to stream over; the dense form handles empty arrays
        return reference_stats(hidden, lm_head, targets, temperature=temperature,
                               with_entropy=with_entropy)
    plan = _Plan(impl=impl, temperature=float(temperature), with_entropy=bool(with_entropy),
                 block_tokens=block_tokens, block_vocab=block_vocab, platform=platform,
                 interpret=bool(interpret))
    # Under shard_map, give all operands the same varying axes before the custom VJP (it does
    # not insert the casts itself); the cast's transpose is the psum of d_hidden over shards.
    args = (hidden, lm_head, targets.astype(jnp.int32))
    out = _stats(plan, *(vary_like(x, *args) for x in args))
    return (out[0], out[1], out[2] if with_entropy else None)


def token_logprobs_sharded(hidden, lm_head, targets, *, mesh: jax.sharding.Mesh,
                           temperature: float = 1.0, with_entropy: bool = False,
                           impl: str = "auto", block_tokens: int | None = None,
                           block_vocab: int | None = None, pallas_platform: str | None = None,
                           interpret: bool | None = None, vocab_axis: str | None = "tensor",
                           token_axes: Sequence[str] = ("data", "fsdp")):
    """`token_logprobs` under `jax.shard_map`: data-parallel over tokens, vocab-parallel over
    the head.

    Tokens are split over those of `token_axes` the mesh has (size > 1): each shard runs any
    implementation on its own `[N / shards, D]` rows, so per-chip FLOPs and memory scale as
    1/shards. (Left to XLA's partitioner, a token `fori_loop` or a Pallas custom call cannot be
    split: the whole hidden is all-gathered and every chip computes every token.) When
    `vocab_axis` has size > 1, each shard holds `V / tp` head columns and computes the
    statistics `(lse_k, z_target_k, H_k)` of its slice; they are combined with `pmax`/`psum`
    over `vocab_axis`: `lse = m + log sum_k exp(lse_k - m)`, `z_target = sum_k z_target_k`
    (the target lives in one shard), `H = sum_k a_k (H_k - log a_k)` with
    `a_k = exp(lse_k - lse)`. Gradients flow through the collectives (the custom VJP runs per
    shard); `d_lm_head`'s partial sums over token shards are reduced by shard_map's transpose.

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]` (cast to `hidden.dtype`), `V` divisible by the
        `vocab_axis` size; targets: `[N] int32`. `N` need not divide over the token shards:
        it is padded (with zero rows, dropped from the result) to a multiple.
      mesh: a `jax.sharding.Mesh` (axes `data`, `fsdp`, `tensor`, `AxisType.Auto`).
      vocab_axis: the mesh axis the vocab is split over; None = not split (every shard
        computes the whole vocab of its tokens).
      Other args as `token_logprobs`.

    Returns:
      `logp: [N] float32` or `(logp, entropy)`, sharded over the token axes.
    """
    _check_shapes(hidden, lm_head, targets)
    lm_head = _head_in_compute_dtype(hidden, lm_head)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    tp = mesh.shape.get(vocab_axis, 1) if vocab_axis else 1
    v = lm_head.shape[1]
    if v % tp:
        raise ValueError(f"vocab size {v} is not divisible by the {vocab_axis!r} axis size {tp}; "
                         "pad lm_head's vocab to a multiple (padded columns need a -inf bias, "
                         "so pad upstream where the model owns the head)")
    tok_axes = tuple(ax for ax in token_axes if mesh.shape.get(ax, 1) > 1)
    n_tok_shards = 1
    for ax in tok_axes:
        n_tok_shards *= mesh.shape[ax]
    n = hidden.shape[0]
    pad = -n % n_tok_shards
    if pad:  # e.g. an evaluation batch of odd size: zero rows, their results dropped below
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
    tok_spec = tok_axes if tok_axes else None
    head_spec = P(None, vocab_axis) if tp > 1 else P()
    v_local = v // tp

    def local(h, w, t):
        t = t.astype(jnp.int32)
        if tp > 1:
            t = t - lax.axis_index(vocab_axis) * v_local
        lse_k, zt_k, ent_k = _local_stats(
            h, w, t, temperature=temperature, with_entropy=with_entropy, impl=impl,
            block_tokens=block_tokens, block_vocab=block_vocab,
            pallas_platform=pallas_platform, interpret=interpret)
        if tp == 1:
            return (zt_k - lse_k, ent_k) if with_entropy else zt_k - lse_k
        m = lax.pmax(lax.stop_gradient(lse_k), vocab_axis)  # any m is exact; this one is safe
        lse = m + jnp.log(lax.psum(jnp.exp(lse_k - m), vocab_axis))
        logp = lax.psum(zt_k, vocab_axis) - lse
        if not with_entropy:
            return logp
        log_a = lse_k - lse  # log of the shard's probability mass
        ent = lax.psum(jnp.exp(log_a) * (ent_k - log_a), vocab_axis)
        return logp, ent

    # Pallas' interpreter evaluates the kernel body with unvarying constants next to varying
    # values, which the varying-axes check rejects; interpret mode runs unchecked (the
    # gradients are the same, see tests/test_kernels.py). Compiled paths keep the check.
    check_vma = True
    if impl == "pallas":
        _, _, interp = _resolve(impl, pallas_platform, interpret)
        check_vma = not interp
    out_spec = P(tok_spec)
    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(tok_spec, None), head_spec, P(tok_spec)),
        out_specs=(out_spec, out_spec) if with_entropy else out_spec, check_vma=check_vma)
    out = fn(hidden, lm_head, targets)
    if pad:
        out = tuple(x[:n] for x in out) if with_entropy else out[:n]
    return out
