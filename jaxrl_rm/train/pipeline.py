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
    if cfg.compare and not summary.get("preempted"):
        summary["results_table"] = compare_stages(cfg, summary)
    claims = stage_claims(cfg) + list(cfg.claims)
    if claims and not summary.get("preempted"):
        summary["claims_table"] = claims_table(claims, summary)
        # results.md was just rewritten by compare_stages, or holds only this table: rerunning a
        # finished pipeline rewrites it, never appends a second copy
        results = Path(cfg.run_dir) / "results.md"
        head = results.read_text() if cfg.compare else "# Results\n"
        results.write_text(head + f"\n## Claims\n\n{summary['claims_table']}\n")
        print(summary["claims_table"], flush=True)
    write_summary(cfg, summary)
    return summary


def stage_claims(cfg) -> list:
    """Claims of the stages that are pipelines themselves, their keys prefixed with the stage
    name (a driver of claim pipelines reports every claim without restating it)."""
    import dataclasses

    out = []
    for stage in cfg.stages:
        sub = stage_config(cfg, stage)
        if sub.task != "pipeline":
            continue
        for c in list(sub.claims) + stage_claims(sub):
            out.append(dataclasses.replace(c, ours=[f"{stage.name}/{k}" for k in c.ours],
                                           baseline=[f"{stage.name}/{k}" for k in c.baseline]))
    return out


def claims_table(claims, summary: dict) -> str:
    """Markdown table: claim, metric, ours, baseline, paper's direction, reproduced (yes / no /
    not run), seeds. `ours` / `baseline` average the summary keys they list."""

    def mean(keys):
        vals = [summary.get(k) for k in keys]
        return None if any(v is None for v in vals) else sum(float(v) for v in vals) / len(vals)

    lines = ["| claim | metric | ours | baseline | paper's direction | reproduced | averaged over |",
             "|---|---|---|---|---|---|---|"]
    for c in claims:
        ours, base = mean(c.ours), mean(c.baseline)
        if ours is None or base is None:
            verdict, o, b = "not run", "-", "-"
        else:
            better = ours - base > c.margin if c.direction == "higher" else base - ours > c.margin
            verdict, o, b = ("yes" if better else "no"), f"{ours:.3f}", f"{base:.3f}"
        direction = c.direction + (f" (by > {c.margin:g})" if c.margin > 0 else
                                   f" or within {-c.margin:g}" if c.margin < 0 else "")
        lines.append(f"| {c.claim} ({c.paper}) | {c.metric} | {o} | {b} | {direction} | {verdict} | {c.seeds} |")
    return "\n".join(lines)


def compare_stages(cfg, summary: dict) -> str:
    """results.md (before/after/gain of each accuracy metric per compared stage), comparison.png
    and a full report in `<run_dir>/report/`. Returns the markdown table (also printed)."""
    from jaxrl_rm.report import build_report, plot_panels, read_run

    unknown = [n for n in cfg.compare if n not in {s.name for s in cfg.stages}]
    if unknown:
        from jaxrl_rm.configlib import ConfigError

        raise ConfigError(f"compare: unknown stage(s) {unknown}; stages: {[s.name for s in cfg.stages]}")
    run_dir = Path(cfg.run_dir)
    dirs = [str(run_dir / name) for name in cfg.compare]
    metrics = sorted({k[len(n) + 1:-len("_gain")] for n in cfg.compare for k in summary
                      if k.startswith(f"{n}/") and k.endswith("_gain")})
    lines = ["| stage | metric | before | after | gain |", "|---|---|---|---|---|"]
    for name in cfg.compare:
        for m in metrics:
            before, after = summary.get(f"{name}/{m}_before"), summary.get(f"{name}/{m}_after")
            if before is None or after is None:
                continue
            lines.append(f"| {name} | {m} | {before:.3f} | {after:.3f} | {after - before:+.3f} |")
    table = "\n".join(lines)
    plot_panels([read_run(d, n) for d, n in zip(dirs, cfg.compare)], list(cfg.compare_metrics),
                run_dir / "comparison.png", title=" vs ".join(cfg.compare))
    build_report(dirs, run_dir / "report", names=list(cfg.compare))
    (run_dir / "results.md").write_text(f"# Results\n\n{table}\n\n![comparison](comparison.png)\n")
    print(table, flush=True)
    return table
