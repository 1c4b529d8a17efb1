"""`type: ensemble` rewards: several sources scored on the same rollouts and reduced per rollout
(`mean`, or `min`: a hack must fool every member), with each member's metrics, the members'
disagreement, config errors that name the member, and evaluation views (the planner's programs:
tests/test_plan.py)."""

import numpy as np
import pytest

from jaxrl_rm.config import RewardSpec
from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.rewards.sources import EnsembleSource, Rollouts, build_source


def rollouts(answers, completions):
    b, g = len(completions), len(completions[0])
    items = [PromptItem(task="math", prompt=f"q{i}", answer=a, reference=a, id=i) for i, a in enumerate(answers)]
    return Rollouts(items=items, prompt_texts=[f"q{i}" for i in range(b)], completions=completions,
                    completion_ids=np.zeros((b, g, 2), np.int32), completion_mask=np.ones((b, g, 2), bool),
                    lengths=np.full((b, g), 2), truncated=np.zeros((b, g), bool))


class Constant:
    """A member that pays fixed rewards `[B, G]` and reports one metric."""

    def __init__(self, name, rewards):
        self.name, self.rewards, self.evaluated = name, np.asarray(rewards, np.float32), False

    def __call__(self, rollouts):
        return self.rewards, {"calls": 1.0}

    def for_eval(self):
        view = Constant(self.name, self.rewards)
        view.evaluated = True
        return view


def test_min_and_mean_reduce_per_rollout_with_member_metrics():
    a = Constant("judge", [[1.0, 0.0, 0.6]])
    b = Constant("judge", [[0.2, 0.5, 0.6]])
    ro = rollouts(["1"], [["x", "y", "z"]])
    r, m = EnsembleSource([a, b], reduce="min")(ro)
    np.testing.assert_allclose(r, [[0.2, 0.0, 0.6]])
    r, m = EnsembleSource([a, b], reduce="mean")(ro)
    np.testing.assert_allclose(r, [[0.6, 0.25, 0.6]])
    assert r.dtype == np.float32
    # two members of one type keep apart by index
    assert m["m0_judge/mean"] == pytest.approx(1.6 / 3) and m["m1_judge/mean"] == pytest.approx(1.3 / 3)
    assert m["m0_judge/calls"] == 1.0 and m["m1_judge/calls"] == 1.0
    assert m["disagreement"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    view = EnsembleSource([a, b], reduce="min").for_eval()
    assert all(member.evaluated for member in view.members) and view.reduce == "min"


def test_built_from_config_with_rule_members():
    """The MATH verifier and exact match disagree on real formats (gold 0.5): the verifier accepts
    `\\boxed{\\frac{1}{2}}` and rejects a bare `0.5` without a final-answer marker, exact match the
    reverse. `min` pays only what both accept, `mean` half of what one accepts."""
    spec = RewardSpec(type="ensemble", options={"reduce": "min", "name": "both", "members": [
        {"type": "verifier"}, {"type": "exact_match"}]})
    src = build_source(spec, {})
    ro = rollouts(["0.5"], [["The answer is \\boxed{\\frac{1}{2}}", "0.5", "The answer is 0.5", "\\boxed{3}"]])
    r, m = src(ro)
    assert src.name == "both" and [member.name for member in src.members] == ["verifier_math", "verifier_exact"]
    np.testing.assert_allclose(src.members[0](ro)[0], [[1, 0, 1, 0]])
    np.testing.assert_allclose(src.members[1](ro)[0], [[0, 1, 1, 0]])
    np.testing.assert_allclose(r, [[0, 0, 1, 0]])
    assert m["m0_verifier_math/mean"] == m["m1_verifier_exact/mean"] == 0.5 and m["disagreement"] == 0.5
    mean_src = build_source(RewardSpec(type="ensemble", options={"members": spec.options["members"]}), {})
    np.testing.assert_allclose(mean_src(ro)[0], [[0.5, 0.5, 1, 0]])


@pytest.mark.parametrize("options, message", [
    ({"members": [{"type": "verifier"}]}, "at least 2 members"),
    ({"members": [{"type": "verifier"}, {"type": "exact_match"}], "reduce": "max"}, "reduce must be"),
    ({"members": [{"type": "verifier"}, {"path": "x"}]}, r"options.members\[1\] must be a reward spec"),
    ({"members": [{"type": "verifier"}, {"type": "exact_match", "paht": "x"}]}, r"options.members\[1\] has unknown"),
    ({"members": [{"type": "verifier"}, {"type": "ensemble"}]}, r"options.members\[1\] is itself an ensemble"),
    ({"members": [{"type": "verifier"}, {"type": "exact_match"}], "weights": [1, 2]}, "unknown option"),
])
def test_config_errors_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build_source(RewardSpec(type="ensemble", options=options), {})
