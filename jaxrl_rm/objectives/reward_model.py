"""Pairwise reward-model losses: Bradley–Terry, and POLAR (which is the BT loss on its own pairs).

BT, per pair i:
    l_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i) + center_coef * (r_chosen_i + r_rejected_i)**2
loss = mean over valid pairs of l_i. The centering term (Eisenstein et al. 2023, "Helping or
Herding?") pins the free additive constant of a BT reward near 0 so rewards are comparable across
prompts and models.

POLAR (Dou et al., "Pre-Trained Policy Discriminators are General Reward Models", Sec. 3) scores a
candidate *against a reference*: r(p, ref, candidate). Both of its losses are exactly this BT loss:
  pre-training (Eq. 6):  -log sigmoid(r(p, A1, A2) - r(p, A1, B1)),   A1, A2 from one policy, B1 another
  fine-tuning  (Eq. 7):  -log sigmoid(r(p, A, B) - r(p, A, C)),       human ranking A > B > C
so `polar_pretrain_loss` / `polar_finetune_loss` only rename the arguments of `bradley_terry_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_rm.objectives.reduction import LossTerms, masked_mean_terms

_F32 = jnp.float32


def bradley_terry_loss_terms(
    r_chosen: jax.Array,
    r_rejected: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_coef: float = 0.0,
    mask: jax.Array | None = None,
) -> LossTerms:
    """Additive sums of the BT loss over a (micro-)batch of pairs; `denominator` = number of valid
    pairs. See `bradley_terry_loss` for the arguments."""
    r_chosen = jnp.asarray(r_chosen)
    r_rejected = jnp.asarray(r_rejected)
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {r_chosen.shape} and r_rejected {r_rejected.shape} differ in shape")
    shape = r_chosen.shape
    mask = jnp.ones(shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, expected {shape}")
    rc = jnp.where(mask, r_chosen.astype(_F32), 0.0)
    rr = jnp.where(mask, r_rejected.astype(_F32), 0.0)
    diff = rc - rr
    logits = diff
    if margin is not None:
        margin = jnp.asarray(margin, _F32)
        if margin.shape not in ((), shape):
            raise ValueError(f"margin has shape {margin.shape}, expected () or {shape}")
        logits = diff - jnp.where(mask, margin, 0.0)
    bt = -jax.nn.log_sigmoid(logits)
    center = jnp.square(rc + rr)
    use_center = not (isinstance(center_coef, (int, float)) and center_coef == 0)  # traced: on
    per_pair = bt + center_coef * center if use_center else bt
    loss_sum, count = masked_mean_terms(per_pair, mask)
    sg = jax.lax.stop_gradient
    means = {
        "bt_loss": masked_mean_terms(sg(bt), mask),
        "accuracy": masked_mean_terms((diff > 0).astype(_F32), mask),
        "margin_mean": masked_mean_terms(sg(diff), mask),
        "reward_mean": masked_mean_terms(sg(0.5 * (rc + rr)), mask),
        "chosen_mean": masked_mean_terms(sg(rc), mask),
        "rejected_mean": masked_mean_terms(sg(rr), mask),
    }
    if use_center:
        means["center_loss"] = masked_mean_terms(sg(center), mask)
    return LossTerms(loss_sum=loss_sum, denominator=count, means=means, mins={}, maxs={})


def bradley_terry_loss(
    r_chosen: jax.Array,
    r_rejected: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_coef: float = 0.0,
    mask: jax.Array | None = None,
    global_denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley–Terry pairwise loss, computed stably in float32 with `jax.nn.log_sigmoid`.

    Args:
      r_chosen: [N] float (any float dtype, any shape equal to r_rejected's), reward of the
        preferred response of each pair.
      r_rejected: [N] float, reward of the dispreferred response.
      margin: optional [] or [N] float; the loss is -log sigmoid(r_c - r_r - margin) (Llama-2 style).
      center_coef: coefficient of the centering term mean((r_c + r_r)**2) (e.g. 0.01); 0 = off.
      mask: optional [N] bool, valid pairs (padding pairs are ignored; may hold inf/NaN).
      global_denominator: number of valid pairs of the full batch when this call sees one
        micro-batch, so micro-batch losses sum exactly to the full-batch loss.
    Returns:
      loss: [] float32, mean over valid pairs.
      metrics: [] float32 each: bt_loss (without centering), accuracy (share of pairs with
        r_c > r_r strictly; ties count as wrong), margin_mean (mean r_c - r_r), reward_mean (mean of
        all rewards), chosen_mean, rejected_mean, and center_loss (mean (r_c + r_r)**2) if
        center_coef != 0.
    """
    terms = bradley_terry_loss_terms(r_chosen, r_rejected, margin=margin, center_coef=center_coef, mask=mask)
    return terms.loss(global_denominator), terms.metrics()


def polar_pretrain_loss(
    r_same_policy: jax.Array, r_other_policy: jax.Array, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """POLAR pre-training loss (Eq. 6): `bradley_terry_loss(r_same_policy, r_other_policy, **kwargs)`.

    Args:
      r_same_policy: [N] r(p, A1, A2), reference and candidate sampled from the same policy.
      r_other_policy: [N] r(p, A1, B1), candidate from a different policy.
      **kwargs: as `bradley_terry_loss` (margin, center_coef, mask, global_denominator).
    """
    return bradley_terry_loss(r_same_policy, r_other_policy, **kwargs)


def polar_finetune_loss(
    r_better: jax.Array, r_worse: jax.Array, **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """POLAR fine-tuning loss (Eq. 7): `bradley_terry_loss(r_better, r_worse, **kwargs)`.

    Args:
      r_better: [N] r(p, A, B) for a human ranking A > B > C (reference A, second-best B).
      r_worse: [N] r(p, A, C).
    """
    return bradley_terry_loss(r_better, r_worse, **kwargs)
