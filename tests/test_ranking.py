"""Kendall τ (URPO formula) and the listwise judge reward built on it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from jaxrl_rm.rewards import kendall_tau, kendall_tau_reward, parse_listwise, tau_to_reward
from jaxrl_rm.rewards.parsers import ParseResult


def brute_force_tau(s, g) -> float:
    """The paper's formula, literally: 2/(N(N-1)) Σ_{i<j} sign((s_i - s_j)(g_i - g_j))."""
    n = len(s)
    if n < 2:
        return 0.0
    total = sum(np.sign((s[i] - s[j]) * (g[i] - g[j])) for i, j in itertools.combinations(range(n), 2))
    return 2.0 * total / (n * (n - 1))


def test_matches_scipy_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 16))
        s, g = rng.permutation(n).astype(float), rng.permutation(n).astype(float)  # no ties
        ref = scipy.stats.kendalltau(s, g).statistic
        assert float(kendall_tau(s, g)) == pytest.approx(ref, abs=1e-6)


def test_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        s = rng.integers(0, 4, size=n).astype(float)  # many ties in both
        g = rng.integers(0, 3, size=n).astype(float)
        assert float(kendall_tau(s, g)) == pytest.approx(brute_force_tau(s, g), abs=1e-6)


def test_batched_equals_rowwise():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=(64, 7)).astype(np.float32)
    g = rng.integers(0, 5, size=(64, 7)).astype(np.float32)
    tau = kendall_tau(s, g)
    assert tau.shape == (64,) and tau.dtype == np.float32
    np.testing.assert_allclose(tau, [brute_force_tau(a, b) for a, b in zip(s, g)], atol=1e-6)
    # gold broadcast over a batch of judgments
    np.testing.assert_allclose(kendall_tau(s, g[0]), [brute_force_tau(a, g[0]) for a in s], atol=1e-6)


def test_edge_cases_never_nan():
    assert float(kendall_tau([5, 5, 5, 5], [4, 3, 2, 1])) == 0.0  # a judge that ties everything earns 0
    assert float(kendall_tau([1, 2, 3], [3, 3, 3])) == 0.0  # all-tied gold
    assert float(kendall_tau([3, 2, 1], [3, 2, 1])) == 1.0
    assert float(kendall_tau([1, 2, 3], [3, 2, 1])) == -1.0
    assert float(kendall_tau([7], [1])) == 0.0 and float(kendall_tau([], [])) == 0.0
    # ties in gold keep the denominator N(N-1)/2: the best reachable τ is below 1
    assert float(kendall_tau([3, 2, 1], [2, 1, 1])) == pytest.approx(2 / 3)
    vals = kendall_tau([np.nan, 1, np.inf, -np.inf, 1e38], [1, 2, 3, 4, 5])
    assert np.isfinite(vals)


def test_jax_inputs_and_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    s = jnp.asarray([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    g = jnp.asarray([3.0, 1.0, 2.0])
    out = jax.jit(kendall_tau)(s, g)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.0], atol=1e-6)


def test_tau_mapping():
    assert tau_to_reward(-1.0, "raw") == -1.0 and tau_to_reward(-1.0, "unit") == 0.0
    assert tau_to_reward(1.0, "unit") == 1.0 and tau_to_reward(0.0, "unit") == 0.5
    with pytest.raises(ValueError):
        tau_to_reward(0.0, "bogus")


def test_kendall_tau_reward():
    think = "<think>Response 2 is best, 1 is wrong.</think>"
    outs = [
        think + r"\boxed{1, 9, 5}",  # perfect
        think + r"\boxed{9, 1, 5}",  # reversed
        think + r"\boxed{5, 5, 5}",  # all tied
        think + r"\boxed{1, 9}",  # wrong count
        r"\boxed{1, 9, 5}",  # no reasoning
        ":",  # master key
    ]
    gold = [[0, 2, 1]] * len(outs)
    results = [parse_listwise(o, n=3) for o in outs]
    raw = kendall_tau_reward(results, gold)
    assert raw.dtype == np.float32
    assert raw.tolist() == [1.0, -1.0, 0.0, -1.0, -1.0, -1.0]  # invalid → lowest reward by default
    unit = kendall_tau_reward(results, gold, mapping="unit")
    assert unit.tolist() == [1.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    custom = kendall_tau_reward(results, gold, invalid_reward=-2.0)
    assert custom.tolist()[3:] == [-2.0, -2.0, -2.0]
    # length mismatch between a valid parse and its gold is treated as invalid
    assert kendall_tau_reward([ParseResult(True, (1.0, 2.0), "ok")], [[1, 2, 3]]).tolist() == [-1.0]
    with pytest.raises(ValueError):
        kendall_tau_reward(results, gold[:2])
