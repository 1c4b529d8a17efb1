"""The policy-gradient loss: PPO / GRPO / DAPO / Dr.GRPO / GSPO in one function.

Per token (b, t) with advantage A = advantages[b] (or advantages[b, t]):

  ratio      r = exp(logp - old_logp)                                    (ratio_level="token")
             r = sg[s_b] * exp(logp - sg[logp]),                         (ratio_level="sequence", GSPO)
                 s_b = exp(mean over valid t of (logp - old_logp))
  surrogate  pg = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A)     (PPO; DAPO clip-higher)
  dual clip  pg = min(pg, -clip_ratio_c A)  where A < 0                   (if clip_ratio_c is set)
  IS ratio   w = exp(old_logp - sampler_logp)          per token (level "token"), or
             w = exp(sum over valid t of (old_logp - sampler_logp)), one per sequence ("sequence")
  masked IS  tokens / sequences with w outside [1/c, c] leave `mask`     (is_mask, c = is_mask_threshold)
  TIS        pg = pg * sg[min(w, tis_cap)]                     (sampler_logp given, tis_cap not None)
  per-token  l = pg + kl_coef * KL_k(logp, ref_logp) - entropy_coef * entropy

and the loss is `aggregate(l, mask, loss_agg_mode)` (see `jaxrl_rm.objectives.reduction`). Because
aggregation is linear, this equals aggregated pg + kl_coef * aggregated KL - entropy_coef *
aggregated entropy, each aggregated with the same mode (as verl does).

Decisions (documented here, tested in tests/test_objectives.py):
- All inputs are cast to float32; values at masked positions are ignored and may be anything
  (even inf / NaN): they are replaced by 0 before any arithmetic, so they reach neither the loss nor
  the gradient.
- `old_logp`, `ref_logp`, `sampler_logp` and `advantages` are constants (stop-gradient). `entropy`
  is *not*: pass the entropy computed from the current logits and the bonus gradient flows to them.
- The log-ratio is clipped to [-max_log_ratio, max_log_ratio] (default 20, as verl) before `exp`.
  For GSPO only the (stop-gradient) sequence log-ratio is clipped; the per-token gradient
  `s_b * grad(logp)` is kept.
- GSPO uses the GSPO-token form of the paper, so its gradient is per token; with
  `loss_agg_mode="seq-mean-token-mean"` and sequence-level advantages it equals the GSPO objective's
  gradient exactly. Its clip range is the caller's `clip_low` / `clip_high` (the paper uses 3e-4 /
  4e-4); clipping then acts per sequence because the ratio value is constant along a sequence.
- The k3 KL value is clamped to [-kl_clamp, kl_clamp] (default 10, as verl's `low_var_kl`), so one
  token whose ratio to the reference explodes adds at most kl_coef * kl_clamp and no gradient.
- Train/infer mismatch (`sampler_logp`: the sampler's log-probs of the same tokens, *unfiltered*,
  at the same temperature) is corrected against `old_logp` (verl's "decoupled" mode: pi_old is the
  trainer's recomputation, so a caller must not pass the sampler's log-probs as `old_logp`).
  TIS weights (`tis_level` token | sequence, verl's `rollout_is` / `rollout_is_threshold`) multiply
  the policy-gradient term only, not the KL or entropy terms (as verl). Masked IS (`is_mask` token |
  sequence, verl's `rollout_rs` / `rollout_rs_threshold` with lower bound 1/c; token level is
  IcePop's mask) removes the rejected tokens from the whole loss *and* its denominator, as verl's
  rejection on `response_mask`; with `tis_cap >= c` the kept tokens get their exact ratio (IcePop).
  `is_masked_frac` is the share of the caller's valid tokens rejected, `is_masked_seq_frac` the
  share of its sequences that lost at least one token; every other metric describes the kept ones.
- `clip_frac_high`: share of valid tokens with A > 0 and r > 1 + clip_high (gradient cut by the upper
  clip); `clip_frac_low`: A < 0 and r < 1 - clip_low; `clip_frac_dual`: A < 0 and the dual clip
  binds. `approx_kl` is the k3 estimate of KL(pi || pi_old) per token. All metrics are means over
  valid tokens of the whole (micro-)batch except `pg_loss`, aggregated like the loss.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxrl_rm.objectives.kl import check_kl_estimator, kl_estimate
from jaxrl_rm.objectives.reduction import (
    LossTerms,
    check_loss_agg_mode,
    loss_denominator,
    loss_numerator,
    masked_max,
    masked_mean_terms,
    masked_min,
    safe_div,
)

RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
IS_LEVELS: tuple[str, ...] = ("token", "sequence")  # tis_level
IS_MASKS: tuple[str, ...] = ("none", "token", "sequence")  # is_mask

_F32 = jnp.float32
_sg = jax.lax.stop_gradient


def _is_zero(coef: float | jax.Array) -> bool:
    """True only for a Python / concrete zero; a traced coefficient (a schedule) counts as nonzero."""
    return isinstance(coef, (int, float)) and coef == 0


def _check_shape(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(jnp.shape(x)) != shape:
        raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {shape} (the shape of mask)")


def policy_loss_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    ratio_level: str = "token",
    loss_agg_mode: str = "token-mean",
    loss_norm_length: int | float | None = None,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float = 10.0,
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float | None = 2.0,
    tis_level: str = "token",
    is_mask: str = "none",
    is_mask_threshold: float = 2.0,
    max_log_ratio: float = 20.0,
) -> LossTerms:
    """Additive sums of the policy loss over a (micro-)batch; see `policy_loss` for the arguments.

    Returns a `LossTerms` whose `denominator` is this micro-batch's `loss_denominator(mask, ...)`.
    Sum the `LossTerms` of row micro-batches (`a + b`) to get the full batch's exactly.
    """
    # ---- validation (static: runs at trace time) ----
    check_loss_agg_mode(loss_agg_mode)
    check_kl_estimator(kl_estimator)
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level={ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1)")
    if clip_high < 0.0:
        raise ValueError(f"clip_high={clip_high} must be >= 0")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0 + clip_high:
        raise ValueError(f"clip_ratio_c={clip_ratio_c} must be > 1 + clip_high = {1.0 + clip_high}")
    if not kl_clamp >= 0.0:
        raise ValueError(f"kl_clamp={kl_clamp} must be >= 0 (0: off)")
    if not _is_zero(kl_coef) and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
    if not _is_zero(entropy_coef) and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")
    if sampler_logp is not None and tis_cap is not None and not tis_cap > 0.0:
        raise ValueError(f"tis_cap={tis_cap} must be > 0 (None: no TIS weights)")
    if tis_level not in IS_LEVELS:
        raise ValueError(f"tis_level={tis_level!r}; valid: {', '.join(IS_LEVELS)}")
    if is_mask not in IS_MASKS:
        raise ValueError(f"is_mask={is_mask!r}; valid: {', '.join(IS_MASKS)}")
    if is_mask != "none" and not is_mask_threshold > 1.0:
        raise ValueError(f"is_mask_threshold={is_mask_threshold} must be > 1 (tokens / sequences with "
                         "an importance ratio outside [1/c, c] are masked)")
    if is_mask != "none" and sampler_logp is None:
        raise ValueError(f"is_mask={is_mask!r} needs sampler_logp")
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {mask.shape}")
    shape = tuple(mask.shape)
    for name, x in (
        ("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp),
        ("entropy", entropy), ("sampler_logp", sampler_logp),
    ):
        _check_shape(name, x, shape)
    adv = jnp.asarray(advantages)
    if adv.shape not in (shape[:1], shape):
        raise ValueError(f"advantages has shape {adv.shape}, expected [B]={shape[:1]} or [B, T]={shape}")

    # ---- float32, masked positions zeroed before any arithmetic ----
    mask = mask.astype(bool)

    def clean(x: jax.Array) -> jax.Array:  # zeroes outside the current `mask` (rejections included)
        return jnp.where(mask, jnp.asarray(x).astype(_F32), 0.0)

    # ---- train/infer mismatch vs the sampler: masked IS (rejection), then TIS weights ----
    mask_in, rejected, tis_w = mask, None, None
    if sampler_logp is not None:
        is_log_ratio = _sg(clean(old_logp) - clean(sampler_logp))  # [B, T] log pi_old / pi_sampler
        seq_is_log_ratio = jnp.sum(is_log_ratio, axis=-1, keepdims=True)  # [B, 1] log of the product
        if is_mask != "none":
            lr = is_log_ratio if is_mask == "token" else seq_is_log_ratio
            rejected = mask_in & (jnp.abs(lr) > math.log(is_mask_threshold))
            mask = mask_in & ~rejected
        if tis_cap is not None:
            lr = is_log_ratio if tis_level == "token" else seq_is_log_ratio
            tis_raw = jnp.exp(jnp.clip(jnp.broadcast_to(lr, shape), -max_log_ratio, max_log_ratio))
            tis_w = jnp.minimum(tis_raw, tis_cap)

    logp = clean(logp)
    old_logp = _sg(clean(old_logp))
    adv = _sg(adv.astype(_F32))
    if adv.ndim == 1:
        adv = jnp.broadcast_to(adv[:, None], shape)
    adv = jnp.where(mask, adv, 0.0)

    # ---- importance ratio ----
    log_ratio = logp - old_logp  # [B, T], 0 at masked positions
    if ratio_level == "token":
        ratio = jnp.exp(jnp.clip(log_ratio, -max_log_ratio, max_log_ratio))
    else:  # GSPO-token: value s_b, gradient s_b * grad(logp_t)
        n_tok = jnp.sum(mask, axis=-1).astype(_F32)
        seq_log_ratio = safe_div(jnp.sum(log_ratio, axis=-1), n_tok)
        seq_log_ratio = jnp.clip(seq_log_ratio, -max_log_ratio, max_log_ratio)
        ratio = jnp.exp(_sg(seq_log_ratio)[:, None] + logp - _sg(logp))

    # ---- clipped surrogate (+ dual clip) ----
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    negative = adv < 0
    if clip_ratio_c is not None:
        pg_dual = -adv * clip_ratio_c
        is_dual = negative & (pg > pg_dual)
        pg = jnp.where(negative, jnp.minimum(pg, pg_dual), pg)

    # ---- truncated importance sampling against the sampler ----
    if tis_w is not None:
        pg = pg * tis_w

    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, _sg(clean(ref_logp)), kl_estimator, max_log_ratio=max_log_ratio,
                         kl_clamp=kl_clamp)
        if not _is_zero(kl_coef):
            per_token = per_token + kl_coef * kl
    ent = None
    if entropy is not None:
        ent = clean(entropy)
        if not _is_zero(entropy_coef):
            per_token = per_token - entropy_coef * ent

    # ---- sums ----
    den = loss_denominator(mask, loss_agg_mode, loss_norm_length=loss_norm_length)
    loss_sum = loss_numerator(per_token, mask, loss_agg_mode)

    def frac(cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        return masked_mean_terms(cond.astype(_F32), mask)

    r = _sg(ratio)
    neg_log_ratio = jnp.clip(-_sg(log_ratio), -max_log_ratio, max_log_ratio)
    means = {
        "pg_loss": (_sg(loss_numerator(pg, mask, loss_agg_mode)), den),
        "clip_frac_high": frac((adv > 0) & (r > 1.0 + clip_high)),
        "clip_frac_low": frac(negative & (r < 1.0 - clip_low)),
        "ratio_mean": masked_mean_terms(r, mask),
        "approx_kl": masked_mean_terms(jnp.exp(neg_log_ratio) - neg_log_ratio - 1.0, mask),
    }
    if clip_ratio_c is not None:
        means["clip_frac_dual"] = frac(_sg(is_dual))
    if kl is not None:
        means["kl"] = masked_mean_terms(_sg(kl), mask)
    if ent is not None:
        means["entropy"] = masked_mean_terms(_sg(ent), mask)
    if tis_w is not None:
        means["tis_weight_mean"] = masked_mean_terms(tis_w, mask)
        means["tis_clip_frac"] = frac(tis_raw > tis_cap)
    if rejected is not None:
        means["is_masked_frac"] = masked_mean_terms(rejected.astype(_F32), mask_in)
        means["is_masked_seq_frac"] = (jnp.sum(jnp.any(rejected, axis=-1)).astype(_F32),
                                       jnp.sum(jnp.any(mask_in, axis=-1)).astype(_F32))
    return LossTerms(
        loss_sum=loss_sum,
        denominator=den,
        means=means,
        mins={"ratio_min": masked_min(r, mask)},
        maxs={"ratio_max": masked_max(r, mask)},
    )


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    ratio_level: str = "token",
    loss_agg_mode: str = "token-mean",
    loss_norm_length: int | float | None = None,
    global_denominator: jax.Array | float | None = None,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float = 10.0,
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float | None = 2.0,
    tis_level: str = "token",
    is_mask: str = "none",
    is_mask_threshold: float = 2.0,
    max_log_ratio: float = 20.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (PPO/GRPO/DAPO/Dr.GRPO/GSPO) and its metrics. Pure, jittable.

    Args:
      logp: [B, T] float (any float dtype; computed in float32), log-probs of the sampled tokens
        under the current policy. The only input the loss is differentiated through (with `entropy`).
      old_logp: [B, T] log-probs under the policy that the ratio is taken against (pi_old).
      advantages: [B] float (one per sequence), or [B, T] per token.
      mask: [B, T] bool, True on response tokens that count in the loss.
      clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high]. PPO/GRPO: 0.2 / 0.2;
        DAPO clip-higher: 0.2 / 0.28; GSPO (ratio_level="sequence"): e.g. 3e-4 / 4e-4.
      clip_ratio_c: dual-clip constant (e.g. 3.0), must exceed 1 + clip_high; for A < 0 the loss
        is capped at -clip_ratio_c * A. None: off.
      ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO, length-normalised sequence ratio).
      loss_agg_mode: "token-mean" (DAPO), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum",
        "seq-mean-token-sum-norm" (Dr.GRPO). See `jaxrl_rm.objectives.reduction.aggregate`.
      loss_norm_length: Dr.GRPO's constant normaliser for "seq-mean-token-sum-norm" (default T).
      global_denominator: the full batch's `loss_denominator(full_mask, loss_agg_mode, ...)` when
        this call sees one micro-batch; then the micro-batch losses (and gradients) sum exactly to
        the full batch's. None: this batch's own denominator.
      ref_logp: [B, T] reference-policy log-probs (optional); enables the `kl` metric.
      kl_coef: coefficient of the KL penalty added per token (needs `ref_logp`). May be a traced
        scalar (a schedule); the clip values, `tis_cap` and the string options must be static.
      kl_estimator: "k1" | "k2" | "k3" (see `jaxrl_rm.objectives.kl.kl_estimate`).
      kl_clamp: the per-token k3 value is clamped to [-kl_clamp, kl_clamp] (default 10, as verl;
        0: off; static). Where it binds the token's KL gradient is 0. k1 / k2 are not clamped.
      entropy: [B, T] per-token entropy of the current policy (optional, differentiable).
      entropy_coef: entropy bonus coefficient: loss -= entropy_coef * aggregated entropy (may be
        traced, like `kl_coef`).
      sampler_logp: [B, T] log-probs of the same tokens from the sampler (e.g. the inference
        engine): `log_softmax(logits / T)` *before* top-k / top-p, so that the ratio to the
        trainer's `old_logp` measures only the train/infer mismatch. Optional; needed by TIS and
        `is_mask`. w = exp(old_logp - sampler_logp) per token, or its product over a sequence.
      tis_cap: truncated-IS cap: pg *= sg[min(w, tis_cap)] (default 2.0; None: no weights, e.g.
        for masking only).
      tis_level: "token" (w per token) | "sequence" (one product w per sequence; verl's
        `rollout_is: sequence`).
      is_mask: "none" | "token" (drop tokens with w outside [1/c, c], IcePop) | "sequence" (drop
        whole sequences whose product w leaves [1/c, c]); dropped tokens leave the loss (KL and
        entropy included) and its denominator.
      is_mask_threshold: c > 1 of `is_mask`.
      max_log_ratio: log-ratios are clipped to +-max_log_ratio before exp (overflow guard).

    Returns:
      loss: [] float32.
      metrics: dict of [] float32: pg_loss, clip_frac_low, clip_frac_high, ratio_mean, ratio_min,
        ratio_max, approx_kl; plus clip_frac_dual (dual clip), kl (ref_logp), entropy (entropy),
        tis_weight_mean and tis_clip_frac (TIS); is_masked_frac and is_masked_seq_frac
        (is_mask). Metrics describe this (micro-)batch;
        to combine micro-batches exactly, add their `policy_loss_terms` and call `.metrics()`.
    """
    terms = policy_loss_terms(
        logp, old_logp, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        ratio_level=ratio_level, loss_agg_mode=loss_agg_mode, loss_norm_length=loss_norm_length,
        ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
        entropy=entropy, entropy_coef=entropy_coef,
        sampler_logp=sampler_logp, tis_cap=tis_cap, tis_level=tis_level, is_mask=is_mask,
        is_mask_threshold=is_mask_threshold, max_log_ratio=max_log_ratio,
    )
    return terms.loss(global_denominator), terms.metrics()
