"""Bradley–Terry and POLAR losses against numpy, stability, micro-batching."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_rm.objectives import (
    bradley_terry_loss,
    bradley_terry_loss_terms,
    polar_finetune_loss,
    polar_pretrain_loss,
)


def np_softplus(x):  # -log sigmoid(-x), float64, stable
    return np.logaddexp(0.0, x)


def np_bt(rc, rr, margin=0.0, center_coef=0.0):
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    per = np_softplus(-(rc - rr - margin)) + center_coef * (rc + rr) ** 2
    return per.mean(), {
        "bt_loss": np_softplus(-(rc - rr - margin)).mean(),
        "accuracy": np.mean(rc > rr),
        "margin_mean": np.mean(rc - rr),
        "reward_mean": np.mean(np.concatenate([rc, rr])),
        "chosen_mean": rc.mean(),
        "rejected_mean": rr.mean(),
    }


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    rc = rng.normal(0.5, 1.5, 16).astype(np.float32)
    rr = rng.normal(0.0, 1.5, 16).astype(np.float32)
    return rc, rr


@pytest.mark.parametrize("margin", [None, 0.5, "array"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bt_matches_numpy(pairs, margin, center_coef):
    rc, rr = pairs
    m = np.linspace(0, 1, 16).astype(np.float32) if margin == "array" else margin
    loss, metrics = bradley_terry_loss(rc, rr, margin=m, center_coef=center_coef)
    want, want_m = np_bt(rc, rr, 0.0 if m is None else m, center_coef)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    for k, v in want_m.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
    if center_coef:
        np.testing.assert_allclose(float(metrics["center_loss"]), np.mean((rc.astype(np.float64) + rr) ** 2), rtol=1e-5)
    # gradient: d/drc = -sigmoid(-(d - m))/N + 2 c (rc + rr)/N
    g_c, g_r = jax.grad(lambda a, b: bradley_terry_loss(a, b, margin=m, center_coef=center_coef)[0], (0, 1))(rc, rr)
    d = rc.astype(np.float64) - rr - (0.0 if m is None else m)
    s = 1 / (1 + np.exp(d))
    cen = 2 * center_coef * (rc.astype(np.float64) + rr)
    np.testing.assert_allclose(np.asarray(g_c), (-s + cen) / 16, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_r), (s + cen) / 16, rtol=1e-5, atol=1e-8)


def test_bt_stable_for_large_rewards():
    rc = np.array([200.0, -200.0, 1e4], np.float32)
    rr = np.array([-200.0, 200.0, -1e4], np.float32)
    loss, m = bradley_terry_loss(rc, rr)
    np.testing.assert_allclose(float(loss), (0.0 + 400.0 + 0.0) / 3, rtol=1e-6)
    g = jax.grad(lambda a: bradley_terry_loss(a, rr)[0])(rc)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), [0.0, -1 / 3, 0.0], atol=1e-7)
    assert float(m["accuracy"]) == pytest.approx(2 / 3)


def test_bt_ties_count_as_wrong_and_bf16():
    loss, m = bradley_terry_loss(jnp.ones(4, jnp.bfloat16), jnp.ones(4, jnp.bfloat16))
    assert loss.dtype == jnp.float32 and float(m["accuracy"]) == 0.0
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    g = jax.grad(lambda a: bradley_terry_loss(a, jnp.zeros(4, jnp.bfloat16))[0])(jnp.ones(4, jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_bt_mask_and_microbatch_accumulation(pairs):
    rc, rr = pairs
    mask = np.ones(16, bool)
    mask[[3, 11]] = False
    rc_d, rr_d = rc.copy(), rr.copy()
    rc_d[3], rr_d[11] = np.nan, np.inf
    full, full_m = bradley_terry_loss(rc_d, rr_d, mask=mask, center_coef=0.01)
    want, _ = np_bt(rc[mask], rr[mask], center_coef=0.01)
    np.testing.assert_allclose(float(full), want, rtol=1e-6)

    grad = jax.grad(lambda a, i, n: bradley_terry_loss(a, rr_d[i], mask=mask[i], center_coef=0.01,
                                                       global_denominator=n)[0])
    g_full = grad(rc_d, np.arange(16), None)
    n = float(mask.sum())
    chunks = np.split(np.arange(16), 4)
    total = sum(float(bradley_terry_loss(rc_d[i], rr_d[i], mask=mask[i], center_coef=0.01, global_denominator=n)[0])
                for i in chunks)
    np.testing.assert_allclose(total, float(full), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([grad(rc_d[i], i, n) for i in chunks]), np.asarray(g_full), rtol=1e-6)
    assert np.isfinite(np.asarray(g_full)).all() and g_full[3] == 0
    terms = None
    for i in chunks:
        t = bradley_terry_loss_terms(rc_d[i], rr_d[i], mask=mask[i], center_coef=0.01)
        terms = t if terms is None else terms + t
    for k, v in full_m.items():
        np.testing.assert_allclose(float(terms.metrics()[k]), float(v), rtol=1e-6, atol=1e-7, err_msg=k)


def test_polar_losses_are_the_bt_loss(pairs):
    rc, rr = pairs
    bt = bradley_terry_loss(rc, rr, center_coef=0.01)
    for fn in (polar_pretrain_loss, polar_finetune_loss):
        loss, m = fn(rc, rr, center_coef=0.01)
        assert float(loss) == float(bt[0])
        assert m.keys() == bt[1].keys()


def test_bt_center_coef_may_be_traced(pairs):
    rc, rr = pairs
    f = jax.jit(lambda c: bradley_terry_loss(rc, rr, center_coef=c)[0])
    np.testing.assert_allclose(float(f(0.01)), float(bradley_terry_loss(rc, rr, center_coef=0.01)[0]), rtol=1e-6)


def test_bt_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        bradley_terry_loss(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(np.zeros(3), np.zeros(3), margin=np.zeros(2))
