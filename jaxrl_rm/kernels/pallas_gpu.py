"""Pallas GPU (Triton) kernels for token log-probs; `interpret=True` runs them on CPU in tests.

Why a separate flavour: Triton launches every grid program in parallel, so the sequential
"accumulate over the innermost grid axis in scratch" pattern of the Mosaic kernels does not
exist. Each program owns one output tile and loops over the other axis itself, flash-attention
style:

* forward   grid = token blocks; `fori_loop` over vocab blocks with the online max / sum-exp /
  entropy statistic and the target logit in registers (float32);
* d_hidden  grid = token blocks; loop over vocab blocks, recompute the logit block, `dz`,
  accumulate `dz @ W_j^T` into a float32 `[block_tokens, D]` tile;
* d_lm_head grid = vocab blocks; loop over token blocks, recompute, `dz`, accumulate
  `h_i^T @ dz` into a float32 `[D, block_vocab]` tile.

No atomics (deterministic), one recompute per backward product. Triton needs power-of-two
tiles: `block_tokens`, `block_vocab` are powers of two and `D` is padded to one inside the
kernel by masked loads (`other=0`); ragged `N` and `V` are masked the same way, and stores are
masked. The head is never copied. Each program keeps a `[block, D_pad]` tile, which suits
`D <= 2048`; `token_logprobs(impl="auto")` uses the chunked XLA path on GPU beyond that.
f32 inputs use full-precision dots (no TF32), bf16 inputs bf16 dots with float32 accumulation.
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
)

DEFAULT_BLOCK_TOKENS = 64
DEFAULT_BLOCK_VOCAB = 64
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _pow2(x: int) -> int:
    return max(16, pl.next_power_of_2(int(x)))


def _plan(n: int, v: int, d: int, block_tokens: int | None, block_vocab: int | None):
    bn = min(_pow2(block_tokens or DEFAULT_BLOCK_TOKENS), _pow2(n))
    bv = min(_pow2(block_vocab or DEFAULT_BLOCK_VOCAB), _pow2(v))
    return bn, bv, _pow2(d), pl.cdiv(n, bn), pl.cdiv(v, bv)


def _params(d_pad: int, interpret: bool):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=4 if d_pad <= 256 else 8, num_stages=2)


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(h, w, temperature, precision):
    z = _dot(h, w, _NN, precision)
    return z / temperature if temperature != 1.0 else z


# --------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(h_ref, w_ref, t_ref, lse_ref, zt_ref, *ent_ref, n, v, d, bn, bv, d_pad,
                temperature, with_entropy, precision):
    i = pl.program_id(0)
    rows = i * bn + jnp.arange(bn)
    row_ok = rows < n
    d_ok = jnp.arange(d_pad) < d
    h = plgpu.load(h_ref, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [bn, d_pad]
    t = plgpu.load(t_ref, mask=row_ok, other=-1)

    def body(j, carry):
        m, s, we, zt = carry
        cols = j * bv + jnp.arange(bv)
        col_ok = cols < v
        w = plgpu.load(w_ref.at[:, pl.ds(j * bv, bv)], mask=d_ok[:, None] & col_ok[None, :],
                       other=0.0)
        z = _logits(h, w, temperature, precision)
        z = jnp.where(col_ok[None, :], z, NEG)
        is_t = (cols[None, :] == t[:, None]) & col_ok[None, :]  # ids >= V must not hit padding
        zt = zt + jnp.sum(jnp.where(is_t, z, 0.0), axis=1)
        m, s, we = online_update(z, m, s, we, with_entropy=with_entropy)
        return m, s, we, zt

    # Per-row statistics are 1-D [bn] vectors (Triton-friendly), as in flash attention.
    vec = lambda x: jnp.full((bn,), x, jnp.float32)
    m, s, we, zt = lax.fori_loop(0, pl.cdiv(v, bv), body, (vec(NEG), vec(0.0), vec(0.0),
                                                           vec(0.0)))
    lse, ent = finalize(m, s, we, with_entropy=with_entropy)
    plgpu.store(lse_ref, lse, mask=row_ok)
    plgpu.store(zt_ref, zt, mask=row_ok)
    if with_entropy:
        plgpu.store(ent_ref[0], ent, mask=row_ok)


def forward(hidden, lm_head, targets, *, temperature: float = 1.0, with_entropy: bool = False,
            block_tokens: int | None = None, block_vocab: int | None = None,
            interpret: bool = False):
    """Statistics of the scaled logits with the Triton kernel.

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`; targets: `[N] int32`.

    Returns:
      `(lse, z_target, entropy or None)`, each `[N] float32`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    bn, bv, d_pad, gn, gv = _plan(n, v, d, block_tokens, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    n_out = 3 if with_entropy else 2
    vec = pl.BlockSpec((bn,), lambda i: (i,))
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, v=v, d=d, bn=bn, bv=bv, d_pad=d_pad,
                          temperature=temperature, with_entropy=with_entropy,
                          precision=precision),
        grid=(gn,),
        in_specs=[pl.BlockSpec((bn, d_pad), lambda i: (i, 0)),
                  pl.BlockSpec((d_pad, gv * bv), lambda i: (0, 0)),  # whole head, masked loads
                  vec],
        out_specs=[vec] * n_out,
        out_shape=[out_struct((n,), jnp.float32, hidden)] * n_out,
        compiler_params=_params(d_pad, interpret),
        interpret=interpret,
        name="token_logprobs_fwd",
    )(hidden, lm_head, targets.astype(jnp.int32))
    return out[0], out[1], (out[2] if with_entropy else None)


# --------------------------------------------------------------------------------------------
# backward


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, a_ref, b_ref, *rest, n, v, d, bn, bv, d_pad,
               temperature, has_c, precision):
    c_ref, dh_ref = rest if has_c else (None, rest[0])
    i = pl.program_id(0)
    row_ok = i * bn + jnp.arange(bn) < n
    d_ok = jnp.arange(d_pad) < d
    h = plgpu.load(h_ref, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    ld = lambda ref, other=0.0: plgpu.load(ref, mask=row_ok, other=other)  # [bn]
    t, lse, a, b = ld(t_ref, -1), ld(lse_ref), ld(a_ref), ld(b_ref)
    c = ld(c_ref) if has_c else None

    def body(j, acc):
        cols = j * bv + jnp.arange(bv)
        col_ok = cols < v
        w = plgpu.load(w_ref.at[:, pl.ds(j * bv, bv)], mask=d_ok[:, None] & col_ok[None, :],
                       other=0.0)
        z = _logits(h, w, temperature, precision)
        dz = logit_grad(z, cols[None, :] == t[:, None], lse, a, b, c)
        dz = jnp.where(col_ok[None, :], dz, 0.0)
        return acc + _dot(dz.astype(w.dtype), w, _NT, precision)

    acc = lax.fori_loop(0, pl.cdiv(v, bv), body, jnp.zeros((bn, d_pad), jnp.float32))
    plgpu.store(dh_ref, acc.astype(dh_ref.dtype), mask=row_ok[:, None] & d_ok[None, :])


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, a_ref, b_ref, *rest, n, v, d, bn, bv, d_pad,
               temperature, has_c, precision):
    c_ref, dw_ref = rest if has_c else (None, rest[0])
    j = pl.program_id(0)
    cols = j * bv + jnp.arange(bv)
    col_ok = cols < v
    d_ok = jnp.arange(d_pad) < d
    w = plgpu.load(w_ref, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [d_pad, bv]

    def body(i, acc):
        rows = pl.ds(i * bn, bn)
        row_ok = i * bn + jnp.arange(bn) < n
        h = plgpu.load(h_ref.at[rows, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        ld = lambda ref, other=0.0: plgpu.load(ref.at[rows], mask=row_ok, other=other)  # [bn]
        # Rows past N load a = b = c = 0, hence dz = 0: they add nothing.
        t, lse, a, b = ld(t_ref, -1), ld(lse_ref), ld(a_ref), ld(b_ref)
        c = ld(c_ref) if has_c else None
        z = _logits(h, w, temperature, precision)
        dz = logit_grad(z, cols[None, :] == t[:, None], lse, a, b, c)
        return acc + _dot(h, dz.astype(h.dtype), _TN, precision)

    acc = lax.fori_loop(0, pl.cdiv(n, bn), body, jnp.zeros((d_pad, bv), jnp.float32))
    plgpu.store(dw_ref, acc.astype(dw_ref.dtype), mask=d_ok[:, None] & col_ok[None, :])


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
    bn, bv, d_pad, gn, gv = _plan(n, v, d, block_tokens, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    has_c = c is not None
    side = [targets.astype(jnp.int32)] + [
        x.astype(jnp.float32) for x in ((lse, a, b, c) if has_c else (lse, a, b))]
    kw = {"n": n, "v": v, "d": d, "bn": bn, "bv": bv, "d_pad": d_pad,
          "temperature": temperature, "has_c": has_c, "precision": precision}

    d_hidden = pl.pallas_call(
        functools.partial(_dh_kernel, **kw),
        grid=(gn,),
        in_specs=[pl.BlockSpec((bn, d_pad), lambda i: (i, 0)),
                  pl.BlockSpec((d_pad, gv * bv), lambda i: (0, 0))]
        + [pl.BlockSpec((bn,), lambda i: (i,))] * len(side),
        out_specs=pl.BlockSpec((bn, d_pad), lambda i: (i, 0)),
        out_shape=out_struct((n, d), hidden.dtype, hidden),
        compiler_params=_params(d_pad, interpret),
        interpret=interpret,
        name="token_logprobs_bwd_dhidden",
    )(hidden, lm_head, *side)

    d_lm_head = pl.pallas_call(
        functools.partial(_dw_kernel, **kw),
        grid=(gv,),
        in_specs=[pl.BlockSpec((gn * bn, d_pad), lambda j: (0, 0)),
                  pl.BlockSpec((d_pad, bv), lambda j: (0, j))]
        + [pl.BlockSpec((gn * bn,), lambda j: (0,))] * len(side),
        out_specs=pl.BlockSpec((d_pad, bv), lambda j: (0, j)),
        out_shape=out_struct((d, v), lm_head.dtype, hidden),
        compiler_params=_params(d_pad, interpret),
        interpret=interpret,
        name="token_logprobs_bwd_dlmhead",
    )(hidden, lm_head, *side)
    return d_hidden, d_lm_head
