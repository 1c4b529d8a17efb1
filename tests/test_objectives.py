"""policy_loss against a hand-written per-token numpy version, and exact micro-batch accumulation.

The oracle below is written token by token from the formulas (PPO/DAPO clip, dual clip, GSPO
sequence ratio, Schulman's k1/k2/k3, TIS, entropy bonus, verl/Dr.GRPO aggregation), in float64,
independently of the vectorised JAX code. Gradients are checked against the closed-form derivative.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_rm.objectives import (
    LOSS_AGG_MODES,
    LossTerms,
    aggregate,
    kl_estimate,
    loss_denominator,
    policy_loss,
    policy_loss_terms,
)

B, T = 8, 7
# Row-wise log-ratio shifts and advantages chosen so every clipping region is visited, at token and
# at sequence level: row 0 clips high (A > 0, r ~ 1.42), rows 1 and 7 clip low (A < 0, r ~ 0.7),
# row 3 hits the dual clip (A < 0, r ~ 3.7 > 3).
SHIFTS = np.array([0.35, -0.35, 0.05, 1.3, 0.0, 0.4, -1.2, -0.4])
ADV = np.array([0.7, -1.1, 0.4, -0.9, 1.5, -0.3, 0.8, -2.0], np.float32)
LENGTHS = np.array([7, 3, 5, 6, 1, 7, 4, 2])

CLIPS = {
    "ppo": dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=None),
    "clip_higher": dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=None),
    "dual_clip": dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0),
}


def make_batch(seed: int = 0, lengths=LENGTHS, b: int = B, t: int = T):
    rng = np.random.default_rng(seed)
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    logp = rng.uniform(-3.0, -0.05, (b, t)).astype(np.float32)
    old = (logp - SHIFTS[:b, None] - rng.normal(0.0, 0.25, (b, t))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.4, (b, t))).astype(np.float32)
    sampler = (old + rng.normal(0.0, 0.5, (b, t))).astype(np.float32)
    entropy = rng.uniform(0.1, 2.0, (b, t)).astype(np.float32)
    return dict(logp=logp, old_logp=old, advantages=ADV[:b].copy(), mask=mask,
                ref_logp=ref, sampler_logp=sampler, entropy=entropy)


# ----------------------------------------------------------------------------------------------
# numpy oracle, token by token
# ----------------------------------------------------------------------------------------------


def np_policy_loss(d, *, clip_low, clip_high, clip_ratio_c, ratio_level, loss_agg_mode,
                   loss_norm_length=None, kl_estimator=None, kl_coef=0.0, entropy_coef=0.0,
                   use_entropy=False, tis_cap=None):
    """Returns (loss, metrics, dloss/dlogp, dloss/dentropy), all float64."""
    logp = d["logp"].astype(np.float64)
    old = d["old_logp"].astype(np.float64)
    ref = d["ref_logp"].astype(np.float64)
    sampler = d["sampler_logp"].astype(np.float64)
    ent = d["entropy"].astype(np.float64)
    adv = d["advantages"].astype(np.float64)
    mask = d["mask"]
    nb, nt = mask.shape
    loss_tok = np.zeros((nb, nt))
    pg_tok = np.zeros((nb, nt))
    dpg = np.zeros((nb, nt))  # d(per-token loss)/d logp_t
    c_low = c_high = c_dual = 0
    ratios, approx_kl, kls = [], [], []
    for b in range(nb):
        valid = [t for t in range(nt) if mask[b, t]]
        if not valid:
            continue
        s = math.exp(sum(logp[b, t] - old[b, t] for t in valid) / len(valid))
        a = adv[b]
        for t in valid:
            r = math.exp(logp[b, t] - old[b, t]) if ratio_level == "token" else s
            ratios.append(r)
            r_clip = min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            loss = -min(r * a, r_clip * a)
            grad = -a * r  # unclipped branch; GSPO-token: d/dlogp [sg(s) exp(logp - sg(logp))] = s
            if a > 0 and r > 1.0 + clip_high:
                c_high += 1
                grad = 0.0
            if a < 0 and r < 1.0 - clip_low:
                c_low += 1
                grad = 0.0
            if clip_ratio_c is not None and a < 0 and loss > -clip_ratio_c * a:
                c_dual += 1
                loss = -clip_ratio_c * a
                grad = 0.0
            if tis_cap is not None:
                w = min(math.exp(old[b, t] - sampler[b, t]), tis_cap)
                loss *= w
                grad *= w
            pg_tok[b, t] = loss
            if kl_estimator is not None:
                x = ref[b, t] - logp[b, t]
                kl, dkl = {
                    "k1": (-x, 1.0),
                    "k2": (0.5 * x * x, -x),
                    "k3": (math.exp(x) - x - 1.0, 1.0 - math.exp(x)),
                }[kl_estimator]
                kls.append(kl)
                loss += kl_coef * kl
                grad += kl_coef * dkl
            if use_entropy:
                loss -= entropy_coef * ent[b, t]
            loss_tok[b, t] = loss
            dpg[b, t] = grad
            y = old[b, t] - logp[b, t]
            approx_kl.append(math.exp(y) - y - 1.0)

    rows = [b for b in range(nb) if mask[b].any()]
    n_tok = mask.sum()
    n_seq = len(rows)
    length = nt if loss_norm_length is None else loss_norm_length
    weight = np.zeros((nb, nt))  # d loss / d per-token loss
    for b in rows:
        for t in range(nt):
            if mask[b, t]:
                weight[b, t] = {
                    "token-mean": 1.0 / n_tok,
                    "seq-mean-token-mean": 1.0 / (n_seq * mask[b].sum()),
                    "seq-mean-token-sum": 1.0 / n_seq,
                    "seq-mean-token-sum-norm": 1.0 / (n_seq * length),
                }[loss_agg_mode]
    loss = float(np.sum(weight * loss_tok))
    metrics = {
        "pg_loss": float(np.sum(weight * pg_tok)),
        "clip_frac_high": c_high / n_tok,
        "clip_frac_low": c_low / n_tok,
        "ratio_mean": float(np.mean(ratios)),
        "ratio_min": float(np.min(ratios)),
        "ratio_max": float(np.max(ratios)),
        "approx_kl": float(np.mean(approx_kl)),
    }
    if clip_ratio_c is not None:
        metrics["clip_frac_dual"] = c_dual / n_tok
    if kl_estimator is not None:
        metrics["kl"] = float(np.mean(kls))
    if use_entropy:
        metrics["entropy"] = float(ent[mask].mean())
    return loss, metrics, weight * dpg, -entropy_coef * weight


def jax_inputs(d, *, kl_estimator=None, use_entropy=False, tis=False):
    kw = {}
    if kl_estimator is not None:
        kw["ref_logp"] = jnp.asarray(d["ref_logp"])
    if use_entropy:
        kw["entropy"] = jnp.asarray(d["entropy"])
    if tis:
        kw["sampler_logp"] = jnp.asarray(d["sampler_logp"])
    return kw


def assert_metrics(got, want):
    assert set(got) >= set(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k].dtype == jnp.float32 and got[k].shape == (), k
        np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# the acceptance grid: aggregation x clip setting x ratio level x KL estimator
# ----------------------------------------------------------------------------------------------

GRID = list(itertools.product(LOSS_AGG_MODES, CLIPS, ("token", "sequence"), (None, "k1", "k2", "k3")))


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.mark.parametrize("mode,clip,level,kl_est", GRID)
def test_policy_loss_matches_numpy(batch, mode, clip, level, kl_est):
    kl_coef = 0.05 if kl_est is not None else 0.0
    cfg = dict(**CLIPS[clip], ratio_level=level, loss_agg_mode=mode)
    want_loss, want_metrics, want_dlogp, _ = np_policy_loss(batch, kl_estimator=kl_est, kl_coef=kl_coef, **cfg)
    extra = jax_inputs(batch, kl_estimator=kl_est)

    def f(logp):
        return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                           kl_coef=kl_coef, kl_estimator=kl_est or "k3", **extra, **cfg)

    (loss, metrics), dlogp = jax.value_and_grad(f, has_aux=True)(jnp.asarray(batch["logp"]))
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    assert_metrics(metrics, want_metrics)
    np.testing.assert_allclose(np.asarray(dlogp), want_dlogp, rtol=2e-5, atol=1e-7)


def test_fixture_visits_every_clip_region(batch):
    """Guard for the grid above: each clipping branch is exercised at both ratio levels."""
    for level in ("token", "sequence"):
        _, m = policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"],
                           ratio_level=level, **CLIPS["dual_clip"])
        for k in ("clip_frac_high", "clip_frac_low", "clip_frac_dual"):
            assert float(m[k]) > 0, (level, k)
        n_tok = batch["mask"].sum()
        assert float(m["clip_frac_high"]) + float(m["clip_frac_low"]) + float(m["clip_frac_dual"]) < 1 - 1 / n_tok


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_entropy_and_kl_together(batch, mode, level):
    cfg = dict(**CLIPS["dual_clip"], ratio_level=level, loss_agg_mode=mode, loss_norm_length=11)
    want_loss, want_metrics, want_dlogp, want_dent = np_policy_loss(
        batch, kl_estimator="k3", kl_coef=0.1, use_entropy=True, entropy_coef=0.01, tis_cap=1.5, **cfg)
    extra = jax_inputs(batch, kl_estimator="k3", use_entropy=True, tis=True)

    def f(logp, entropy):
        return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                           kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, tis_cap=1.5,
                           **{**extra, "entropy": entropy}, **cfg)

    (loss, metrics), (dlogp, dent) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(batch["logp"]), jnp.asarray(batch["entropy"]))
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    assert_metrics(metrics, want_metrics)
    np.testing.assert_allclose(np.asarray(dlogp), want_dlogp, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dent), want_dent, rtol=2e-5, atol=1e-9)
    w = np.minimum(np.exp(batch["old_logp"] - batch["sampler_logp"]), 1.5)[batch["mask"]]
    np.testing.assert_allclose(float(metrics["tis_weight_mean"]), w.mean(), rtol=1e-5)
    assert 0 < float(metrics["tis_clip_frac"]) < 1


@pytest.mark.parametrize("tis_level", ["token", "sequence"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_levels_weight_the_policy_gradient_like_scaled_advantages(batch, tis_level, level):
    """pg * w with w > 0 is the surrogate (clip, dual clip included) with advantage A * w: TIS at
    token level (w_t = min(exp(old_t - sampler_t), cap)) and at sequence level (w_b = min(exp(sum
    over the sequence of old - sampler), cap), verl's rollout_is: sequence) against that identity."""
    cfg = dict(**CLIPS["dual_clip"], ratio_level=level, loss_agg_mode="seq-mean-token-mean")
    d = {k: np.asarray(v, np.float64) for k, v in batch.items() if k != "mask"}
    lr = np.where(batch["mask"], d["old_logp"] - d["sampler_logp"], 0.0)
    lr = lr if tis_level == "token" else np.broadcast_to(lr.sum(-1, keepdims=True), lr.shape)
    w = np.minimum(np.exp(lr), 1.5)
    adv_w = (d["advantages"][:, None] * w).astype(np.float32)

    def tis(logp):
        return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                           sampler_logp=batch["sampler_logp"], tis_cap=1.5, tis_level=tis_level, **cfg)

    def scaled(logp):
        return policy_loss(logp, batch["old_logp"], adv_w, batch["mask"], **cfg)

    (loss, m), grad = jax.value_and_grad(tis, has_aux=True)(jnp.asarray(batch["logp"]))
    (want, _), want_grad = jax.value_and_grad(scaled, has_aux=True)(jnp.asarray(batch["logp"]))
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["tis_weight_mean"]), w[batch["mask"]].mean(), rtol=1e-5)
    assert 0 < float(m["tis_clip_frac"]) < 1  # the cap binds on some tokens / sequences, not all


def _mismatch_example():
    """Rows of 5, 3, 4 and 0 valid tokens with chosen log-ratios old - sampler (c = 2, log c = 0.693):
    token level rejects row 0 t1 (0.9) and row 2 t3 (-0.75): 2 of 12 tokens, 2 of 3 sequences;
    sequence level rejects row 1 (sum 0.9; rows 0 and 2 sum to 0.5 and -0.65): 3 tokens, 1 sequence."""
    mask = np.arange(5)[None, :] < np.array([5, 3, 4, 0])[:, None]
    lr = np.array([[0.1, 0.9, -0.2, 0.0, -0.3],
                   [0.3, 0.3, 0.3, 5.0, 5.0],
                   [-0.5, 0.6, 0.0, -0.75, 9.0],
                   [9.0, -9.0, 9.0, -9.0, 9.0]])  # values off the mask are never looked at
    rng = np.random.default_rng(3)
    logp = rng.uniform(-3.0, -0.1, mask.shape).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, mask.shape)).astype(np.float32)
    sampler = (old - lr).astype(np.float32)
    sampler[~mask] = np.nan
    return dict(logp=logp, old_logp=old, sampler_logp=sampler, mask=mask,
                advantages=np.array([1.0, -0.5, 0.8, 0.3], np.float32),
                ref_logp=(logp + rng.normal(0.0, 0.3, mask.shape)).astype(np.float32),
                entropy=rng.uniform(0.1, 2.0, mask.shape).astype(np.float32))


@pytest.mark.parametrize("is_mask,rejected,tok_frac,seq_frac", [
    ("token", [(0, 1), (2, 3)], 2 / 12, 2 / 3),
    ("sequence", [(1, 0), (1, 1), (1, 2)], 3 / 12, 1 / 3),
])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_masked_is_rejects_exactly_and_reports_the_masked_fraction(is_mask, rejected, tok_frac, seq_frac, mode):
    """Masked IS (IcePop / verl rollout_rs): tokens (sequences) whose ratio leaves [1/c, c] leave
    the loss, KL and entropy included, and its denominator - the loss equals the plain loss on the
    reduced mask; the masked fractions are exact; micro-batches add up."""
    d = _mismatch_example()
    keep = d["mask"].copy()
    for b, t in rejected:
        keep[b, t] = False
    common = dict(ref_logp=d["ref_logp"], kl_coef=0.1, entropy_coef=0.01, loss_agg_mode=mode)

    def masked(logp, tis_cap=None):
        return policy_loss(logp, d["old_logp"], d["advantages"], d["mask"], entropy=d["entropy"],
                           sampler_logp=d["sampler_logp"], tis_cap=tis_cap, is_mask=is_mask,
                           is_mask_threshold=2.0, **common)

    def reduced(logp):
        return policy_loss(logp, d["old_logp"], d["advantages"], keep, entropy=d["entropy"], **common)

    (loss, m), grad = jax.value_and_grad(masked, has_aux=True)(jnp.asarray(d["logp"]))
    (want, _), want_grad = jax.value_and_grad(reduced, has_aux=True)(jnp.asarray(d["logp"]))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-8)
    assert not np.asarray(grad)[d["mask"] & ~keep].any()
    assert float(m["is_masked_frac"]) == pytest.approx(tok_frac, abs=1e-7)
    assert float(m["is_masked_seq_frac"]) == pytest.approx(seq_frac, abs=1e-7)
    assert "tis_weight_mean" not in m  # tis_cap=None: masking only
    # the same sums from two row micro-batches
    parts = [policy_loss_terms(d["logp"][r], d["old_logp"][r], d["advantages"][r], d["mask"][r],
                               **{**common, "ref_logp": d["ref_logp"][r]}, entropy=d["entropy"][r],
                               sampler_logp=d["sampler_logp"][r], tis_cap=None, is_mask=is_mask,
                               is_mask_threshold=2.0)
             for r in (slice(0, 2), slice(2, 4))]
    total = parts[0] + parts[1]
    np.testing.assert_allclose(float(total.loss()), float(loss), rtol=1e-6)
    assert float(total.metrics()["is_masked_frac"]) == pytest.approx(tok_frac, abs=1e-7)
    assert float(total.metrics()["is_masked_seq_frac"]) == pytest.approx(seq_frac, abs=1e-7)
    # IcePop: with tis_cap >= c the kept tokens carry their exact ratio exp(old - sampler)
    lr = np.where(keep, d["old_logp"].astype(np.float64) - d["sampler_logp"], 0.0)
    w = np.exp(lr if is_mask == "token" else np.broadcast_to(lr.sum(-1, keepdims=True), lr.shape))
    icepop, _ = policy_loss(d["logp"], d["old_logp"], d["advantages"], d["mask"], sampler_logp=d["sampler_logp"],
                            tis_cap=2.0, tis_level=is_mask, is_mask=is_mask, is_mask_threshold=2.0,
                            loss_agg_mode=mode)
    want, _ = policy_loss(d["logp"], d["old_logp"], (d["advantages"][:, None] * w).astype(np.float32), keep,
                          loss_agg_mode=mode)
    np.testing.assert_allclose(float(icepop), float(want), rtol=1e-6, atol=1e-7)


def test_gspo_small_clip_is_per_sequence(batch):
    """GSPO ranges (3e-4 / 4e-4): the clip decision is the same for every token of a sequence, and
    unclipped sequences get gradient -A * s / (G |y|) per token (the GSPO objective's gradient)."""
    d = make_batch(lengths=LENGTHS)
    d["old_logp"][4] = d["logp"][4]  # row 4 on-policy: s = 1, never clipped
    cfg = dict(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", loss_agg_mode="seq-mean-token-mean")
    want_loss, _, want_dlogp, _ = np_policy_loss(d, clip_ratio_c=None, **cfg)

    def f(logp):
        return policy_loss(logp, d["old_logp"], d["advantages"], d["mask"], **cfg)[0]

    loss, g = jax.value_and_grad(f)(jnp.asarray(d["logp"]))
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
    g = np.asarray(g)
    np.testing.assert_allclose(g, want_dlogp, rtol=2e-5, atol=1e-8)
    n_seq = B
    np.testing.assert_allclose(g[4, 0], -ADV[4] / (n_seq * LENGTHS[4]), rtol=1e-5)
    for b in range(B):  # per-sequence: all valid tokens zero, or all nonzero
        nz = g[b][d["mask"][b]] != 0
        assert nz.all() or (~nz).all(), b


# ----------------------------------------------------------------------------------------------
# exact gradient accumulation over micro-batches
# ----------------------------------------------------------------------------------------------

FULL_CFG = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_coef=0.05, kl_estimator="k3",
                entropy_coef=0.01, tis_cap=2.0)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_microbatch_accumulation_is_exact(mode, level):
    lengths = LENGTHS.copy()
    lengths[5] = 0  # a padding row inside one micro-batch
    d = make_batch(seed=1, lengths=lengths)
    cfg = dict(FULL_CFG, ratio_level=level, loss_agg_mode=mode)

    def loss_fn(logp, entropy, rows, global_denominator=None):
        return policy_loss(
            logp, d["old_logp"][rows], d["advantages"][rows], d["mask"][rows],
            ref_logp=d["ref_logp"][rows], sampler_logp=d["sampler_logp"][rows], entropy=entropy,
            global_denominator=global_denominator, **cfg)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    full_rows = np.arange(B)
    (full_loss, full_metrics), (g_logp, g_ent) = grad_fn(d["logp"], d["entropy"], full_rows)

    den = loss_denominator(d["mask"], mode)
    acc_loss, acc_g_logp, acc_g_ent = 0.0, [], []
    terms = None
    for rows in np.split(full_rows, 4):
        (l_i, _), (gl, ge) = grad_fn(d["logp"][rows], d["entropy"][rows], rows, den)
        acc_loss += l_i
        acc_g_logp.append(gl)
        acc_g_ent.append(ge)
        t_i = policy_loss_terms(
            d["logp"][rows], d["old_logp"][rows], d["advantages"][rows], d["mask"][rows],
            ref_logp=d["ref_logp"][rows], sampler_logp=d["sampler_logp"][rows],
            entropy=d["entropy"][rows], **cfg)
        terms = t_i if terms is None else terms + t_i

    np.testing.assert_allclose(float(acc_loss), float(full_loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(acc_g_logp), np.asarray(g_logp), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.concatenate(acc_g_ent), np.asarray(g_ent), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(terms.loss()), float(full_loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(terms.denominator), float(den))
    acc_metrics = terms.metrics()
    assert set(acc_metrics) == set(full_metrics)
    for k in full_metrics:
        np.testing.assert_allclose(float(acc_metrics[k]), float(full_metrics[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_microbatch_accumulation_under_jit_scan():
    """The trainer's shape: jit + lax.scan over stacked micro-batches, grads summed."""
    d = make_batch(seed=2)
    mode = "seq-mean-token-mean"

    def loss_fn(logp, mb, den):
        return policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], ref_logp=mb["ref_logp"],
                           global_denominator=den, kl_coef=0.1, loss_agg_mode=mode, clip_high=0.28)[0]

    keys = ("logp", "old_logp", "advantages", "mask", "ref_logp")

    @jax.jit
    def accumulated(batch):
        den = loss_denominator(batch["mask"], mode)
        stacked = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), batch)

        def step(carry, mb):
            l, g = jax.value_and_grad(loss_fn)(mb["logp"], mb, den)
            return (carry[0] + l, carry[1]), g

        (loss, _), grads = jax.lax.scan(step, (jnp.float32(0), 0), stacked)
        return loss, grads.reshape(B, T)

    batch = {k: jnp.asarray(d[k]) for k in keys}
    loss, grads = accumulated(batch)
    full_loss, full_grads = jax.jit(jax.value_and_grad(lambda lp: loss_fn(lp, batch, None)))(batch["logp"])
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads), np.asarray(full_grads), rtol=1e-6, atol=1e-9)


def test_coefficients_may_be_traced(batch):
    """kl_coef / entropy_coef can come from a schedule inside jit."""
    args = (batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    kw = dict(ref_logp=batch["ref_logp"], entropy=batch["entropy"])

    @jax.jit
    def f(kl_coef, entropy_coef):
        return policy_loss(*args, kl_coef=kl_coef, entropy_coef=entropy_coef, **kw)[0]

    want = policy_loss(*args, kl_coef=0.1, entropy_coef=0.01, **kw)[0]
    np.testing.assert_allclose(float(f(0.1, 0.01)), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(f(0.0, 0.0)), float(policy_loss(*args)[0]), rtol=1e-6)


def test_loss_terms_sum_leading_axis():
    d = make_batch(seed=3)

    def terms(rows):
        return policy_loss_terms(d["logp"][rows], d["old_logp"][rows], d["advantages"][rows], d["mask"][rows])

    parts = [terms(r) for r in np.split(np.arange(B), 4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    a, b, c = stacked.sum_leading_axis(), terms(np.arange(B)), sum(parts)
    assert isinstance(a, LossTerms) and isinstance(c, LossTerms)
    for k, v in b.metrics().items():
        np.testing.assert_allclose(float(a.metrics()[k]), float(v), rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(float(c.metrics()[k]), float(v), rtol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# dtypes, padding, validation, aggregation and KL helpers
# ----------------------------------------------------------------------------------------------


def test_bf16_inputs_compute_in_float32(batch):
    bf = {k: jnp.asarray(batch[k], jnp.bfloat16) for k in ("logp", "old_logp", "ref_logp", "entropy")}
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in bf.items()}
    kw = dict(kl_coef=0.1, entropy_coef=0.01, clip_high=0.28)

    def f(inputs):
        return policy_loss(inputs["logp"], inputs["old_logp"], jnp.asarray(batch["advantages"], jnp.bfloat16),
                           batch["mask"], ref_logp=inputs["ref_logp"], entropy=inputs["entropy"], **kw)

    loss_bf, m_bf = f(bf)
    loss_32, m_32 = f(f32)
    assert loss_bf.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m_bf.values())
    np.testing.assert_allclose(float(loss_bf), float(loss_32), rtol=1e-6)
    g = jax.grad(lambda lp: f({**bf, "logp": lp})[0])(bf["logp"])
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_masked_positions_are_ignored_even_if_nan(batch):
    kw = dict(ratio_level="sequence", loss_agg_mode="seq-mean-token-mean", clip_ratio_c=3.0,
              kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01)
    clean = {k: batch[k].copy() for k in ("logp", "old_logp", "ref_logp", "sampler_logp", "entropy")}
    dirty = {k: v.copy() for k, v in clean.items()}
    pad = ~batch["mask"]
    for i, k in enumerate(dirty):
        dirty[k][pad] = [np.nan, np.inf, -np.inf][i % 3]

    def f(logp, x):
        return policy_loss(logp, x["old_logp"], batch["advantages"], batch["mask"], ref_logp=x["ref_logp"],
                           sampler_logp=x["sampler_logp"], entropy=x["entropy"], **kw)

    (l_c, m_c), g_c = jax.value_and_grad(f, has_aux=True)(clean["logp"], clean)
    (l_d, m_d), g_d = jax.value_and_grad(f, has_aux=True)(dirty["logp"], dirty)
    assert np.isfinite(float(l_d)) and np.isfinite(np.asarray(g_d)).all()
    np.testing.assert_allclose(float(l_d), float(l_c), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(g_d), np.asarray(g_c), rtol=1e-7)
    assert np.all(np.asarray(g_d)[pad] == 0)
    for k in m_c:
        np.testing.assert_allclose(float(m_d[k]), float(m_c[k]), rtol=1e-7, err_msg=k)


def test_token_level_advantages_and_on_policy_gradient(batch):
    """[B, T] advantages equal to the broadcast [B] ones give the same loss; on-policy (ratio 1)
    the gradient of token-mean is -A / N per token."""
    adv_bt = np.broadcast_to(batch["advantages"][:, None], (B, T))
    l1, _ = policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    l2, _ = policy_loss(batch["logp"], batch["old_logp"], adv_bt, batch["mask"])
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-7)
    g = jax.grad(lambda lp: policy_loss(lp, batch["logp"], batch["advantages"], batch["mask"])[0])(batch["logp"])
    want = np.where(batch["mask"], -adv_bt / batch["mask"].sum(), 0.0)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6)


def test_empty_mask_gives_zero_not_nan(batch):
    mask = np.zeros((B, T), bool)
    for mode in LOSS_AGG_MODES:
        loss, m = policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], mask, loss_agg_mode=mode)
        assert float(loss) == 0.0
        assert all(np.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_agg_mode="seq-mean"), "loss_agg_mode"),
        (dict(ratio_level="seq"), "ratio_level"),
        (dict(kl_estimator="k4", ref_logp=np.zeros((B, T))), "kl_estimator"),
        (dict(kl_coef=0.1), "needs ref_logp"),
        (dict(entropy_coef=0.1), "needs entropy"),
        (dict(clip_ratio_c=1.1), "clip_ratio_c"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(ref_logp=np.zeros((B, T + 1))), "ref_logp has shape"),
        (dict(sampler_logp=np.zeros((B, T)), tis_cap=0.0), "tis_cap"),
        (dict(sampler_logp=np.zeros((B, T)), tis_level="seq"), "tis_level"),
        (dict(sampler_logp=np.zeros((B, T)), is_mask="geometric"), "is_mask"),
        (dict(sampler_logp=np.zeros((B, T)), is_mask="token", is_mask_threshold=1.0), "is_mask_threshold"),
        (dict(is_mask="token"), "needs sampler_logp"),
    ],
)
def test_policy_loss_rejects_bad_arguments(batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], **kwargs)


def test_policy_loss_rejects_bad_advantage_shape(batch):
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(batch["logp"], batch["old_logp"], batch["advantages"][:-1], batch["mask"])


def test_aggregate_modes_by_hand():
    v = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)  # last row: padding
    assert float(aggregate(v, m, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate(v, m, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(v, m, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(v, m, "seq-mean-token-sum-norm")) == pytest.approx(10 / (2 * 4))
    assert float(aggregate(v, m, "seq-mean-token-sum-norm", loss_norm_length=10)) == pytest.approx(10 / 20)
    assert float(loss_denominator(m, "seq-mean-token-sum-norm", loss_norm_length=10)) == 20.0


def test_kl_estimators_exact_expectation():
    """E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q) exactly; k2 >= 0, k3 >= 0 pointwise."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    logp, logq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    for est in ("k1", "k3"):
        e = float(np.sum(p * np.asarray(kl_estimate(logp, logq, est), np.float64)))
        assert e == pytest.approx(kl, rel=1e-5), est
    x = logq.astype(np.float64) - logp
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, logq, "k2")), 0.5 * x**2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, logq, "k3")), np.exp(x) - x - 1, rtol=1e-5, atol=1e-7)
    assert (np.asarray(kl_estimate(logp, logq, "k3")) >= 0).all()
    big = kl_estimate(jnp.float32(-200.0), jnp.float32(-1.0), "k3")
    assert np.isfinite(float(big))


@pytest.mark.parametrize("kl_clamp", [None, 3.0, 0.0])  # None: the default (10, as verl)
def test_k3_kl_clamp_value_and_gradient_at_large_ratios(kl_clamp):
    """The k3 value is clamped to [-kl_clamp, kl_clamp] (verl's low_var_kl: [-10, 10]): one token
    far from the reference adds at most kl_clamp and no gradient, instead of up to e^20. Values
    and gradients of the policy loss's KL term against the closed form, finite everywhere."""
    x = np.array([-200.0, -25.0, -11.5, -3.0, -0.5, 0.0, 0.4, 1.5, 2.2, 2.5, 15.0, 19.0, 30.0, 200.0])
    ref = np.full_like(x, -1.0)
    logp = (ref - x).astype(np.float32)  # log_r = ref - logp = x, ratio pi_ref / pi up to e^200
    mask = np.ones((1, x.size), bool)
    kw = {} if kl_clamp is None else {"kl_clamp": kl_clamp}
    c = 10.0 if kl_clamp is None else kl_clamp

    def loss(lp):  # zero advantages: the KL term alone, token-mean over the row
        return policy_loss(lp, lp, jnp.zeros(1), mask, ref_logp=jnp.asarray(ref[None], jnp.float32),
                           kl_coef=1.0, kl_estimator="k3", **kw)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(logp[None]))
    xc = np.clip(x, -20.0, 20.0)
    k3 = np.exp(xc) - xc - 1.0
    dk3 = np.where(np.abs(x) < 20.0, 1.0 - np.exp(xc), 0.0)  # d k3 / d logp
    if c > 0:
        k3, dk3 = np.minimum(k3, c), np.where(k3 < c, dk3, 0.0)
    grad = np.asarray(grad)[0]
    assert np.isfinite(float(value)) and np.isfinite(grad).all()
    assert float(value) == pytest.approx(k3.mean(), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(k3.mean(), rel=1e-5)
    np.testing.assert_allclose(grad * x.size, dk3, rtol=1e-4, atol=1e-6)
    if c > 0:
        assert (grad[k3 >= c] == 0).all() and (grad[(k3 < c) & (x != 0)] != 0).all()
        assert float(value) <= c
    np.testing.assert_allclose(np.asarray(kl_estimate(logp, ref, "k3", kl_clamp=c)), k3, rtol=1e-5)


def test_kl_clamp_bad_values_raise():
    with pytest.raises(ValueError, match="kl_clamp=-1"):
        kl_estimate(np.zeros(3), np.zeros(3), "k3", kl_clamp=-1.0)
    with pytest.raises(ValueError, match="kl_clamp=-1"):
        policy_loss(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros(1), np.ones((1, 3), bool),
                    ref_logp=jnp.zeros((1, 3)), kl_coef=0.1, kl_clamp=-1.0)
