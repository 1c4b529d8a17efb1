"""The aligned J1 recipe end to end (slow): configs/judge_j1_aligned_tiny.yaml as configured (policy
SFT, data, 400 warm-up steps, 10 J1 RL steps) with smaller held-out sets; its judge must rank gold
answers above near misses, then reward a short RLLM run of the same policy without being hacked.
(Its own file, apart from tests/test_judge_j1.py, so that `pytest -n 2 --dist loadfile` can run
the two long J1 runs on different workers.)"""

import json
from pathlib import Path

import pytest

from jaxrl_rm.config import load_config

REPO = Path(__file__).resolve().parents[1]

ALIGNED = ["judge.num_eval_prompts=128", "judge.eval_size=64"]
ALIGNED_REWARD = {"type": "judge", "options": {
    "mode": "pointwise", "template": "pointwise_correctness_ref", "template_options": {"user": "{prompt}\n{aligned}"},
    "greedy": True, "max_prompt_length": 64, "max_new_tokens": 64}}
RLLM = ["train.steps=10", "train.log_every=1", "train.eval_every=0", "grpo.num_samples=8", "grpo.prompts_per_step=16",
        "grpo.max_sampling_rounds=1", "grpo.eval_size=32"]


@pytest.fixture(scope="module")
def aligned_judge(tmp_path_factory):
    """One run of the aligned recipe, shared by the tests below: (summary, run directory)."""
    from jaxrl_rm.train.judge import run_judge_j1

    run_dir = tmp_path_factory.mktemp("judge_j1_aligned")
    cfg = load_config(REPO / "configs" / "judge_j1_aligned_tiny.yaml",
                      [f"run_dir={run_dir}", "logging.progress=false", "logging.tensorboard=false", *ALIGNED])
    summary = run_judge_j1(cfg)
    assert not summary["preempted"]
    return summary, run_dir


@pytest.mark.slow
def test_aligned_judge_ranks_gold_answers_above_near_misses(aligned_judge):
    """Acceptance of a judge GRPO can use: on held-out words the aligned recipe's judge scores the
    gold answer above its one-edit near misses (AUC >= 0.8; measured 0.98-1.0 on 2026-12-06, the J1
    recipe's judge about 0.5), after the warm-up and after J1 RL (the exported judge). J1 RL runs at
    the config's 1e-4: at 1e-3 it eroded the check on another CPU (2026-12-07, AMD EPYC: 0.974 ->
    0.750) while this bound held on the first; at 1e-4 it measured 0.974 -> 0.969 there."""
    summary, _ = aligned_judge
    print("\naligned judge: near-miss AUC {judge_near_miss_auc_before:.3f} -> {judge_near_miss_auc_after:.3f}, "
          "held-out accuracy {judge_accuracy_before:.3f} -> {judge_accuracy_after:.3f}".format(**summary))
    for when in ("before", "after"):
        assert summary[f"judge_near_miss_auc_{when}"] >= 0.8, summary
        assert summary[f"judge_near_miss_invalid_rate_{when}"] < 0.05, summary


@pytest.mark.slow
def test_rllm_with_the_aligned_judge_is_not_hacked(aligned_judge, tmp_path):
    """A short RLLM run (GRPO of the same SFT policy, the aligned judge's pointwise score as the only
    reward): the judge's reward tracks the gold accuracy of the same rollouts (run-mean
    `gold_gap` within 0.15; the J1 recipe's judge: 0.96 in the quickstart) and orders right over
    wrong rollouts within a group (`gold_auc` >= 0.8)."""
    from jaxrl_rm.train.grpo import run_grpo

    _, judge_run = aligned_judge
    policy = judge_run / "policy_sft" / "hf"
    task = {"name": "reverse", "kind": "verifiable", "data": "synthetic:reverse",
            "options": {"eval_verifier": "exact_match"}, "rewards": [{**ALIGNED_REWARD, "path": str(judge_run / "hf")}]}
    cfg = load_config(REPO / "configs" / "miniature" / "rl_base.yaml",
                      [f"run_dir={tmp_path}", f"model.path={policy}", f"model.tokenizer={policy}", *RLLM,
                       "grpo.tasks=" + json.dumps([task]),  # JSON is YAML
                       "logging.progress=false", "logging.tensorboard=false"])
    summary = run_grpo(cfg)
    gap = summary["run_mean/reward/reverse/judge/gold_gap"]
    auc = summary["run_mean/reward/reverse/judge/gold_auc"]
    print(f"\nRLLM with the aligned judge: gold_gap {gap:+.3f}, gold_auc {auc:.3f}, gold accuracy "
          f"{summary['run_mean/reward/reverse/gold_accuracy']:.3f}")
    assert summary["steps"] == 10
    assert abs(gap) <= 0.15, summary
    assert auc >= 0.8, summary
