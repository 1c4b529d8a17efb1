"""Dense float32 token log-probs: the oracle every fast path is tested against.

It materialises the full `[N, V]` logits (and, under `jax.grad`, several more `[N, V]`
buffers), so it is only for tests, small shapes and the benchmark's baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def token_logprobs_reference(hidden, lm_head, targets, *, temperature: float = 1.0,
                             with_entropy: bool = False):
    """Dense reference of `jaxrl_rm.kernels.token_logprobs`.

    Args:
      hidden: `[N, D]` any float dtype (upcast to float32).
      lm_head: `[D, V]` any float dtype (upcast to float32).
      targets: `[N] int`; a target outside `[0, V)` matches no column (its logit counts as 0).
      temperature: logits are `hidden @ lm_head / temperature`.
      with_entropy: also return the entropy of the temperature-scaled softmax.

    Returns:
      `logp: [N] float32`, or `(logp, entropy)` both `[N] float32`.
    """
    lse, zt, ent = reference_stats(hidden, lm_head, targets, temperature=temperature,
                                   with_entropy=with_entropy)
    logp = zt - lse
    return (logp, ent) if with_entropy else logp


def reference_stats(hidden, lm_head, targets, *, temperature: float = 1.0,
                    with_entropy: bool = False):
    """Dense `(lse, z_target, entropy or None)`, each `[N] float32`; plain autodiff."""
    h = hidden.astype(jnp.float32)
    w = lm_head.astype(jnp.float32)
    z = jnp.dot(h, w, precision=lax.Precision.HIGHEST) / jnp.float32(temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    cols = jnp.arange(z.shape[-1], dtype=jnp.int32)
    zt = jnp.sum(jnp.where(cols[None, :] == targets[:, None].astype(jnp.int32), z, 0.0), axis=-1)
    ent = None
    if with_entropy:
        log_p = z - lse[:, None]
        ent = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return lse, zt, ent
