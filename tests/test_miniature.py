"""The miniature claims driver end to end on reduced settings (CI): every claim pipeline of
configs/miniature/all.yaml runs with a few steps per stage, and results.md gathers every claim."""

import json

import pytest
import yaml

from conftest import REPO
from jaxrl_rm.config import load_config
from jaxrl_rm.main import main

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
# per stage task: a few steps, small data (enough for every stage to read the one before)
REDUCE = {
    "sft": ["train.eval_every=0", "grpo.eval_size=16"],
    "judge_j1": ["judge.num_train_prompts=48", "judge.num_eval_prompts=24", "judge.warmup_steps=10",
                 "judge.eval_size=24", "judge.near_miss_prompts=0", "train.steps=2", "grpo.eval_size=16"],
    "grpo": ["train.steps=2", "train.eval_every=0", "grpo.eval_size=16", "grpo.prompts_per_step=4"],
    "polar_pretrain": ["train.steps=5", "data.synthetic_size=200", "rm.eval_size=32"],
    "polar_finetune": ["train.steps=5", "data.synthetic_size=200", "rm.eval_size=32"],
    "rm_bt": ["train.steps=5", "data.synthetic_size=200", "rm.eval_size=32"],
}


def reduced_copy(path, out_dir):
    """Copy a pipeline config with REDUCE appended to each stage (recursing into pipelines)."""
    cfg = yaml.safe_load(path.read_text())
    cfg["extends"] = str(REPO / "configs" / "base.yaml")
    if "seeds" in cfg:  # one seed: the seeds path runs (seed0/ folders), at a third of the cost
        cfg["seeds"] = [0]
    for stage in cfg["stages"]:
        stage_path = REPO / stage["config"]
        task = load_config(stage_path).task
        if task == "pipeline":
            stage["config"] = str(reduced_copy(stage_path, out_dir))
        else:
            stage["config"] = str(stage_path)
            overrides = stage.get("overrides", [])
            if load_config(stage_path, overrides).warmup.steps > 0:  # the GRPO runs' own SFT warm-up
                overrides = overrides + ["warmup.steps=5"]
            stage["overrides"] = overrides + REDUCE[task] + QUIET
    out = out_dir / path.name
    out.write_text(yaml.safe_dump(cfg))
    return out


# Verdicts the reduced settings decide by themselves: the same under seed 0 and seed 1 (every stage,
# 2026-12-06) and explained by what a few steps can do, not by a margin.
PINNED = {
    # 10 warm-up steps do not teach a random-init judge the <think>…</think><score> format: every
    # held-out judgment is invalid (accuracy 0 before RL), so every score-match reward is 0, the 2 RL
    # steps have zero advantages, and accuracy stays 0: 0 vs 0 is not "higher".
    "J1 training improves judge accuracy": "no",
    # the same judges (invalid on every rollout) give every rollout the same reward 0: zero
    # advantages, so rl_on, rl_off and rl_strong keep the SFT policy's held-out accuracy and tie
    # (accuracy_after equal, gains 0): a difference of 0 is not "by > 0.03".
    "an on-policy-trained judge gives better downstream accuracy": "no",
    "a stronger judge gives more improvement": "no",
    # ... and the same invalid judge, sampled 1, 4 or 16 times per answer, scores every rollout 0:
    # right and wrong answers tie, gold AUC 0.5 under every budget, and 0.5 vs 0.5 is not "higher"
    "judge compute vs reward quality: more sampled judgments": "no",
    # a 5-step SFT warm-up reverses no string and writes no valid ranking: every URPO-side model
    # ends at reasoning accuracy 0 and Kendall-tau reward 0 (invalid = 0), and 0 vs 0 is "within
    # 0.03" but not "by > 0.03" ...
    "URPO's single model matches or beats policy + separate generative RM: reasoning": "yes",
    "URPO's single model matches or beats policy + separate generative RM: judging": "yes",
    "adding reasoning data improves URPO's judging": "no",
    # ... and with no right answer no group holds a right and a wrong one, so gold AUC is never logged
    "pairwise / pivot / listwise judging": "not run",
}
# Left open (either verdict), as they turn on noise at this scale:
# - RLVR: 2 GRPO steps move greedy accuracy on 16 held-out prompts by whole prompts, either way
#   (seed 0: 0.062 -> 0.062, "no"; seed 1: 0.625 -> 0.250); gaining one prompt (0.0625) reads "yes".
# - POLAR RM accuracy ("yes" under both seeds: 0.781 vs 0.750, 0.500 vs 0.406): 32 held-out triples
#   after 5 pretraining and 5 fine-tuning steps, a 1- or 3-triple difference that nothing here fixes.
# - POLAR downstream RL and reference-based RM: 2 RL steps with an RM reward on 16 held-out prompts
#   (seed 0: "no", "no"; seed 1: "no", "yes").


@pytest.mark.slow
def test_miniature_claims_driver_reduced(tmp_path):
    config = reduced_copy(REPO / "configs" / "miniature" / "all.yaml", tmp_path)
    assert main(["--config", str(config), f"run_dir={tmp_path / 'run'}", *QUIET]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = summary["claims_table"].splitlines()[2:]
    print("\n" + summary["claims_table"])
    assert len(rows) == 14
    pinned = set()
    for row in rows:  # every claim pipeline filled its rows
        claim = next((c for c in PINNED if row.startswith(f"| {c}")), None)
        verdicts = (PINNED[claim],) if claim else ("yes", "no")
        assert any(f"| {v} |" in row for v in verdicts), row
        pinned.add(claim)
    assert pinned - {None} == set(PINNED)  # every pinned claim names a row
    assert "## Claims" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "rllm" / "seed0" / "rl_on" / "summary.json").exists()
    modes = json.loads((tmp_path / "run" / "urpo" / "seed0" / "modes" / "summary.json").read_text())
    assert all(f"run_mean/reward/reasoning/{m}/judge_calls" in modes for m in ("listwise", "pivot", "pairwise"))
