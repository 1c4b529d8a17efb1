"""Pallas GPU (Triton) kernels for token log-probs; `interpret=True` runs them on CPU in tests.

Notation: `N` tokens, `D` hidden size, `V` vocab; tiles `bn` (tokens), `bv` (vocab), `bd`
(hidden); `gn = cdiv(N, bn)`, `gv = cdiv(V, bv)`, `gd = cdiv(D, bd)`; NDV = N * D * V.

Why this shape: a Triton program holds its working set in registers and shared memory (227 KiB
per block on H100 / H200), and all programs of a grid run in parallel: there is no sequential
"accumulate over the innermost grid axis" as in the Mosaic kernels. So every program owns one
`[bn, bv]` float32 logits tile and loops over `D` itself in `bd` chunks, like a GEMM tile
(`acc += h[i, k] @ W[k, j]`, masked loads, `num_stages` software pipelining of the chunk
loads). Nothing a program keeps depends on `D`: the float32 `[bn, bv]` accumulator, one
`[bn, bd]` hidden chunk and one `[bd, bv]` head chunk per pipeline stage, `[bn]` row statistics.

Forward, `forward()`: grid `(gn, S)`. Program `(i, s)` takes token block `i` and the `s`-th of
`S` contiguous ranges of vocab blocks; it loops over its vocab blocks (`fori_loop`) and, for
each, over `D` (inner `fori_loop`), then folds the tile into an online max / sum-exp / entropy
statistic and the target logit (float32 `[bn]` vectors, `_math.online_update`). It writes the
partial statistics of its range; XLA merges the `S` partials (`_merge`, exact, `O(S N)`). Why
the split: with `gn` programs alone a 4096-token call would be 32 programs on 132 SMs; `S` makes
`gn S ~ TARGET_PROGRAMS` (several waves, a small last one). Programs launched together share
`s` (the token axis is the fastest launch axis), so they read the same head columns from L2.

Backward, `backward()`: one logits recompute feeds both gradients. The vocab is cut into slabs of
`Vc` columns (`slab_width`: a multiple of `bv`, the `[N, Vc]` dz slab and the float32
`[D, Vc]` d_lm_head product each within `SLAB_BYTES`); per slab:

* `_dz_kernel`, grid `(gn, cdiv(Vc, bv))`, one `[bn, bv]` tile per program with the same `D`
  loop, then `dz = a [col == t] + p (b + c y)` (`_math.logit_grad`), stored in the input dtype
  (the old kernels also fed dz to their dots in the input dtype);
* `d_hidden += dz @ W_slab^T` (float32 `[N, D]` accumulator across slabs) and
  `d_lm_head[:, slab] = hidden^T @ dz`: two plain GEMMs left to XLA (cuBLAS, tensor cores,
  float32 accumulation).

Why not all in Triton: `d_hidden[i]` sums over the whole vocab and `d_lm_head[:, j]` over all
tokens, so after one recompute of an `(i, j)` tile one of the two sums crosses programs. The
options (backward FLOPs in NDV; `Dc` a bounded D chunk; det. = deterministic):

| backward layout                                       | FLOPs   | smem  | det. | extra HBM       |
|-------------------------------------------------------|---------|-------|------|-----------------|
| old: `[bn, D]`, `[D, bv]` accumulators, no D loop     | 8       | ~ D   | yes  | -               |
| `[bn, Dc]` / `[Dc, bv]` grad tiles, logits per chunk  | 4D/Dc+4 | fixed | yes  | -               |
| per-vocab-block partials of d_hidden, summed by XLA   | 6       | fixed | yes  | gv x f32 [N, D] |
| atomic adds into f32 d_hidden / d_lm_head (as CCE)    | 6       | fixed | no   | f32 [D, V]      |
| two kernels, each read-modify-writing its rows in HBM | 8       | fixed | yes  | f32 [D, V]      |
| **dz slab + XLA GEMMs (this module)**                 | **6**   | fixed | yes  | [N, Vc] dz      |

(The last four also keep a float32 `[N, D]` d_hidden accumulator.) The slab costs one write and
two reads of each dz element (~6 bytes at bf16) against `6 D` FLOPs on it: `D` FLOP per byte,
>= 896 here, far above an H100/H200's ~300 FLOP/byte balance point. It needs no atomics (run to
run reproducible as far as XLA's GEMMs are), keeps no float32 `[D, V]` buffer, and runs 4 of
the 6 NDV as large GEMMs (`[N, Vc] x [Vc, D]`, `[D, N] x [N, Vc]`) on cuBLAS. On GPU `hidden^T`
is not copied (cuBLAS reads the transposed operand); in interpret mode (XLA:CPU has no bf16
"TN" dot kernel) it is materialised once, as in chunked.py.

FLOPs (`FLOPS_PER_NDV`, a multiply-add counts 2): forward 2 NDV (one `[bn, bd] x [bd, bv]` dot
per chunk step); backward 2 NDV logits recompute + 2 NDV d_hidden + 2 NDV d_lm_head = 6 NDV;
8 NDV in all (the old two-kernel backward recomputed the logits twice: 10). Ragged tiles add
only masked padding work.

Per-program footprint of either kernel at the default tiles (`footprint()`; it does not depend
on D, the column is there to show it). `pipeline` = `num_stages` (3) x (hidden chunk + head
chunk); `epilogue` = an upper bound of the scratch a layout conversion or row reduction of the
float32 `[bn, bv]` tile takes; `acc regs` = the float32 accumulator (64 KiB) in 32-bit registers
per thread at 8 warps; `limit` = shared memory per block on H100 / H200 (`SMEM_LIMIT_BYTES`):

| D        | dtype | bn x bv x bd   | pipeline | epilogue | smem    | acc regs    | limit   |
|----------|-------|----------------|----------|----------|---------|-------------|---------|
| 896      | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 1536     | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 2048     | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 3584     | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 4096     | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 8192     | bf16  | 128 x 128 x 64 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |
| 896-8192 | f32   | 128 x 128 x 32 | 96 KiB   | 64 KiB   | 160 KiB | 64 / thread | 227 KiB |

The old kernels kept `[bn, D_pad]` / `[D_pad, bv]` tiles and float32 `[bn, D_pad]` /
`[D_pad, bv]` accumulators: ~384 KiB at bf16, D 1024, two stages. `tests/test_kernels_gpu.py`
lowers the kernels for CUDA at D 896-8192 x V 32000-151936 x bf16 / float32 and reads the
Triton IR back: no tensor larger than one `[bn, bv]` tile, none sized by `D`, one
`[bn, bd] x [bd, bv]` dot. Lowering runs Pallas' Triton lowering rules, not the Triton
compiler: the smem figures are the estimate above, not a compiler report.

Other choices:

* Tiles `bn = bv = 128`: 128 FLOP per head byte and 64 per byte of both operands at bf16, 2x
  the old 64 x 64 tiles (operands mostly come from L2: concurrent programs share hidden rows and
  head columns); the tile size Triton's Hopper wgmma path is built for. `bd` = 128 bytes of a
  row (64 at bf16, 32 at float32: the same smem per stage for both dtypes; `block_hidden`, a
  keyword of `forward` / `backward`, overrides it). `num_warps = 8`, `num_stages = 3`.
* Powers of two (Triton's rule), clamped to the problem (`>= 16`, the minimum dot size);
  ragged `N`, `V`, `D` are masked loads (`other=0`) and masked stores (masks only where the
  edge is ragged); padding logit columns are `NEG` before the online statistics. The kernels
  never copy, pad or transpose the head or the hidden; the backward slices one `[D, Vc]` head
  slab per slab for its GEMMs.
* Offsets are int32 in the Triton kernels: `N D` and `D V` must stay below 2^31 elements
  (checked; D 8192 x V 151936 is 1.2e9).
* Precision: bf16 operands, float32 accumulation (tensor cores). float32 operands use IEEE dots
  (`Precision.HIGHEST`, CUDA cores, no TF32): TF32 would move log-probs by ~1e-3 and the library
  keeps float32 log-probs exact. float32 on GPU is therefore the slow path (~1/15 of the bf16
  rate on an H100); bf16 compute (`logprobs.py` casts the head to the hidden's dtype first) is
  the production dtype. The backward's XLA GEMMs get the same precision.
* Unmeasured: the tiles, `TARGET_PROGRAMS` and `SLAB_BYTES` are reasoned, not tuned: no GPU has
  run this code yet (see docs/accelerators.md).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxrl_rm.kernels._math import (
    NEG,
    finalize,
    logit_grad,
    matmul_precision,
    online_update,
    out_struct,
    vary_like,
)

DEFAULT_BLOCK_TOKENS = 128
DEFAULT_BLOCK_VOCAB = 128
# bd = this many bytes of a row per chunk: 64 bf16 / 32 float32 elements.
DEFAULT_BLOCK_HIDDEN_BYTES = 128
NUM_WARPS = 8
NUM_STAGES = 3
# Forward: split the vocab so that about this many programs run (132 SMs, one program each at
# this footprint: ~8 waves, so the last partial wave costs little).
TARGET_PROGRAMS = 1024
# Backward: the dz slab ([N, Vc] in the input dtype) and the float32 [D, Vc] d_lm_head product
# each stay within this many bytes.
SLAB_BYTES = 128 * 2**20
# Shared memory one block may use on H100 / H200 (sm_90: 227 KiB opt-in per block).
SMEM_LIMIT_BYTES = 227 * 1024
# Matmul FLOPs in units of N*D*V (a multiply-add counts 2): forward logits; backward one logits
# recompute + d_hidden + d_lm_head. benchmarks/logprob.py reports these.
FLOPS_PER_NDV = {"forward": 2, "backward": 6}

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _pow2(x: int) -> int:
    """Smallest power of two >= x, at least 16 (Triton's minimum dot dimension)."""
    return max(16, pl.next_power_of_2(int(x)))


def _tiles(n: int, v: int, d: int, itemsize: int, block_tokens, block_vocab, block_hidden):
    """`(bn, bv, bd)`: the requested (or default) tiles as powers of two, clamped to the problem."""
    bn = min(_pow2(block_tokens or DEFAULT_BLOCK_TOKENS), _pow2(n))
    bv = min(_pow2(block_vocab or DEFAULT_BLOCK_VOCAB), _pow2(v))
    bd = min(_pow2(block_hidden or DEFAULT_BLOCK_HIDDEN_BYTES // itemsize), _pow2(d))
    return bn, bv, bd


def _check_index_range(n: int, d: int, v: int):
    """Triton's pointer offsets here are int32: `N D` and `D V` elements must stay below 2^31
    (D 8192 x V 151936 is 1.2e9; 262144 tokens x D 8192 would not be). Split the tokens (a
    mesh, or smaller micro-batches) or use `impl="chunked"` beyond."""
    if max(n * d, d * v) >= 2**31:
        raise ValueError(f"pallas_gpu: [N={n}, D={d}] / [D={d}, V={v}] exceed int32 offsets "
                         "(2^31 elements); shard the tokens or use impl='chunked'")


def footprint(bn: int, bv: int, bd: int, itemsize: int, num_stages: int = NUM_STAGES,
              num_warps: int = NUM_WARPS) -> dict:
    """Estimated per-program resources of either kernel (bytes), independent of D.

    `pipeline_smem`: `num_stages` buffers of one `[bn, bd]` hidden chunk and one `[bd, bv]` head
    chunk; `epilogue_smem`: an upper bound of the scratch a layout conversion or row reduction of
    the float32 `[bn, bv]` tile takes; `acc_regs_per_thread`: 32-bit registers of the float32
    accumulator per thread.
    """
    pipeline = num_stages * (bn * bd + bd * bv) * itemsize
    epilogue = bn * bv * 4
    return {"pipeline_smem": pipeline, "epilogue_smem": epilogue,
            "smem": pipeline + epilogue, "acc_bytes": bn * bv * 4,
            "acc_regs_per_thread": bn * bv // (32 * num_warps)}


def _params(interpret: bool):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask(rows, cols, shape):
    """`rows[:, None] & cols[None, :]` broadcast to `shape`; either may be None (all True);
    None when both are (an unmasked load / store)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return jnp.broadcast_to(cols[None, :], shape)
    if cols is None:
        return jnp.broadcast_to(rows[:, None], shape)
    return rows[:, None] & cols[None, :]


def _logits_tile(h_ref, w_ref, r0, c0, row_ok, col_ok, *, d, bn, bv, bd, temperature,
                 precision):
    """`h[r0:r0+bn] @ W[:, c0:c0+bv] / T` -> `[bn, bv] float32`, looping over D in `bd` chunks.

    `row_ok` / `col_ok` (`[bn]` / `[bv]` bool, or None when the edge is not ragged) mask the
    loads, so out-of-range rows / columns read 0; a ragged last D chunk is masked the same way.
    """
    ragged_d = d % bd != 0

    def chunk(k, acc):
        k0 = pl.multiple_of(k * bd, bd)
        d_ok = (k0 + jnp.arange(bd) < d) if ragged_d else None
        h_mask = _mask(row_ok, d_ok, (bn, bd))
        w_mask = _mask(d_ok, col_ok, (bd, bv))
        h = plgpu.load(h_ref.at[pl.ds(r0, bn), pl.ds(k0, bd)], mask=h_mask,
                       other=None if h_mask is None else 0.0)
        w = plgpu.load(w_ref.at[pl.ds(k0, bd), pl.ds(c0, bv)], mask=w_mask,
                       other=None if w_mask is None else 0.0)
        return acc + _dot(h, w, _NN, precision)

    z = lax.fori_loop(0, pl.cdiv(d, bd), chunk, jnp.zeros((bn, bv), jnp.float32))
    return z / temperature if temperature != 1.0 else z


# --------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(h_ref, w_ref, t_ref, m_ref, s_ref, zt_ref, *e_ref, n, v, d, bn, bv, bd,
                per_split, temperature, with_entropy, precision):
    i, sp = pl.program_id(0), pl.program_id(1)
    r0 = pl.multiple_of(i * bn, bn)
    row_ok = (r0 + jnp.arange(bn) < n) if n % bn else None
    t = plgpu.load(t_ref, mask=row_ok, other=None if row_ok is None else -1)  # [bn]
    j_lo = sp * per_split
    j_hi = jnp.minimum(j_lo + per_split, pl.cdiv(v, bv))

    def body(j, carry):
        m, s, we, zt = carry
        c0 = pl.multiple_of(j * bv, bv)
        cols = c0 + jnp.arange(bv)
        col_ok = (cols < v) if v % bv else None
        z = _logits_tile(h_ref, w_ref, r0, c0, row_ok, col_ok, d=d, bn=bn, bv=bv, bd=bd,
                         temperature=temperature, precision=precision)
        is_t = cols[None, :] == t[:, None]
        if col_ok is not None:  # padding columns: no probability mass, never the target
            z = jnp.where(col_ok[None, :], z, NEG)
            is_t = is_t & col_ok[None, :]
        zt = zt + jnp.sum(jnp.where(is_t, z, 0.0), axis=1)
        m, s, we = online_update(z, m, s, we, with_entropy=with_entropy)
        return m, s, we, zt

    # Per-row statistics are 1-D [bn] vectors (Triton-friendly), as in flash attention.
    vec = lambda x: jnp.full((bn,), x, jnp.float32)
    m, s, we, zt = lax.fori_loop(j_lo, j_hi, body, (vec(NEG), vec(0.0), vec(0.0), vec(0.0)))
    # Flat, padded [S * gn * bn] outputs: every program stores one whole in-bounds block.
    plgpu.store(m_ref, m)
    plgpu.store(s_ref, s)
    plgpu.store(zt_ref, zt)
    if with_entropy:
        plgpu.store(e_ref[0], we)


def _merge(m, s, we, zt, *, with_entropy: bool):
    """Merge `[S, N]` partial statistics of disjoint vocab ranges into `[N]` ones (exact):
    `m = max_s m_s`, `s = sum_s e^(m_s - m) s_s`, `w = sum_s e^(m_s - m) (w_s + (m_s - m) s_s)`.
    An empty range (`m_s = NEG`, `s_s = w_s = 0`) contributes 0."""
    m_all = jnp.max(m, axis=0)
    alpha = jnp.exp(m - m_all)
    s_all = jnp.sum(alpha * s, axis=0)
    we_all = jnp.sum(alpha * (we + (m - m_all) * s), axis=0) if with_entropy else None
    return m_all, s_all, we_all, jnp.sum(zt, axis=0)


def forward(hidden, lm_head, targets, *, temperature: float = 1.0, with_entropy: bool = False,
            block_tokens: int | None = None, block_vocab: int | None = None,
            block_hidden: int | None = None, interpret: bool = False):
    """Statistics of the scaled logits with the Triton kernel (grid `(gn, S)`, see the module).

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`, same dtype; targets: `[N] int32`.
      block_tokens, block_vocab, block_hidden: tiles `bn`, `bv`, `bd` (rounded up to powers of
        two, clamped to the problem); None = 128, 128, 128 bytes.

    Returns:
      `(lse, z_target, entropy or None)`, each `[N] float32`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    _check_index_range(n, d, v)
    bn, bv, bd = _tiles(n, v, d, hidden.dtype.itemsize, block_tokens, block_vocab,
                        block_hidden)
    gn, gv, gd = pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(d, bd)
    per_split = pl.cdiv(gv, min(gv, max(1, pl.cdiv(TARGET_PROGRAMS, gn))))
    splits = pl.cdiv(gv, per_split)  # no empty range
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    whole = lambda *shape: pl.BlockSpec(shape, lambda i, s: (0,) * len(shape))
    flat = pl.BlockSpec((bn,), lambda i, s: (s * gn + i,))
    n_out = 4 if with_entropy else 3
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, v=v, d=d, bn=bn, bv=bv, bd=bd,
                          per_split=per_split, temperature=temperature,
                          with_entropy=with_entropy, precision=precision),
        grid=(gn, splits),
        # Whole arrays (shapes rounded up to whole tiles, which only interpret mode
        # materialises by padding); the kernel loads tiles itself with masks.
        in_specs=[whole(gn * bn, gd * bd), whole(gd * bd, gv * bv),
                  pl.BlockSpec((bn,), lambda i, s: (i,))],
        out_specs=[flat] * n_out,
        out_shape=[out_struct((splits * gn * bn,), jnp.float32, hidden)] * n_out,
        compiler_params=_params(interpret),
        interpret=interpret,
        name="token_logprobs_fwd",
    )(hidden, lm_head, targets.astype(jnp.int32))
    parts = [x.reshape(splits, gn * bn)[:, :n] for x in out]  # [S, N] each
    we = parts[3] if with_entropy else None
    m, s, we, zt = _merge(parts[0], parts[1], we, parts[2], with_entropy=with_entropy)
    lse, ent = finalize(m, s, we, with_entropy=with_entropy)
    return lse, zt, ent


# --------------------------------------------------------------------------------------------
# backward


def _dz_kernel(h_ref, w_ref, t_ref, lse_ref, a_ref, b_ref, *rest, n, v, d, bn, bv, bd,
               temperature, has_c, precision):
    c_ref, dz_ref = rest if has_c else (None, rest[0])
    i, j = pl.program_id(0), pl.program_id(1)
    r0 = pl.multiple_of(i * bn, bn)
    c0 = pl.multiple_of(j * bv, bv)
    cols = c0 + jnp.arange(bv)
    row_ok = (r0 + jnp.arange(bn) < n) if n % bn else None
    col_ok = (cols < v) if v % bv else None
    z = _logits_tile(h_ref, w_ref, r0, c0, row_ok, col_ok, d=d, bn=bn, bv=bv, bd=bd,
                     temperature=temperature, precision=precision)
    ld = lambda ref, other=0.0: plgpu.load(  # [bn]; rows past N are never stored
        ref, mask=row_ok, other=None if row_ok is None else other)
    t, lse, a, b = ld(t_ref, -1), ld(lse_ref), ld(a_ref), ld(b_ref)
    c = ld(c_ref) if has_c else None
    dz = logit_grad(z, cols[None, :] == t[:, None], lse, a, b, c)
    plgpu.store(dz_ref, dz.astype(dz_ref.dtype), mask=_mask(row_ok, col_ok, (bn, bv)))


def _dz_slab(hidden, w_slab, targets, side, *, bn, bv, bd, temperature, precision, interpret):
    """`dz [N, Vc]` (the input dtype) of one head slab `w_slab [D, Vc]`; `targets` already
    shifted to the slab's columns (ids outside `[0, Vc)` match none)."""
    n, d = hidden.shape
    v = w_slab.shape[1]
    bv = min(bv, _pow2(v))
    gn, gv, gd = pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(d, bd)
    has_c = len(side) == 4
    whole = lambda *shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_dz_kernel, n=n, v=v, d=d, bn=bn, bv=bv, bd=bd,
                          temperature=temperature, has_c=has_c, precision=precision),
        grid=(gn, gv),
        in_specs=[whole(gn * bn, gd * bd), whole(gd * bd, gv * bv)]
        + [pl.BlockSpec((bn,), lambda i, j: (i,))] * (1 + len(side)),
        out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
        out_shape=out_struct((n, v), hidden.dtype, hidden),
        compiler_params=_params(interpret),
        interpret=interpret,
        name="token_logprobs_bwd_dz",
    )(hidden, w_slab, targets, *side)


def slab_width(n: int, d: int, v: int, bv: int, itemsize: int) -> int:
    """Vocab columns per backward slab: a multiple of `bv` with `N Vc itemsize` (dz) and
    `D Vc 4` (the float32 d_lm_head product) within `SLAB_BYTES`; `V` when it all fits."""
    vc = max(bv, SLAB_BYTES // max(n * itemsize, d * 4) // bv * bv)
    return v if vc >= v else vc


def backward(hidden, lm_head, targets, lse, a, b, c, *, temperature: float = 1.0,
             block_tokens: int | None = None, block_vocab: int | None = None,
             block_hidden: int | None = None, interpret: bool = False):
    """`d_hidden`, `d_lm_head` for `dz = a [j == t] + p (b + c y)` (coefficients as in `_math`).

    Per vocab slab (`slab_width`): the `_dz_kernel` tiles, then `d_hidden += dz @ W_slab^T`
    (float32 accumulator) and `d_lm_head[:, slab] = hidden^T @ dz` as XLA GEMMs (module doc).

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`, same dtype; targets: `[N] int32`; lse: `[N] float32`;
      a, b: `[N] float32`; c: `[N] float32` or None; already divided by the temperature.
      block_tokens, block_vocab, block_hidden: tiles, as in `forward`.

    Returns:
      `(d_hidden [N, D] hidden.dtype, d_lm_head [D, V] lm_head.dtype)`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    itemsize = hidden.dtype.itemsize
    _check_index_range(n, d, v)
    bn, bv, bd = _tiles(n, v, d, itemsize, block_tokens, block_vocab, block_hidden)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    targets = targets.astype(jnp.int32)
    side = tuple(x.astype(jnp.float32) for x in ((lse, a, b, c) if c is not None else (lse, a, b)))
    # XLA:CPU (interpret mode) has no bf16 "TN" dot kernel, so there hidden^T is materialised
    # behind a barrier (see chunked.py); cuBLAS takes the transposed operand as it is.
    h_t = lax.optimization_barrier(hidden.T) if interpret else None

    def slab(off, w_s):
        """`(dz @ w_s^T float32 [N, D], hidden^T @ dz [D, Vc] lm_head.dtype)` of one slab."""
        dz = _dz_slab(hidden, w_s, targets - off, side, bn=bn, bv=bv, bd=bd,
                      temperature=temperature, precision=precision, interpret=interpret)
        dh = _dot(dz, w_s, _NT, precision)
        dw = (_dot(h_t, dz, _NN, precision) if interpret
              else _dot(hidden, dz, _TN, precision))
        return dh, dw.astype(lm_head.dtype)

    vc = slab_width(n, d, v, bv, itemsize)
    if vc == v:  # one slab: no loop, no accumulator, no head slice
        dh, dw = slab(0, lm_head)
        return dh.astype(hidden.dtype), dw
    n_full, tail = divmod(v, vc)

    def step(k, carry):
        dh, dw = carry
        off = k * vc
        dh_k, dw_k = slab(off, lax.dynamic_slice_in_dim(lm_head, off, vc, axis=1))
        return dh + dh_k, lax.dynamic_update_slice_in_dim(dw, dw_k, off, axis=1)

    zeros = lambda shape, dtype: vary_like(jnp.zeros(shape, dtype), hidden, lm_head, *side)
    dh, dw = lax.fori_loop(0, n_full, step, (zeros((n, d), jnp.float32),
                                             zeros((d, v), lm_head.dtype)))
    if tail:
        off = n_full * vc
        dh_k, dw_k = slab(off, lm_head[:, off:])
        dh = dh + dh_k
        dw = lax.dynamic_update_slice_in_dim(dw, dw_k, off, axis=1)
    return dh.astype(hidden.dtype), dw
