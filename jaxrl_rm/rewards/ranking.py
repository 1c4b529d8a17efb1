r"""Kendall τ between predicted scores and a gold ranking (the URPO ranking reward).

URPO (Sec. 3.2.1) rewards a judge's N scores ``s`` against the gold ``g`` with

    τ(s, g) = 2 / (N (N − 1)) · Σ_{i<j} sign((s_i − s_j)(g_i − g_j))

* a pair tied in ``s`` *or* in ``g`` contributes 0, and the denominator stays ``N(N−1)/2``
  (this is Kendall's τ-a, not scipy's default τ-b): a judge that gives every response the same
  score earns exactly 0, and with ties in the gold ranking the best reachable τ is below 1;
* the result is always finite: ``N < 2`` gives 0, NaN scores count as ties.

``gold`` is "higher is better", like scores. If you hold rank positions (1 = best), pass
``-ranks``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

TauMapping = Literal["raw", "unit"]


def _xp(*arrays: Any):
    """numpy, or jax.numpy when any input is a jax array (so the function also works under jit)."""
    for a in arrays:
        if type(a).__module__.startswith(("jax", "jaxlib")):
            import jax.numpy as jnp

            return jnp
    return np


def kendall_tau(scores: Any, gold: Any) -> Any:
    """URPO Kendall τ over the last axis.

    Args:
      scores: ``[..., N]`` predicted scores (higher = better).
      gold: ``[..., N]`` gold scores (higher = better), broadcastable to ``scores``.

    Returns:
      ``[...]`` float32 τ in ``[-1, 1]`` (a 0-d array for 1-D input). numpy in, numpy out;
      jax arrays in, jax array out (jit-friendly, static N).

    >>> float(kendall_tau([3, 2, 1], [30, 20, 10])), float(kendall_tau([1, 1, 1], [3, 2, 1]))
    (1.0, 0.0)
    >>> float(kendall_tau([2, 1, 1], [3, 2, 1]))  # pair (2, 3) tied in scores → 0; (1 + 1 + 0)/3
    0.6666666865348816
    """
    xp = _xp(scores, gold)
    s = xp.asarray(scores, dtype=xp.float32)
    g = xp.asarray(gold, dtype=xp.float32)
    s, g = xp.broadcast_arrays(s, g)
    n = s.shape[-1]
    if n < 2:
        return xp.zeros(s.shape[:-1], dtype=xp.float32)
    # sign of each factor separately: no overflow of the product, NaN → 0 (a tie)
    with np.errstate(invalid="ignore"):  # inf - inf → NaN → counted as a tie below
        ds = xp.sign(s[..., :, None] - s[..., None, :])
        dg = xp.sign(g[..., :, None] - g[..., None, :])
        prod = xp.nan_to_num(ds * dg, nan=0.0)
    iu = np.triu_indices(n, k=1)
    concord = prod[..., iu[0], iu[1]].sum(axis=-1)
    return (concord * (2.0 / (n * (n - 1)))).astype(xp.float32)


def tau_to_reward(tau: Any, mapping: TauMapping = "raw") -> Any:
    """Map τ to a reward: ``"raw"`` keeps τ in [-1, 1]; ``"unit"`` gives (τ + 1) / 2 in [0, 1]."""
    if mapping == "raw":
        return tau
    if mapping == "unit":
        return (tau + 1.0) / 2.0
    raise ValueError(f"tau mapping must be 'raw' or 'unit', got {mapping!r}")


def tau_reward_range(mapping: TauMapping = "raw") -> tuple[float, float]:
    """(min, max) of the reward under ``mapping``: (-1, 1) for raw, (0, 1) for unit."""
    return (float(tau_to_reward(-1.0, mapping)), float(tau_to_reward(1.0, mapping)))
