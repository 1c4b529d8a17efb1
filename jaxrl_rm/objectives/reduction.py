"""Exact, micro-batchable reductions: losses as (sum, denominator) pairs, and loss aggregation modes.

Every loss in `jaxrl_rm.objectives` is first computed as a `LossTerms`: additive sums over the rows
of (part of) a batch. Adding the `LossTerms` of micro-batches gives the `LossTerms` of the whole
batch, so a trainer that accumulates gradients over micro-batches reproduces the full-batch loss
(up to float32 summation order). Two ways to use this:

1. Gradient accumulation: compute the full-batch denominator once (`loss_denominator(mask, mode)`
   for the policy loss, the number of valid pairs for the BT loss) and pass it to each micro-batch
   call as `global_denominator=`. Then `sum_i loss_i == full_batch_loss` and
   `sum_i grad(loss_i) == grad(full_batch_loss)`.
2. Metrics: add the micro-batches' `LossTerms` (`a + b`, `sum(list_of_terms)`, or
   `terms.sum_leading_axis()` for a stacked
   `lax.scan`/`vmap` output) and call `.metrics()` / `.loss()` once.

Micro-batches must split the batch (row) dimension `B`, never the token dimension `T`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

_F32 = jnp.float32


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """`num / den`, and 0 where `den == 0` (no NaN, also in the gradient)."""
    den = jnp.asarray(den, _F32)
    ok = den != 0
    return jnp.where(ok, jnp.asarray(num, _F32) / jnp.where(ok, den, 1.0), 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossTerms:
    """Additive sums describing a loss and its metrics over (part of) a batch. A pytree.

    Attributes:
      loss_sum: [] float32, numerator of the loss.
      denominator: [] float32, this part's share of the denominator (token count, sequence count,
        sequence count * norm length, or pair count, depending on the loss). Additive.
      means: name -> (sum, count), each [] float32; the metric is `sum / count`. Additive.
      mins / maxs: name -> [] float32; combined with min / max. `+inf` / `-inf` when empty.
    """

    loss_sum: jax.Array
    denominator: jax.Array
    means: dict[str, tuple[jax.Array, jax.Array]]
    mins: dict[str, jax.Array]
    maxs: dict[str, jax.Array]

    def __add__(self, other: LossTerms) -> LossTerms:
        if not isinstance(other, LossTerms):
            return NotImplemented
        return LossTerms(
            loss_sum=self.loss_sum + other.loss_sum,
            denominator=self.denominator + other.denominator,
            means={k: (s + other.means[k][0], c + other.means[k][1]) for k, (s, c) in self.means.items()},
            mins={k: jnp.minimum(v, other.mins[k]) for k, v in self.mins.items()},
            maxs={k: jnp.maximum(v, other.maxs[k]) for k, v in self.maxs.items()},
        )

    def __radd__(self, other: object) -> LossTerms:
        if isinstance(other, (int, float)) and other == 0:  # so that sum(list_of_terms) works
            return self
        return NotImplemented

    def sum_leading_axis(self) -> LossTerms:
        """Combine `LossTerms` stacked along a leading axis (output of `lax.scan` / `vmap`)."""
        return LossTerms(
            loss_sum=jnp.sum(self.loss_sum, axis=0),
            denominator=jnp.sum(self.denominator, axis=0),
            means={k: (jnp.sum(s, axis=0), jnp.sum(c, axis=0)) for k, (s, c) in self.means.items()},
            mins={k: jnp.min(v, axis=0) for k, v in self.mins.items()},
            maxs={k: jnp.max(v, axis=0) for k, v in self.maxs.items()},
        )

    def loss(self, global_denominator: jax.Array | float | None = None) -> jax.Array:
        """[] float32: `loss_sum / (global_denominator or self.denominator)`; 0 if the denominator is 0."""
        den = self.denominator if global_denominator is None else global_denominator
        return safe_div(self.loss_sum, den)

    def metrics(self) -> dict[str, jax.Array]:
        """name -> [] float32. Means are `sum / count`; empty metrics (count 0, or min/max over
        nothing) are reported as 0."""
        out = {k: safe_div(s, c) for k, (s, c) in self.means.items()}
        for d in (self.mins, self.maxs):
            out.update({k: jnp.where(jnp.isfinite(v), v, 0.0).astype(_F32) for k, v in d.items()})
        return out


def check_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


def _seq_valid(mask: jax.Array) -> jax.Array:
    """[B] bool: rows with at least one valid token (all-False rows are padding rows)."""
    return jnp.any(mask, axis=-1)


def loss_numerator(values: jax.Array, mask: jax.Array, loss_agg_mode: str) -> jax.Array:
    """Additive numerator of `aggregate(values, mask, mode)`.

    Args:
      values: [B, T] float32 per-token values (masked positions must already be finite).
      mask: [B, T] bool.
    Returns: [] float32.
    """
    check_loss_agg_mode(loss_agg_mode)
    mask = jnp.asarray(mask, bool)
    v = jnp.where(mask, values, 0.0).astype(_F32)
    if loss_agg_mode == "seq-mean-token-mean":
        n_tok = jnp.sum(mask, axis=-1).astype(_F32)
        return jnp.sum(safe_div(jnp.sum(v, axis=-1), n_tok))
    return jnp.sum(v)


def loss_denominator(
    mask: jax.Array, loss_agg_mode: str, *, loss_norm_length: int | float | None = None
) -> jax.Array:
    """Denominator of the loss aggregation mode over `mask`. Additive over row micro-batches.

    Compute it once on the *full* batch mask and pass it as `global_denominator=` to each
    micro-batch call for exact gradient accumulation.

    Args:
      mask: [B, T] bool, valid (response) tokens.
      loss_agg_mode:
        `token-mean`: number of valid tokens.
        `seq-mean-token-mean`, `seq-mean-token-sum`: number of sequences (rows with >= 1 valid token).
        `seq-mean-token-sum-norm`: number of sequences * `loss_norm_length` (default: padded length
          `T`; pass it explicitly, e.g. the max response length, so it stays constant over training
          and across micro-batches of different padded length, as Dr.GRPO intends).
    Returns: [] float32.

    Rows whose mask is all False (padding rows) count in no mode.
    """
    check_loss_agg_mode(loss_agg_mode)
    mask = jnp.asarray(mask, bool)
    if loss_agg_mode == "token-mean":
        return jnp.sum(mask).astype(_F32)
    n_seq = jnp.sum(_seq_valid(mask)).astype(_F32)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        length = mask.shape[-1] if loss_norm_length is None else loss_norm_length
        return n_seq * jnp.asarray(length, _F32)
    return n_seq


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    loss_agg_mode: str = "token-mean",
    *,
    loss_norm_length: int | float | None = None,
) -> jax.Array:
    """Aggregate per-token values into a scalar, as verl's `agg_loss` (see `loss_denominator`).

    token-mean: sum over valid tokens / number of valid tokens (whole batch).
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    seq-mean-token-sum-norm: sum over valid tokens / (number of sequences * loss_norm_length)
      (Dr.GRPO; note verl divides by `loss_norm_length` only, without the number of sequences).

    Args: values [B, T] float32, mask [B, T] bool. Returns [] float32 (0 for an empty mask).
    """
    return safe_div(
        loss_numerator(values, mask, loss_agg_mode),
        loss_denominator(mask, loss_agg_mode, loss_norm_length=loss_norm_length),
    )


def masked_mean_terms(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over valid entries, number of valid entries), both [] float32."""
    mask = jnp.asarray(mask, bool)
    return (
        jnp.sum(jnp.where(mask, values, 0.0).astype(_F32)),
        jnp.sum(mask).astype(_F32),
    )


def masked_min(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.min(jnp.where(mask, values.astype(_F32), jnp.inf))


def masked_max(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(mask, values.astype(_F32), -jnp.inf))
