"""group_advantages / zero_variance_groups against numpy loops."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jaxrl_rm.objectives import group_advantages, zero_variance_groups


def np_advantages(rewards, mode, eps=1e-6, mask=None, ddof=1):
    rewards = np.asarray(rewards, np.float64)
    mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        if len(idx) < 2:
            continue
        r = rewards[b, idx]
        for k, i in enumerate(idx):
            if mode == "grpo":
                out[b, i] = (r[k] - r.mean()) / (np.std(r, ddof=ddof) + eps)
            elif mode == "drgrpo":
                out[b, i] = r[k] - r.mean()
            else:  # leave-one-out baseline
                out[b, i] = r[k] - np.delete(r, k).mean()
    return out


REWARDS = np.array(
    [
        [1.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],  # zero variance
        [0.3, -1.2, 2.5, 0.7],
        [1.0, 1.0, 1.0, 1.0],  # zero variance
        [0.25, 0.5, 0.75, 1.0],
    ],
    np.float32,
)


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_match_numpy(mode):
    got = group_advantages(REWARDS, mode=mode)
    assert got.dtype == np.float32 and got.shape == REWARDS.shape
    np.testing.assert_allclose(np.asarray(got), np_advantages(REWARDS, mode), rtol=1e-5, atol=1e-6)


def test_grpo_std_is_unbiased_by_default():
    r = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)  # mean .5; unbiased std .5774, biased .5
    np.testing.assert_allclose(np.asarray(group_advantages(r, eps=0.0))[0], [0.8660254, -0.8660254, -0.8660254, 0.8660254], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(r, eps=0.0, std_ddof=0))[0], [1, -1, -1, 1], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(group_advantages(REWARDS, std_ddof=0)), np_advantages(REWARDS, "grpo", ddof=0), rtol=1e-5, atol=1e-6)


def test_zero_variance_groups_get_zero_advantage():
    for mode in ("grpo", "drgrpo", "rloo"):
        adv = np.asarray(group_advantages(REWARDS, mode=mode))
        assert np.all(adv[[1, 3]] == 0.0) and np.isfinite(adv).all()
    np.testing.assert_array_equal(np.asarray(zero_variance_groups(REWARDS)), [False, True, False, True, False])


def test_identical_rewards_give_exactly_zero():
    """A float32 mean of equal values is off by an ulp; (r - mean) / (std + eps) must not turn that
    into O(1) advantages."""
    r = np.array([[5.3681974] * 3 + [0.0] * 4, [0.1] * 7, [-3.3] * 5 + [9.0, 9.0]], np.float32)
    mask = np.array([[1] * 3 + [0] * 4, [1] * 7, [1] * 5 + [0, 0]], bool)
    for mode in ("grpo", "drgrpo", "rloo"):
        assert np.all(np.asarray(group_advantages(r, mode=mode, mask=mask)) == 0.0), mode
    assert np.asarray(zero_variance_groups(r, mask=mask)).all()


def test_masked_groups_of_variable_size():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    rewards = REWARDS.copy()
    rewards[~mask] = np.nan  # outside the group: ignored
    for mode in ("grpo", "drgrpo", "rloo"):
        got = np.asarray(group_advantages(rewards, mode=mode, mask=mask))
        np.testing.assert_allclose(got, np_advantages(np.nan_to_num(rewards), mode, mask=mask), rtol=1e-5, atol=1e-6)
        assert np.all(got[~mask] == 0.0)
    # row 1 (one sample) and row 3 (none) carry no signal; row 0 = [1, 0, 0] does
    np.testing.assert_array_equal(np.asarray(zero_variance_groups(rewards, mask=mask)), [False, True, False, True, False])


def test_group_size_one_and_tolerance():
    np.testing.assert_array_equal(np.asarray(group_advantages(np.ones((3, 1)), mode="rloo")), np.zeros((3, 1)))
    assert bool(zero_variance_groups(np.ones((1, 1)))[0])
    near = np.array([[0.5, 0.5 + 1e-8], [0.5, 0.51]], np.float32)
    np.testing.assert_array_equal(np.asarray(zero_variance_groups(near)), [True, False])
    np.testing.assert_array_equal(np.asarray(zero_variance_groups(near, atol=0.1)), [True, True])


def test_rloo_is_scaled_drgrpo():
    g = REWARDS.shape[1]
    np.testing.assert_allclose(
        np.asarray(group_advantages(REWARDS, mode="rloo")),
        g / (g - 1) * np.asarray(group_advantages(REWARDS, mode="drgrpo")), rtol=1e-6, atol=1e-7)


def test_advantages_jit_and_bad_args():
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda r: group_advantages(r, mode="rloo"))(REWARDS)),
        np.asarray(group_advantages(REWARDS, mode="rloo")), rtol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        group_advantages(REWARDS, mode="ppo")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(REWARDS[0])
    with pytest.raises(ValueError, match="mask"):
        zero_variance_groups(REWARDS, mask=np.ones((5, 3), bool))


_jit_adv = {m: jax.jit(lambda r, k, m=m: group_advantages(r, mode=m, mask=k)) for m in ("grpo", "drgrpo", "rloo")}
_jit_zero = jax.jit(lambda r, k: zero_variance_groups(r, mask=k))


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, (4, 6), elements=st.floats(-10, 10, width=32)),
    st.lists(st.integers(1, 6), min_size=4, max_size=4),
)
def test_advantage_properties(rewards, sizes):
    """Every mode centres each group; GRPO groups with spread have unit (unbiased) std. One shape,
    variable group sizes through the mask (so the jitted functions compile once)."""
    mask = np.arange(6)[None, :] < np.array(sizes)[:, None]
    zero = np.asarray(_jit_zero(rewards, mask))
    rows = np.array(sizes) >= 2
    for mode, fn in _jit_adv.items():
        adv = np.asarray(fn(rewards, mask), np.float64)
        assert np.all(adv[~mask] == 0)
        np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(adv, np_advantages(rewards, mode, mask=mask), rtol=1e-4, atol=1e-4)
    adv = np.asarray(_jit_adv["grpo"](rewards, mask), np.float64)
    spread = np.array([np.ptp(rewards[b, : sizes[b]]) for b in range(4)])
    for b in np.flatnonzero(rows & (spread > 1e-2)):
        assert np.std(adv[b, : sizes[b]], ddof=1) == pytest.approx(1.0, rel=1e-3)
    assert np.all(zero <= ((spread <= 1e-6) | ~rows))
    assert np.all(zero[~rows])
