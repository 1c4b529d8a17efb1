"""Pallas TPU (Mosaic) kernels for token log-probs: forward statistics and the two backward
products. On a CPU backend they run with `interpret=True` (that is how the tests run them).

Why kernels: on TPU the chunked XLA loop round-trips every `[block_tokens, block_vocab]` block
of logits through HBM several times (logits, exp, dz); a kernel keeps the block in VMEM, feeds
the MXU from VMEM and only writes `[N]` statistics (forward) or the gradient tiles (backward).

Grids (the innermost grid axis is the sequential, "arbitrary" one on TPU):

* forward  `(token blocks, vocab blocks)`: online max / sum-exp / entropy statistic and the
  target logit in float32 VMEM scratch; written on the last vocab block.
* d_hidden `(token blocks, vocab blocks)`: recompute the logit block, `dz`, and accumulate
  `dz @ W_j^T` in a float32 `[block_tokens, D]` scratch.
* d_lm_head `(vocab blocks, token blocks)`: recompute, `dz`, accumulate `h_i^T @ dz` in a float32
  `[D, block_vocab]` scratch. Two backward kernels (one recompute each) keep every output
  tile owned by one grid row: no atomics, deterministic.

Blocks are Mosaic-friendly: `block_tokens` a multiple of 8 (16 for bf16) and `block_vocab` a
multiple of 128, or the full dimension. `N` and `V` need not be multiples: the last blocks
read out of bounds (unspecified values, NaN in interpret mode), so the kernels mask rows and
columns with `where` (never a multiply, which would let NaN through) and out-of-bounds writes
are dropped. The head is passed as is: no padded, transposed or cast copy of it is made.
Matmuls take the input dtype (bf16 on the MXU) and accumulate in float32; all statistics
are float32.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxrl_rm.kernels._math import (
    NEG,
    finalize,
    logit_grad,
    matmul_precision,
    online_update,
    out_struct,
)

DEFAULT_BLOCK_TOKENS = 256
DEFAULT_BLOCK_VOCAB = 512
_NT = (((1,), (1,)), ((), ()))  # a [n, v] . b [D, v] -> [n, D]
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))  # a [n, D] . b [n, v] -> [D, v]


def _round_block(block: int, full: int, multiple: int) -> int:
    """A legal Mosaic block: the full dim if it fits, else a multiple of `multiple`."""
    if block >= full:
        return full
    return max(multiple, block // multiple * multiple)


def _plan(n: int, v: int, d: int, dtype, block_tokens: int | None, block_vocab: int | None):
    sub = 8 * (4 // jnp.dtype(dtype).itemsize)  # sublane packing: 8 rows f32, 16 rows bf16
    if block_vocab is None:
        block_vocab = DEFAULT_BLOCK_VOCAB if d <= 2048 else 256
    bn = _round_block(block_tokens or DEFAULT_BLOCK_TOKENS, n, sub)
    bv = _round_block(block_vocab, v, 128)
    return bn, bv, pl.cdiv(n, bn), pl.cdiv(v, bv)


def _compiler_params(semantics, vmem_bytes: int, interpret: bool):
    if interpret:
        return None
    limit = None
    if vmem_bytes > 12 * 2**20:  # above the default scoped VMEM, ask for what we need
        limit = int(min(vmem_bytes * 1.5 + 4 * 2**20, 100 * 2**20))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _logits(h, w, temperature, precision):
    z = lax.dot_general(h, w, _NN, precision=precision, preferred_element_type=jnp.float32)
    return z / temperature if temperature != 1.0 else z


# --------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(h_ref, w_ref, t_ref, lse_ref, zt_ref, *rest, v: int, bv: int,
                temperature: float, with_entropy: bool, precision):
    if with_entropy:
        ent_ref, m_sc, s_sc, w_sc, zt_sc = rest
    else:
        m_sc, s_sc, zt_sc = rest
        ent_ref = w_sc = None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        zt_sc[...] = jnp.zeros(zt_sc.shape, jnp.float32)
        if with_entropy:
            w_sc[...] = jnp.zeros(w_sc.shape, jnp.float32)

    z = _logits(h_ref[...], w_ref[...], temperature, precision)  # [bn, bv] f32
    cols = j * bv + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    is_t = cols == t_ref[...]
    if v % bv:  # out-of-bounds columns (a target id >= V, e.g. another vocab shard's, hits them)
        valid = cols < v
        z = jnp.where(valid, z, NEG)
        is_t = is_t & valid
    zt_sc[...] += jnp.sum(jnp.where(is_t, z, 0.0), axis=1, keepdims=True)
    m, s, we = online_update(z, m_sc[...], s_sc[...], w_sc[...] if with_entropy else None,
                             with_entropy=with_entropy)
    m_sc[...] = m
    s_sc[...] = s
    if with_entropy:
        w_sc[...] = we

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        lse, ent = finalize(m_sc[...], s_sc[...], w_sc[...] if with_entropy else None,
                            with_entropy=with_entropy)
        lse_ref[...] = lse
        zt_ref[...] = zt_sc[...]
        if with_entropy:
            ent_ref[...] = ent


def forward(hidden, lm_head, targets, *, temperature: float = 1.0, with_entropy: bool = False,
            block_tokens: int | None = None, block_vocab: int | None = None,
            interpret: bool = False):
    """Statistics of the scaled logits with the Mosaic kernel.

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`; targets: `[N] int32`.

    Returns:
      `(lse, z_target, entropy or None)`, each `[N] float32`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    bn, bv, gn, gv = _plan(n, v, d, hidden.dtype, block_tokens, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    n_out = 3 if with_entropy else 2
    n_scratch = 4 if with_entropy else 3
    isz = jnp.dtype(hidden.dtype).itemsize
    vmem = 2 * isz * (bn * d + d * bv) + 3 * 4 * bn * bv
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, v=v, bv=bv, temperature=temperature,
                          with_entropy=with_entropy, precision=precision),
        grid=(gn, gv),
        in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                  row],
        out_specs=[row] * n_out,
        out_shape=[out_struct((n, 1), jnp.float32, hidden)] * n_out,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * n_scratch,
        compiler_params=_compiler_params(("parallel", "arbitrary"), vmem, interpret),
        interpret=interpret,
        name="token_logprobs_fwd",
    )(hidden, lm_head, targets.astype(jnp.int32)[:, None])
    lse, zt = out[0][:, 0], out[1][:, 0]
    return lse, zt, (out[2][:, 0] if with_entropy else None)


# --------------------------------------------------------------------------------------------
# backward


def _block_dz(h, w, t_ref, lse_ref, a_ref, b_ref, c_ref, cols, temperature, precision):
    z = _logits(h, w, temperature, precision)
    return logit_grad(z, cols == t_ref[...], lse_ref[...], a_ref[...], b_ref[...],
                      None if c_ref is None else c_ref[...])


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, a_ref, b_ref, *rest, v: int, bv: int,
               temperature: float, has_c: bool, precision):
    if has_c:
        c_ref, dh_ref, acc = rest
    else:
        (dh_ref, acc), c_ref = rest, None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    w = w_ref[...]
    cols = j * bv + lax.broadcasted_iota(jnp.int32, (h_ref.shape[0], bv), 1)
    dz = _block_dz(h_ref[...], w, t_ref, lse_ref, a_ref, b_ref, c_ref, cols, temperature,
                   precision)
    if v % bv:  # out-of-bounds columns: zero dz, and zero W (0 * NaN would still be NaN)
        dz = jnp.where(cols < v, dz, 0.0)
        wcols = j * bv + lax.broadcasted_iota(jnp.int32, w.shape, 1)
        w = jnp.where(wcols < v, w, jnp.zeros_like(w))
    acc[...] += lax.dot_general(dz.astype(w.dtype), w, _NT, precision=precision,
                                preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, a_ref, b_ref, *rest, n: int, bn: int, bv: int,
               temperature: float, has_c: bool, precision):
    if has_c:
        c_ref, dw_ref, acc = rest
    else:
        (dw_ref, acc), c_ref = rest, None
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    h = h_ref[...]
    cols = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    dz = _block_dz(h, w_ref[...], t_ref, lse_ref, a_ref, b_ref, c_ref, cols, temperature,
                   precision)
    if n % bn:  # out-of-bounds rows: zero dz (its inputs are garbage) and zero h
        rows = i * bn + lax.broadcasted_iota(jnp.int32, (bn, bv), 0)
        dz = jnp.where(rows < n, dz, 0.0)
        hrows = i * bn + lax.broadcasted_iota(jnp.int32, h.shape, 0)
        h = jnp.where(hrows < n, h, jnp.zeros_like(h))
    acc[...] += lax.dot_general(h, dz.astype(h.dtype), _TN, precision=precision,
                                preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _done():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def backward(hidden, lm_head, targets, lse, a, b, c, *, temperature: float = 1.0,
             block_tokens: int | None = None, block_vocab: int | None = None,
             interpret: bool = False):
    """`d_hidden`, `d_lm_head` for `dz = a [j == t] + p (b + c y)` (coefficients as in `_math`).

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`; targets: `[N] int32`; lse: `[N] float32`;
      a, b: `[N] float32`; c: `[N] float32` or None; already divided by the temperature.

    Returns:
      `(d_hidden [N, D] hidden.dtype, d_lm_head [D, V] lm_head.dtype)`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    bn, bv, gn, gv = _plan(n, v, d, hidden.dtype, block_tokens, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    has_c = c is not None
    side = [targets.astype(jnp.int32)[:, None]] + [
        x.astype(jnp.float32)[:, None] for x in ((lse, a, b, c) if has_c else (lse, a, b))]
    isz = jnp.dtype(hidden.dtype).itemsize
    kw = {"bv": bv, "temperature": temperature, "has_c": has_c, "precision": precision}

    # d_hidden: grid (token blocks, vocab blocks), vocab innermost.
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    vmem = 2 * isz * (2 * bn * d + d * bv) + 4 * bn * d + 3 * 4 * bn * bv
    d_hidden = pl.pallas_call(
        functools.partial(_dh_kernel, v=v, **kw),
        grid=(gn, gv),
        in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, bv), lambda i, j: (0, j))] + [row] * len(side),
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=out_struct((n, d), hidden.dtype, hidden),
        scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "arbitrary"), vmem, interpret),
        interpret=interpret,
        name="token_logprobs_bwd_dhidden",
    )(hidden, lm_head, *side)

    # d_lm_head: grid (vocab blocks, token blocks), tokens innermost.
    row = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
    vmem = 2 * isz * (bn * d + 2 * d * bv) + 4 * d * bv + 3 * 4 * bn * bv
    d_lm_head = pl.pallas_call(
        functools.partial(_dw_kernel, n=n, bn=bn, **kw),
        grid=(gv, gn),
        in_specs=[pl.BlockSpec((bn, d), lambda j, i: (i, 0)),
                  pl.BlockSpec((d, bv), lambda j, i: (0, j))] + [row] * len(side),
        out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        out_shape=out_struct((d, v), lm_head.dtype, hidden),
        scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "arbitrary"), vmem, interpret),
        interpret=interpret,
        name="token_logprobs_bwd_dlmhead",
    )(hidden, lm_head, *side)
    return d_hidden, d_lm_head
