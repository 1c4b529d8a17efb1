"""Chunked token log-probs in pure JAX: stream over vocab blocks (outer) and token blocks (inner).

Why: the dense path materialises `[N, V]` logits (2.5 GB for 4096 tokens of a 152k vocab in
float32) and autodiff keeps several such buffers alive. Here only one `[block_tokens,
block_vocab]` block of logits exists at a time: the forward keeps an online max / sum-exp
(+ entropy statistic) per token, the backward (see `jaxrl_rm.kernels.logprobs`, a
`jax.custom_vjp`) recomputes each block of logits from `hidden` and `lm_head` and folds it
straight into `d_hidden` and `d_lm_head`.

Layout choices (they matter on CPU, see `benchmarks/logprob.py`):

* vocab is the outer loop, so one `[D, block_vocab]` slice of the head stays hot in cache
  while all token blocks pass over it, and `d_lm_head[:, block]` is written exactly once;
* the head is never copied, padded or transposed as a whole: blocks are `dynamic_slice`s,
  `d_hidden += dz @ W_j^T` is a `dot_general` contracting the block's vocab dim in place, and
  `d_lm_head[:, j] = hidden^T @ dz` uses `hidden^T` materialised once (`[D, N]`, small), which
  keeps every product on XLA:CPU's fast matmul path (it runs "transposed-LHS" dots slowly);
* when `V % block_vocab != 0` the last vocab block is *overlapped* (it starts at
  `V - block_vocab`) and the columns already seen are masked, which avoids padding the head;
* the token side (`[N, D]`, small) is zero-padded to a multiple of `block_tokens`; padded
  rows have zero gradient coefficients, so they contribute exactly nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxrl_rm.kernels._math import (
    NEG,
    finalize,
    logit_grad,
    matmul_precision,
    online_update,
    scaled_logits,
    vary_like,
)

DEFAULT_BLOCK_TOKENS = 1024
DEFAULT_BLOCK_VOCAB = 2048
# Matmul FLOPs in units of N*D*V (a multiply-add counts 2): the forward's logits; the backward's
# one logits recompute, d_hidden and d_lm_head. benchmarks/logprob.py reports these.
FLOPS_PER_NDV = {"forward": 2, "backward": 6}


def _token_blocking(n: int, block_tokens: int) -> tuple[int, int]:
    """Balanced token blocks: `(block, n_blocks)` with `block * n_blocks >= n`, little padding."""
    n_blocks = -(-n // max(1, block_tokens))
    block = -(-n // n_blocks)
    return block, n_blocks


def _pad_rows(x, rows: int):
    if x.shape[0] == rows:
        return x
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _vocab_plan(v: int, block_vocab: int):
    """`(block, n_full, last_start)`: full blocks at `j * block`, then one overlapped block at
    `last_start = v - block` (None when `block` divides `v`) whose columns `< n_full * block`
    are masked."""
    block = max(1, min(block_vocab, v))
    n_full = v // block
    last_start = v - block if v % block else None
    return block, n_full, last_start


def forward(hidden, lm_head, targets, *, temperature: float = 1.0, with_entropy: bool = False,
            block_tokens: int = DEFAULT_BLOCK_TOKENS, block_vocab: int = DEFAULT_BLOCK_VOCAB):
    """Streaming statistics of the scaled logits.

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`; targets: `[N] int32`.

    Returns:
      `(lse, z_target, entropy or None)`, each `[N] float32`.
    """
    n, _ = hidden.shape
    v = lm_head.shape[1]
    bn, n_tok = _token_blocking(n, block_tokens)
    bv, n_full, last_start = _vocab_plan(v, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    hp = _pad_rows(hidden, bn * n_tok)
    tp = _pad_rows(targets.astype(jnp.int32), bn * n_tok)[:, None]

    def block(h_i, t_i, w_j, col0, col_lo, stats):
        m, s, we, zt = stats
        z = scaled_logits(h_i, w_j, temperature, precision)
        cols = col0 + lax.broadcasted_iota(jnp.int32, z.shape, 1)
        is_t = cols == t_i
        if col_lo is not None:  # overlapped last block: columns < col_lo were already seen
            fresh = cols >= col_lo
            z = jnp.where(fresh, z, NEG)
            is_t = is_t & fresh
        zt = zt + jnp.sum(jnp.where(is_t, z, 0.0), axis=1, keepdims=True)
        m, s, we = online_update(z, m, s, we, with_entropy=with_entropy)
        return m, s, we, zt

    def vocab_step(col0, col_lo, stats):
        w_j = lax.dynamic_slice_in_dim(lm_head, col0, bv, axis=1)
        if n_tok == 1:
            return block(hp, tp, w_j, col0, col_lo, stats)

        def token_step(i, stats):
            r0 = i * bn
            sl = lambda x: lax.dynamic_slice_in_dim(x, r0, bn, axis=0)
            new = block(sl(hp), sl(tp), w_j, col0, col_lo, tuple(map(sl, stats)))
            return tuple(lax.dynamic_update_slice_in_dim(x, y, r0, axis=0) for x, y in zip(stats, new))

        return lax.fori_loop(0, n_tok, token_step, stats)

    rows = bn * n_tok
    stats = (jnp.full((rows, 1), NEG, jnp.float32),) + tuple(
        jnp.zeros((rows, 1), jnp.float32) for _ in range(3))
    stats = tuple(vary_like(x, hidden, lm_head, targets) for x in stats)
    stats = lax.fori_loop(0, n_full, lambda j, st: vocab_step(j * bv, None, st), stats)
    if last_start is not None:
        stats = vocab_step(last_start, n_full * bv, stats)
    m, s, we, zt = (x[:n, 0] for x in stats)
    lse, ent = finalize(m, s, we, with_entropy=with_entropy)
    return lse, zt, ent


def backward(hidden, lm_head, targets, lse, a, b, c, *, temperature: float = 1.0,
             block_tokens: int = DEFAULT_BLOCK_TOKENS, block_vocab: int = DEFAULT_BLOCK_VOCAB):
    """Blockwise `d_hidden`, `d_lm_head` for `dz = a [j == t] + p (b + c y)` (see `_math`).

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]`; targets: `[N] int32`; lse: `[N] float32`.
      a, b: `[N] float32`; c: `[N] float32` or None; already divided by the temperature.

    Returns:
      `(d_hidden [N, D] hidden.dtype, d_lm_head [D, V] lm_head.dtype)`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    bn, n_tok = _token_blocking(n, block_tokens)
    bv, n_full, last_start = _vocab_plan(v, block_vocab)
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    rows = bn * n_tok
    hp = _pad_rows(hidden, rows)
    col = lambda x: _pad_rows(x.astype(jnp.float32), rows)[:, None]
    tp = _pad_rows(targets.astype(jnp.int32), rows)[:, None]
    # Padded rows get a = b = c = 0, hence dz = 0: they add nothing to d_lm_head.
    side = (tp, col(lse), col(a), col(b)) + ((col(c),) if c is not None else ())

    def block_grads(h_i, h_t_i, side_i, w_j, col0, col_lo):
        t_i, lse_i, a_i, b_i = side_i[:4]
        c_i = side_i[4] if c is not None else None
        z = scaled_logits(h_i, w_j, temperature, precision)
        cols = col0 + lax.broadcasted_iota(jnp.int32, z.shape, 1)
        dz = logit_grad(z, cols == t_i, lse_i, a_i, b_i, c_i)
        if col_lo is not None:
            dz = jnp.where(cols >= col_lo, dz, 0.0)
        # d_hidden block: dz [n, v] . w_j [D, v] contracting v ("NT", no copy of the head).
        dh_i = lax.dot_general(dz.astype(lm_head.dtype), w_j, (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
        # d_lm_head block: h^T [D, n] @ dz [n, v]. hidden^T is materialised once (it is small)
        # so this is a plain "NN" product; XLA:CPU runs "TN" dots on a much slower path.
        dw_j = lax.dot_general(h_t_i, dz.astype(hidden.dtype), (((1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
        return dh_i, dw_j

    def vocab_step(col0, col_lo, carry):
        dh, dw, h_t = carry
        w_j = lax.dynamic_slice_in_dim(lm_head, col0, bv, axis=1)
        if n_tok == 1:
            dh_i, dw_j = block_grads(hp, h_t, side, w_j, col0, col_lo)
            dh = dh + dh_i
        else:
            def token_step(i, acc):
                dh, dw_j = acc
                r0 = i * bn
                sl = lambda x: lax.dynamic_slice_in_dim(x, r0, bn, axis=0)
                dh_i, dw_ij = block_grads(sl(hp), lax.dynamic_slice_in_dim(h_t, r0, bn, axis=1),
                                          tuple(map(sl, side)), w_j, col0, col_lo)
                dh = lax.dynamic_update_slice_in_dim(dh, sl(dh) + dh_i, r0, axis=0)
                return dh, dw_j + dw_ij

            dw0 = vary_like(jnp.zeros((d, bv), jnp.float32), hidden, lm_head, *side)
            dh, dw_j = lax.fori_loop(0, n_tok, token_step, (dh, dw0))
        dw_j = dw_j.astype(dw.dtype)
        if col_lo is not None:  # keep the columns the overlapped block already wrote
            cols = col0 + lax.broadcasted_iota(jnp.int32, dw_j.shape, 1)
            dw_j = jnp.where(cols >= col_lo, dw_j, lax.dynamic_slice_in_dim(dw, col0, bv, axis=1))
        return dh, lax.dynamic_update_slice_in_dim(dw, dw_j, col0, axis=1), h_t

    # hidden^T is materialised behind an optimization barrier so XLA cannot fold the transpose
    # back into the d_lm_head dot. A loop carry alone is not enough: with one vocab block the
    # loop is removed, the "TN" dot returns, and XLA:CPU has no bf16 x bf16 -> f32 kernel for it
    # (`UNIMPLEMENTED ... DotThunk`); f32 would take its slow path.
    zeros = lambda shape, dtype: vary_like(jnp.zeros(shape, dtype), hidden, lm_head, *side)
    carry = (zeros((rows, d), jnp.float32), zeros(lm_head.shape, lm_head.dtype),
             lax.optimization_barrier(hp.T))
    carry = lax.fori_loop(0, n_full, lambda j, cr: vocab_step(j * bv, None, cr), carry)
    if last_start is not None:
        carry = vocab_step(last_start, n_full * bv, carry)
    dh, dw, _ = carry
    return dh[:n].astype(hidden.dtype), dw
