"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def check_kl_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def kl_estimate(
    logp: jax.Array,
    ref_logp: jax.Array,
    estimator: str = "k3",
    *,
    max_log_ratio: float = 20.0,
    kl_clamp: float = 0.0,
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    With `log_r = ref_logp - logp`:
      k1 = -log_r                      (unbiased, high variance, can be negative)
      k2 = log_r**2 / 2                (biased, low variance; its gradient is the reverse-KL gradient)
      k3 = exp(log_r) - log_r - 1      (unbiased, >= 0, low variance; the GRPO paper's estimator)
    For k3 `log_r` is clipped to [-max_log_ratio, max_log_ratio] before `exp` (float32 overflow guard),
    and with `kl_clamp > 0` the k3 value is clamped to [-kl_clamp, kl_clamp] (verl's `low_var_kl`
    clamps to [-10, 10]): one token then adds at most `kl_clamp` instead of up to e^max_log_ratio,
    and its gradient is 0 where the clamp binds. The clamp biases the estimate, so it is off here
    (0, the pure estimator) and on in the policy loss (`policy_loss(kl_clamp=10.0)`).

    Args:
      logp: [...] log-probs of the sampled tokens under the current policy (any float dtype).
      ref_logp: [...] same, under the reference policy.
      max_log_ratio: k3's clip of `log_r` before `exp`.
      kl_clamp: k3's value clamp (static Python float; 0: off). k1 and k2 are never clamped (verl
        clamps only `low_var_kl`).
    Returns: [...] float32.
    """
    check_kl_estimator(estimator)
    if not kl_clamp >= 0:
        raise ValueError(f"kl_clamp={kl_clamp} must be >= 0 (0: off)")
    log_r = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    log_r = jnp.clip(log_r, -max_log_ratio, max_log_ratio)
    k3 = jnp.exp(log_r) - log_r - 1.0
    return jnp.clip(k3, -kl_clamp, kl_clamp) if kl_clamp > 0 else k3
