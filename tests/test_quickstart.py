"""The quickstart pipeline end to end (CI: the full run README command 1 just made; elsewhere on
reduced settings): every stage runs, the run directory holds the comparison, summary.json has an
accuracy gain per reward source."""

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from jaxrl_rm.main import main

REDUCE = {
    # the full SFT (~15 s): the judge stage needs a policy that answers some prompts right
    "sft": ["train.eval_every=0", "grpo.eval_size=16", "logging.progress=false"],
    "judge": ["judge.num_train_prompts=48", "judge.num_eval_prompts=24", "judge.warmup_steps=10",
              "judge.eval_size=24", "judge.near_miss_prompts=0", "train.steps=2", "grpo.eval_size=16",
              "logging.progress=false"],
    "rlvr": ["train.steps=2", "train.eval_every=0", "grpo.eval_size=16", "logging.progress=false"],
    "rllm": ["train.steps=2", "train.eval_every=0", "grpo.eval_size=16", "logging.progress=false"],
}


@pytest.mark.slow
def test_quickstart_reduced_end_to_end(tmp_path):
    """CI has just run the whole quickstart (README command 1) and names its run directory in
    JAXRL_RM_QUICKSTART_RUN: the checks then read that run instead of making a reduced one."""
    done = os.environ.get("JAXRL_RM_QUICKSTART_RUN")
    if done:
        run = Path(done)
        assert (run / "summary.json").exists(), f"JAXRL_RM_QUICKSTART_RUN={done}: no summary.json there"
    else:
        cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        cfg["extends"] = str(REPO / "configs" / "base.yaml")
        for stage in cfg["stages"]:
            stage["config"] = str(REPO / stage["config"])
            stage["overrides"] = stage.get("overrides", []) + REDUCE[stage["name"]]
        path = tmp_path / "quickstart.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["--config", str(path), f"run_dir={tmp_path / 'run'}"]) == 0
        run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for source in ("rlvr", "rllm"):
        assert f"{source}/accuracy_gain" in summary
    assert "judge/judge_accuracy_gain" in summary
    assert (run / "comparison.png").stat().st_size > 1000
    assert "| rlvr | accuracy |" in (run / "results.md").read_text()
