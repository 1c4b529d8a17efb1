"""The miniature world's generators: deterministic per seed, different across seeds, and with
held-out splits disjoint from training."""

import dataclasses

import pytest

from jaxrl_rm.config import TaskSpec
from jaxrl_rm.data import synthetic


def _rows(records):
    return [dataclasses.asdict(r) for r in records]


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_verifiable_tasks_deterministic_and_split(task):
    make = synthetic.TASKS[task]
    assert _rows(make(64, seed=3)) == _rows(make(64, seed=3))
    assert _rows(make(64, seed=3)) != _rows(make(64, seed=4))
    train = {p.prompt for p in make(500, seed=0)}
    held = {p.prompt for p in make(200, seed=0, split="eval")}
    assert not train & held


@pytest.mark.parametrize("task", sorted(synthetic.RM_TASKS))
def test_reward_model_tasks_deterministic(task):
    a = synthetic.rm_records(task, 32, seed=1)
    assert _rows(a) == _rows(synthetic.rm_records(task, 32, seed=1))
    assert _rows(a) != _rows(synthetic.rm_records(task, 32, seed=2))
    held = synthetic.rm_records(task, 32, seed=1, split="eval")
    assert _rows(a) != _rows(held)
    if task.startswith("reverse_"):  # reversal strings are split; style prompts come from a small space
        assert {r.prompt for r in a}.isdisjoint({r.prompt for r in held})


@pytest.mark.parametrize("task", ["reverse", "arithmetic", "reverse_ranking", "style_open", "open_ended",
                                  "open_ranking"])
def test_rl_prompt_items_deterministic(task):
    spec = TaskSpec(name="t", data=f"synthetic:{task}")
    a = synthetic.prompt_items(task, spec, split="train", seed=0, size=16)
    assert a == synthetic.prompt_items(task, spec, split="train", seed=0, size=16)
    assert a != synthetic.prompt_items(task, spec, split="train", seed=1, size=16)


def test_style_policy_pool_is_fixed():
    assert synthetic.style_policy_pool() == synthetic.style_policy_pool()
    assert len({p.name for p in synthetic.style_policy_pool()}) == synthetic.STYLE_POOL_SIZE


def test_reverse_rankings_sizes():
    fixed = synthetic.reverse_rankings(20, seed=3)
    assert {len(r.responses) for r in fixed} == {4}
    mixed = synthetic.reverse_rankings(60, seed=3, num_responses=[2, 3, 4])
    assert {len(r.responses) for r in mixed} == {2, 3, 4}
    for r in mixed:  # the gold answer (0 edits) is always there and ranked first
        assert max(r.gold_scores) == 0.0 and len(r.gold_scores) == len(r.responses)
    with pytest.raises(ValueError, match="num_responses"):
        synthetic.reverse_rankings(2, seed=0, num_responses=[1, 2])
    spec = TaskSpec(name="pref", kind="ranking", data="synthetic:reverse_ranking", options={"num_responses": [1]})
    with pytest.raises(ValueError, match=r"grpo.tasks\[pref\].options.num_responses"):
        synthetic.prompt_items("reverse_ranking", spec, split="train", seed=0, size=2)
