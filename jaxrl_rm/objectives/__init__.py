"""Pure loss functions: policy loss (GRPO/DAPO/Dr.GRPO/GSPO), advantages, KL, Bradley–Terry and POLAR.

All take arrays and return `(loss, metrics)` (or arrays), compute in float32 whatever the input
dtype, and reduce via additive `LossTerms` so micro-batched gradient accumulation is exact:

    D = loss_denominator(full_mask, "token-mean")          # once, on the full batch
    for mb in micro_batches:                               # rows of the batch
        loss_i, metrics_i = policy_loss(..., mb..., global_denominator=D)
    # sum_i loss_i == policy_loss(full batch)[0], same for the gradients
"""

from jaxrl_rm.objectives.advantages import ADVANTAGE_MODES, group_advantages, zero_variance_groups
from jaxrl_rm.objectives.kl import KL_ESTIMATORS, kl_estimate
from jaxrl_rm.objectives.policy import RATIO_LEVELS, policy_loss, policy_loss_terms
from jaxrl_rm.objectives.reduction import LOSS_AGG_MODES, LossTerms, aggregate, loss_denominator
from jaxrl_rm.objectives.reward_model import (
    bradley_terry_loss,
    bradley_terry_loss_terms,
    polar_finetune_loss,
    polar_pretrain_loss,
)

__all__ = [
    "ADVANTAGE_MODES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "RATIO_LEVELS",
    "LossTerms",
    "aggregate",
    "bradley_terry_loss",
    "bradley_terry_loss_terms",
    "group_advantages",
    "kl_estimate",
    "loss_denominator",
    "policy_loss",
    "policy_loss_terms",
    "polar_finetune_loss",
    "polar_pretrain_loss",
    "zero_variance_groups",
]
