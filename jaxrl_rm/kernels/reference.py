"""Dense float32 token log-probs: the oracle every fast path is tested against.

It materialises the full `[N, V]` logits (and, under `jax.grad`, several more `[N, V]`
buffers), so it is only for tests, small shapes and the benchmark's baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Matmul FLOPs in units of N*D*V: the logits, then d_hidden and d_lm_head from the saved [N, V]
# softmax (no recompute, at the price of [N, V] memory).
FLOPS_PER_NDV = {"forward": 2, "backward": 4}


def token_logprobs_reference(hidden, lm_head, targets, *, temperature: float = 1.0,
                             with_entropy: bool = False):
    """Dense reference of `jaxrl_rm.kernels.token_logprobs`, written the textbook way
    (`log_softmax` then `take_along_axis`) so that it shares no formulation with the kernels.

    Args:
      hidden: `[N, D]` any float dtype (upcast to float32).
      lm_head: `[D, V]` any float dtype (upcast to float32).
      targets: `[N] int` in `[0, V)`.
      temperature: logits are `hidden @ lm_head / temperature`.
      with_entropy: also return the entropy of the temperature-scaled softmax.

    Returns:
      `logp: [N] float32`, or `(logp, entropy)` both `[N] float32`.
    """
    h = hidden.astype(jnp.float32)
    w = lm_head.astype(jnp.float32)
    z = jnp.dot(h, w, precision=lax.Precision.HIGHEST) / temperature
    log_p = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(log_p, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if not with_entropy:
        return logp
    return logp, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def reference_stats(hidden, lm_head, targets, *, temperature: float = 1.0,
                    with_entropy: bool = False):
    """Dense `(lse, z_target, entropy or None)`, each `[N] float32`; plain autodiff.

    The per-vocab-shard form used by the vocab-parallel path with `impl="reference"`: a target
    outside `[0, V)` (another shard's token) matches no column and contributes a 0 logit.
    """
    h = hidden.astype(jnp.float32)
    w = lm_head.astype(jnp.float32)
    z = jnp.dot(h, w, precision=lax.Precision.HIGHEST) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    cols = jnp.arange(z.shape[-1], dtype=jnp.int32)
    zt = jnp.sum(jnp.where(cols[None, :] == targets[:, None].astype(jnp.int32), z, 0.0), axis=-1)
    ent = None
    if with_entropy:
        log_p = z - lse[:, None]
        ent = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return lse, zt, ent
