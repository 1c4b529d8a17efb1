"""`task: pipeline`: run several configs in order, each in `<run_dir>/<stage name>`.

Recipes that chain stages (SFT a policy -> train a judge on its samples -> GRPO the policy with
that judge; or RLVR vs RLLM side by side) are configs, not code: a stage names a config file and
overrides, and `{run_dir}` in an override points at the pipeline's run directory, so a stage can
load an earlier stage's export (`model.path={run_dir}/sft/hf`). A stage whose `summary.json`
exists is done and is skipped on rerun; an interrupted stage resumes from its checkpoints.
The pipeline's summary.json holds every stage's summary under `<stage>/<metric>`.

Every stage runs at the pipeline's `seed` (unless its overrides set one), so `seed=1` on the
command line reruns the whole chain at another seed. With `seeds: [0, 1, 2]` the chain runs once
per seed, in `<run_dir>/seed<k>/`; the summary holds the mean over seeds of every number and the
per-seed values (`<stage>/<metric>/seeds`: {seed: value}), and the claims table (results.md)
compares the means, shows each side's range over seeds and how many seeds agree with the verdict.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxrl_rm.config import load_config
from jaxrl_rm.train.loop import prepare_run_dir, write_summary


def stage_config(cfg, stage):
    """The Config of one stage: its file + overrides at the pipeline's seed (a `seed=` override of
    the stage wins), `run_dir` forced to `<run_dir>/<name>`."""
    overrides = [o.replace("{run_dir}", str(cfg.run_dir)) for o in stage.overrides]
    return load_config(stage.config or None,
                       [f"seed={cfg.seed}", *overrides, f"run_dir={Path(cfg.run_dir) / stage.name}"])


def run_pipeline(cfg) -> dict:
    from jaxrl_rm.main import pipeline

    if not cfg.stages:
        from jaxrl_rm.configlib import ConfigError

        raise ConfigError("stages: a pipeline needs at least one stage")
    if cfg.seeds:
        return run_seeds(cfg)
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
    results = "# Results\n"
    if cfg.compare and not summary.get("preempted"):
        summary["results_table"] = compare_stages(cfg, summary)
        results += f"\n{summary['results_table']}\n\n![comparison](comparison.png)\n"
    finish(cfg, summary, results)
    return summary


def run_seeds(cfg) -> dict:
    """The pipeline once per seed in `<run_dir>/seed<k>` (each a whole pipeline: its own
    results.md, plot and report), then the means over seeds, with per-seed values beside them."""
    prepare_run_dir(cfg)
    runs: dict[int, dict] = {}
    for seed in cfg.seeds:
        print(f"[jaxrl_rm] pipeline seed {seed} ({len(runs) + 1} of {len(cfg.seeds)})", flush=True)
        runs[seed] = run_pipeline(dataclasses.replace(cfg, seed=seed, seeds=[],
                                                      run_dir=str(Path(cfg.run_dir) / f"seed{seed}")))
        if runs[seed].get("preempted"):
            break
    summary: dict = {"task": "pipeline", "stages": [s.name for s in cfg.stages], "seeds": list(runs)}
    results = "# Results\n"
    if any(r.get("preempted") for r in runs.values()):
        summary["preempted"] = True
    else:
        summary.update(mean_over_seeds(runs))
        if cfg.compare:
            summary["results_table"] = compare_table(cfg.compare, summary)
            results += (f"\nMeans over seeds {', '.join(map(str, runs))}; each seed's run, plot and report are "
                        f"in `seed<k>/`.\n\n{summary['results_table']}\n")
    finish(cfg, summary, results)
    return summary


def mean_over_seeds(runs: dict[int, dict]) -> dict:
    """{key: mean, key/seeds: {seed: value}} for every key that is a number in every seed's summary."""
    out = {}
    first = next(iter(runs.values()))
    for key, value in first.items():
        values = {str(seed): r.get(key) for seed, r in runs.items()}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            out[key] = sum(values.values()) / len(values)
            out[f"{key}/seeds"] = values
    return out


def finish(cfg, summary: dict, results: str) -> None:
    """Check the pipeline's claims (its own and its pipeline stages') against `summary`, write
    results.md (`results` + the claims table; rewritten on rerun, never appended) when there is
    anything to show, and summary.json."""
    claims = stage_claims(cfg) + list(cfg.claims)
    if claims and not summary.get("preempted"):
        summary["claims_table"] = claims_table(claims, summary, seed=cfg.seed)
        results += f"\n## Claims\n\n{summary['claims_table']}\n"
        print(summary["claims_table"], flush=True)
    if results != "# Results\n":
        (Path(cfg.run_dir) / "results.md").write_text(results)
    write_summary(cfg, summary)


def stage_claims(cfg) -> list:
    """Claims of the stages that are pipelines themselves, their keys prefixed with the stage
    name (a driver of claim pipelines reports every claim without restating it)."""
    out = []
    for stage in cfg.stages:
        sub = stage_config(cfg, stage)
        if sub.task != "pipeline":
            continue
        for c in list(sub.claims) + stage_claims(sub):
            out.append(dataclasses.replace(c, ours=[f"{stage.name}/{k}" for k in c.ours],
                                           baseline=[f"{stage.name}/{k}" for k in c.baseline]))
    return out


def per_seed(summary: dict, ours: list[str], baseline: list[str]) -> list[tuple]:
    """[(seed, mean of `ours`, mean of `baseline`)] over the seeds that every key with per-seed
    values (`<key>/seeds`) has; a key without them counts the same in every seed, and when no key
    has them the one row's seed is None. [] when a key is missing (its stage did not run)."""
    sides = []
    for keys in (ours, baseline):
        side = []
        for k in keys:
            seeded = summary.get(f"{k}/seeds")
            if isinstance(seeded, dict):
                side.append(seeded)
            elif summary.get(k) is not None:
                side.append({None: summary[k]})
            else:
                return []
        sides.append(side)
    seeded = [set(t) for side in sides for t in side if None not in t]
    seeds = sorted(set.intersection(*seeded), key=int) if seeded else [None]
    return [(s, *(sum(float(t.get(s, t.get(None))) for t in side) / len(side) for side in sides)) for s in seeds]


def claims_table(claims, summary: dict, seed: int = 0) -> str:
    """Markdown table: claim, metric, ours, baseline, paper's direction, reproduced (yes / no /
    not run), what it averaged over. `ours` / `baseline` average the summary keys they list; over
    several seeds each cell is the mean (min–max) and the verdict, on the means, says in how many
    seeds it holds. `seed`: the pipeline's, named when the values come from one run."""

    def beats(ours, base, c):
        return ours - base > c.margin if c.direction == "higher" else base - ours > c.margin

    def cell(values):
        mean = sum(values) / len(values)
        return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"

    lines = ["| claim | metric | ours | baseline | paper's direction | reproduced | averaged over |",
             "|---|---|---|---|---|---|---|"]
    for c in claims:
        pairs = per_seed(summary, c.ours, c.baseline)
        if not pairs:
            verdict, o, b, over = "not run", "-", "-", "-"
        else:
            seeds, o_vals, b_vals = zip(*pairs)
            verdict = "yes" if beats(sum(o_vals) / len(seeds), sum(b_vals) / len(seeds), c) else "no"
            o, b = cell(o_vals), cell(b_vals)
            if len(seeds) == 1:
                over = f"seed {seed if seeds[0] is None else seeds[0]}"
            else:
                held = sum(beats(x, y, c) for x, y in zip(o_vals, b_vals))
                verdict += f" ({held}/{len(seeds)} seeds)"
                over = "seeds " + ", ".join(seeds)
        direction = c.direction + (f" (by > {c.margin:g})" if c.margin > 0 else
                                   f" or within {-c.margin:g}" if c.margin < 0 else "")
        lines.append(f"| {c.claim} ({c.paper}) | {c.metric} | {o} | {b} | {direction} | {verdict} | {over} |")
    return "\n".join(lines)


def compare_table(names: list[str], summary: dict) -> str:
    """Markdown: before / after / gain of every accuracy-like metric (`<m>_gain` in the summary) of
    each named stage; with per-seed values, each seed's gain beside the mean."""
    metrics = sorted({k[len(n) + 1:-len("_gain")] for n in names for k in summary
                      if k.startswith(f"{n}/") and k.endswith("_gain")})
    seeds = summary.get("seeds")
    lines = ["| stage | metric | before | after | gain |" + (" gain per seed |" if seeds else ""),
             "|---|---|---|---|---|" + ("---|" if seeds else "")]
    for name in names:
        for m in metrics:
            before, after = summary.get(f"{name}/{m}_before"), summary.get(f"{name}/{m}_after")
            if before is None or after is None:
                continue
            row = f"| {name} | {m} | {before:.3f} | {after:.3f} | {after - before:+.3f} |"
            if seeds:
                gains = summary.get(f"{name}/{m}_gain/seeds", {})
                row += " " + " / ".join(f"{gains[str(s)]:+.3f}" for s in seeds if str(s) in gains) + " |"
            lines.append(row)
    return "\n".join(lines)


def compare_stages(cfg, summary: dict) -> str:
    """comparison.png and a full report in `<run_dir>/report/` of the compared stages; returns
    (and prints) the table of before / after / gain per stage that results.md shows."""
    from jaxrl_rm.report import build_report, plot_panels, read_run

    unknown = [n for n in cfg.compare if n not in {s.name for s in cfg.stages}]
    if unknown:
        from jaxrl_rm.configlib import ConfigError

        raise ConfigError(f"compare: unknown stage(s) {unknown}; stages: {[s.name for s in cfg.stages]}")
    run_dir = Path(cfg.run_dir)
    dirs = [str(run_dir / name) for name in cfg.compare]
    table = compare_table(list(cfg.compare), summary)
    plot_panels([read_run(d, n) for d, n in zip(dirs, cfg.compare)], list(cfg.compare_metrics),
                run_dir / "comparison.png", title=" vs ".join(cfg.compare))
    build_report(dirs, run_dir / "report", names=list(cfg.compare))
    print(table, flush=True)
    return table
