"""`task: pipeline`: run several configs in order, each in `<run_dir>/<stage name>`.

Recipes that chain stages (SFT a policy -> train a judge on its samples -> GRPO the policy with
that judge; or RLVR vs RLLM side by side) are configs, not code: a stage names a config file and
overrides, and `{run_dir}` in an override points at the pipeline's run directory, so a stage can
load an earlier stage's export (`model.path={run_dir}/sft/hf`). A stage whose `summary.json`
exists is done and is skipped on rerun; an interrupted stage resumes from its checkpoints.
The pipeline's summary.json holds every stage's summary under `<stage>/<metric>`.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxrl_rm.config import load_config
from jaxrl_rm.train.loop import prepare_run_dir, write_summary


def stage_config(cfg, stage):
    """The Config of one stage: its file + overrides, `run_dir` forced to `<run_dir>/<name>`."""
    overrides = [o.replace("{run_dir}", str(cfg.run_dir)) for o in stage.overrides]
    return load_config(stage.config or None, overrides + [f"run_dir={Path(cfg.run_dir) / stage.name}"])


def run_pipeline(cfg) -> dict:
    from jaxrl_rm.main import pipeline

    if not cfg.stages:
        from jaxrl_rm.configlib import ConfigError

        raise ConfigError("stages: a pipeline needs at least one stage")
    prepare_run_dir(cfg)
    summary: dict = {"task": "pipeline", "stages": [s.name for s in cfg.stages]}
    for stage in cfg.stages:
        stage_cfg = stage_config(cfg, stage)
        done = Path(stage_cfg.run_dir) / "summary.json"
        if done.exists() and not json.loads(done.read_text()).get("preempted"):
            result = json.loads(done.read_text())
        else:
            print(f"[jaxrl_rm] pipeline stage {stage.name!r}: {stage.config or '<defaults>'}", flush=True)
            result = pipeline(stage_cfg.task)(stage_cfg)
        summary.update({f"{stage.name}/{k}": v for k, v in result.items()})
        if result.get("preempted"):
            summary["preempted"] = True
            break
    write_summary(cfg, summary)
    return summary
