"""Group-relative advantages (GRPO, Dr.GRPO, RLOO) and the zero-variance group mask.

Rewards come as `[B, G]`: B prompts, G sampled answers each. Flatten the result to `[B * G]`
(row-major, `adv.reshape(-1)`) to match a `[B * G, T]` token batch for `policy_loss`.

Choices:
- GRPO's std is the *unbiased* sample std (ddof=1), as `torch.std` in verl and TRL; pass
  `std_ddof=0` for the population std. The advantage is `(r - mean) / (std + eps)` (eps added to the
  std, as verl/TRL), so a zero-variance group gets advantage 0, not NaN.
- An optional `mask` [B, G] marks which samples belong to the group (variable group sizes, failed
  rollouts). Masked-out samples get advantage 0 and do not enter the statistics. A group with fewer
  than 2 valid samples has advantage 0 everywhere (no baseline can be formed for RLOO, no std for
  GRPO).
- Rewards are centred after subtracting each group's first valid reward, so a group of identical
  rewards gets advantage exactly 0 in every mode (not ulp-noise / eps, which can be O(1)).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AdvantageMode = Literal["grpo", "drgrpo", "rloo"]
ADVANTAGE_MODES: tuple[str, ...] = ("grpo", "drgrpo", "rloo")

_F32 = jnp.float32


def _prepare(rewards: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B, G], got shape {rewards.shape}")
    if mask is None:
        mask = jnp.ones(rewards.shape, bool)
    else:
        mask = jnp.asarray(mask).astype(bool)
        if mask.shape != rewards.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected {rewards.shape} (the shape of rewards)")
    r = jnp.where(mask, rewards.astype(_F32), 0.0)
    n = jnp.sum(mask, axis=-1, keepdims=True).astype(_F32)
    return r, mask, n


def group_advantages(
    rewards: jax.Array,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
    mask: jax.Array | None = None,
    std_ddof: int = 1,
) -> jax.Array:
    """Group-relative advantages, one per sample.

    Args:
      rewards: [B, G] float, reward of sample g of prompt b.
      mode:
        "grpo":   (r - mean_g r) / (std_g r + eps), std with `std_ddof` (default 1: unbiased).
        "drgrpo": r - mean_g r (Dr.GRPO: no std normalisation).
        "rloo":   r - mean of the *other* G - 1 samples = G / (G - 1) * (r - mean_g r).
      eps: added to the GRPO std.
      mask: [B, G] bool, optional; False samples are outside the group (advantage 0).
      std_ddof: delta degrees of freedom of the GRPO std (1 unbiased, 0 population).
    Returns: [B, G] float32.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(ADVANTAGE_MODES)}")
    r, mask, n = _prepare(rewards, mask)
    enough = n >= 2
    # Shift by the group's first valid reward before centring: identical rewards then centre to
    # exactly 0 (a float32 mean of equal values is off by an ulp, which (r - mean) / (std + eps)
    # would blow up to O(1) advantages), and the variance is computed without cancellation.
    first = jnp.argmax(mask, axis=-1)[:, None]
    r = jnp.where(mask, r - jnp.take_along_axis(r, first, axis=-1), 0.0)
    mean = jnp.sum(r, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    centred = jnp.where(mask, r - mean, 0.0)
    if mode == "drgrpo":
        adv = centred
    elif mode == "rloo":
        adv = centred * n / jnp.maximum(n - 1.0, 1.0)
    else:
        var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(n - std_ddof, 1.0)
        adv = centred / (jnp.sqrt(var) + eps)
    return jnp.where(mask & enough, adv, 0.0).astype(_F32)


def zero_variance_groups(
    rewards: jax.Array, *, mask: jax.Array | None = None, atol: float = 1e-6
) -> jax.Array:
    """[B] bool: True for groups that carry no learning signal (DAPO dynamic sampling drops them).

    A group is zero-variance when max - min of its valid rewards is <= `atol`, or when it has fewer
    than 2 valid samples.

    Args: rewards [B, G] float; mask [B, G] bool (optional); atol: tolerance on the reward spread.
    """
    r, mask, n = _prepare(rewards, mask)
    hi = jnp.max(jnp.where(mask, r, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(mask, r, jnp.inf), axis=-1)
    few = n[:, 0] < 2
    return few | ((hi - lo) <= atol)
