"""GRPO's rollouts through `rollout.collect.RolloutCollector`: the slot engine (`grpo.rollout_engine:
slots`) returns the static sampler's samples for the same seed, through the trainer's own `sample`
(prompts from its tasks, its stop token and padding), and the step logs rollout throughput."""

import numpy as np
import pytest

from jaxrl_rm.config import load_config
from jaxrl_rm.train.grpo import GRPO

BASE = ["task=grpo", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "grpo.prompts_per_step=3", "grpo.num_samples=4", "grpo.max_new_tokens=12", "grpo.max_prompt_length=24",
        "grpo.eval_size=4", "data.synthetic_size=16", "logging.progress=false", "logging.tensorboard=false",
        "grpo.tasks=[{name: reverse, kind: verifiable, data: 'synthetic:reverse', rewards: [{type: exact_match}]}]"]


def test_slot_engine_samples_equal_the_static_sampler(tmp_path):
    static = GRPO(load_config(None, [*BASE, f"run_dir={tmp_path / 's'}"]))
    slots = GRPO(load_config(None, [*BASE, f"run_dir={tmp_path / 'e'}", "grpo.rollout_engine=slots",
                                    "grpo.rollout_slots=4", "grpo.rollout_steps_per_sync=3"]))
    items = static.mixer.draw(0, 3)
    params = static.state["params"]  # same seed, same weights in both
    for greedy in (False, True):
        a, ra, pa = static.sample(params, items, seed=11, num_samples=4, greedy=greedy)
        b, rb, pb = slots.sample(params, items, seed=11, num_samples=4, greedy=greedy)
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(ra.tokens) * np.asarray(ra.mask), np.asarray(rb.tokens) * np.asarray(rb.mask))
        np.testing.assert_array_equal(ra.lengths, rb.lengths)
        np.testing.assert_allclose(np.where(ra.mask, ra.unfiltered_logprobs, 0),
                                   np.where(rb.mask, rb.unfiltered_logprobs, 0), atol=2e-5)
        assert a.completions == b.completions
    assert slots.rollout.stats.engine == "slots" and 0 < slots.rollout.stats.occupancy <= 1


def test_a_step_logs_rollout_throughput(tmp_path):
    rl = GRPO(load_config(None, [*BASE, f"run_dir={tmp_path}", "grpo.rollout_engine=slots"]))
    _, _, metrics = rl.collect(rl.state["params"], step=0)
    assert metrics["rollout/tokens_per_s"] > 0 and 0 < metrics["rollout/occupancy"] <= 1
