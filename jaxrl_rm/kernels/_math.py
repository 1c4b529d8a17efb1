"""The few formulas every log-prob implementation shares.

Why a module of its own: the chunked XLA path, the Mosaic (TPU) kernels and the Triton (GPU)
kernels all stream over vocab blocks with the same online statistics and the same logit
gradient. Writing the formulas once keeps the implementations from drifting apart; the helpers
use only `jnp`/`lax` ops on 2-D blocks, so they trace inside a Pallas kernel as well as in XLA.

Notation, per token row (all float32):

    z_j  = (hidden @ lm_head)_j / temperature          scaled logits
    m    = running max of z,   s = sum_j exp(z_j - m),  w = sum_j exp(z_j - m) (z_j - m)
    lse  = m + log s
    H    = -sum_j p_j log p_j = log s - w / s          (entropy; no `lse - E[z]` cancellation)

The statistics (lse, z_target, H) are what the custom VJP differentiates. With cotangents
(g_lse, g_zt, g_H) the gradient w.r.t. the scaled logits is, with y = z - lse = log p,

    dz_j = g_zt [j == target] + p_j (g_lse - g_H H - g_H y_j)
         =    a [j == target] + p_j (b + c y_j),

so the backward kernels only need per-row coefficients a, b, c (already divided by the
temperature, which turns dz into the gradient w.r.t. the raw logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A finite "minus infinity": masked logits and the initial running max use it, so that
# `(m_old - m_new) * s` is `0 * finite = 0` instead of `inf * 0 = nan` on the first block.
NEG = float(np.finfo(np.float32).min)


def _varying_axes(x) -> frozenset:
    """Manual mesh axes `x` varies over (the aval field was renamed across jax versions)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", None)
    return frozenset(vma or ())


def vary_like(x, *refs):
    """Mark `x` (e.g. a fresh zeros carry) as varying over the manual mesh axes `refs` vary over.

    Inside `jax.shard_map` (vocab-parallel path) loop carries must have the same
    varying-manual-axes type as the loop body's outputs; outside shard_map this is a no-op.
    """
    vma = frozenset().union(*(_varying_axes(r) for r in refs))
    missing = vma - _varying_axes(x)
    if not missing:
        return x
    return lax.pcast(x, tuple(sorted(missing)), to="varying")


def _in_manual_context() -> bool:
    """True inside `jax.shard_map` (some mesh axis is manual), where a Pallas output struct
    needs its manual-axis type even when it varies over no axis (e.g. a 1-device mesh)."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
    except AttributeError:  # older jax: no abstract mesh context
        return False
    return bool(getattr(mesh, "manual_axes", ()))


def out_struct(shape, dtype, like):
    """`jax.ShapeDtypeStruct` for a `pallas_call` output that varies like the array `like`.

    Under `shard_map(check_vma=True)` Pallas needs the output's manual-axis type; outside it the
    plain struct is used.
    """
    axes = _varying_axes(like)
    if not axes and not _in_manual_context():
        return jax.ShapeDtypeStruct(shape, dtype)
    try:  # jax >= 0.10
        return jax.ShapeDtypeStruct(
            shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
    except (TypeError, AttributeError):  # older spelling
        return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def matmul_precision(*dtypes) -> lax.Precision:
    """HIGHEST for float32 operands (true f32 on TPU/GPU), DEFAULT for bf16/f16 operands."""
    if any(jnp.dtype(d) == jnp.float32 for d in dtypes):
        return lax.Precision.HIGHEST
    return lax.Precision.DEFAULT


def scaled_logits(h, w, temperature: float, precision=None):
    """`h [n, D] @ w [D, v] / temperature` -> `[n, v] float32` (float32 accumulation)."""
    if precision is None:
        precision = matmul_precision(h.dtype, w.dtype)
    z = lax.dot_general(
        h, w, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    if temperature != 1.0:
        z = z / temperature
    return z


def _col(x):
    """Per-row statistic as a column: `[n]` -> `[n, 1]`; `[n, 1]` unchanged."""
    return x[:, None] if x.ndim == 1 else x


def online_update(z, m, s, went, *, with_entropy: bool):
    """Fold one block of logits into the running statistics.

    Args:
      z: `[n, v] float32` scaled logits; masked columns hold `NEG`.
      m, s: running max and sum of `exp(z - m)`, float32, `[n, 1]` (Mosaic-friendly) or `[n]`
        (Triton-friendly); the outputs have the same shape.
      went: running `sum exp(z - m) (z - m)`, same shape (ignored unless with_entropy).

    Returns:
      The updated `(m, s, went)`.
    """
    keep = m.ndim == 2
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=keep))
    alpha = jnp.exp(m - m_new)
    zc = z - _col(m_new)
    e = jnp.exp(zc)
    s_new = alpha * s + jnp.sum(e, axis=1, keepdims=keep)
    if with_entropy:
        went = alpha * (went + (m - m_new) * s) + jnp.sum(e * zc, axis=1, keepdims=keep)
    return m_new, s_new, went


def finalize(m, s, went, *, with_entropy: bool):
    """Running statistics -> `(lse, entropy or None)`, same shapes as the inputs."""
    log_s = jnp.log(s)
    lse = m + log_s
    ent = log_s - went / s if with_entropy else None
    return lse, ent


def logit_grad(z, is_target, lse, a, b, c):
    """Gradient w.r.t. the raw logits of one block: `a [j == t] + p (b + c y)`, `y = z - lse`.

    Args:
      z: `[n, v] float32` scaled logits of the block.
      is_target: `[n, v] bool`, column == target of the row.
      lse, a, b: float32 `[n, 1]` or `[n]`; c: the same, or None (no entropy term).

    Returns:
      `[n, v] float32`.
    """
    y = z - _col(lse)
    p = jnp.exp(y)
    coef = _col(b) if c is None else _col(b) + _col(c) * y
    return jnp.where(is_target, _col(a), 0.0) + p * coef
