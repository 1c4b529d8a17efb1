"""task: pipeline — stages chained through {run_dir}, skipped when done, compared at the end."""

import json

from jaxrl_rm.main import main

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.max_length=16",
        "data.synthetic_size=128", "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false",
        "grpo.eval_size=8", "grpo.max_new_tokens=4", "train.steps=3"]


def test_pipeline_chains_stages_and_compares(tmp_path):
    stages = [{"name": "a", "overrides": TINY},
              {"name": "b", "overrides": TINY + ["model.path={run_dir}/a/hf", "optim.learning_rate=0.01"]}]
    args = ["task=pipeline", f"run_dir={tmp_path}", f"stages={json.dumps(stages)}", "compare=[a, b]",
            "compare_metrics=[loss, accuracy]"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"] == ["a", "b"] and "a/accuracy_gain" in summary and "b/eval_loss_after" in summary
    b_cfg = (tmp_path / "b" / "config.yaml").read_text()
    assert f"path: {tmp_path}/a/hf" in b_cfg  # {run_dir} resolved: stage b started from a's export
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    results = (tmp_path / "results.md").read_text()
    assert "| a | accuracy |" in results and "| b | accuracy |" in results
    assert (tmp_path / "report" / "report.md").exists()
    # rerun: finished stages are skipped (their summaries are reused, nothing retrains)
    mtime = (tmp_path / "a" / "summary.json").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "a" / "summary.json").stat().st_mtime == mtime
