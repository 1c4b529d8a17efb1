"""Compare runs: `python -m jaxrl_rm.report RUN_DIR [RUN_DIR ...] [--out DIR]`.

Reads each run directory's `metrics.jsonl`, `summary.json` and `config.yaml` (any may be missing,
not all) and writes to `--out` (default `report/`):

    report.md         runs, final / best metric values, summary.json side by side, config differences,
                      and the plots
    <metric>.png      one plot per metric: value against step, one line per run

Run directories may be local paths or `gs://` URLs (read through etils.epath). Plots use
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import re
import sys
from pathlib import Path

import yaml

# Metrics where smaller is better (for the "best" column); anything else is reported as max.
_LOWER_IS_BETTER = ("loss", "nll", "perplexity", "kl", "error", "grad_norm", "skipped")


@dataclasses.dataclass
class Run:
    name: str
    path: str
    series: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] sorted by step
    summary: dict
    config: dict

    def last(self, metric: str) -> float | None:
        points = self.series.get(metric)
        return points[-1][1] if points else None


def _path(p: str):
    if "://" in str(p):
        from etils import epath

        return epath.Path(p)
    return Path(p)


def _number(v) -> float | None:
    """JSON value -> float, including the "nan"/"inf" strings the logger writes; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(v)
    return None


def read_run(path: str, name: str | None = None) -> Run:
    """Load one run directory. Raises FileNotFoundError when it holds none of the run files."""
    root = _path(path)
    metrics_file, summary_file, config_file = root / "metrics.jsonl", root / "summary.json", root / "config.yaml"
    if not any(f.exists() for f in (metrics_file, summary_file)):
        raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl or summary.json)")
    series: dict[str, dict[int, float]] = {}
    if metrics_file.exists():
        for lineno, line in enumerate(metrics_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                # A run killed mid-write can leave a torn last line; anything else is corruption.
                print(f"[report] {metrics_file}:{lineno}: skipping unreadable row ({e.msg})", file=sys.stderr)
                continue
            step = row.get("step")
            if not isinstance(step, int):
                continue
            for k, v in row.items():
                x = _number(v)
                if k != "step" and x is not None:
                    series.setdefault(k, {})[step] = x  # a repeated step keeps its last value
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    return Run(name=name or root.name or str(path), path=str(path),
               series={k: sorted(v.items()) for k, v in series.items()}, summary=summary, config=config)


def _unique_names(paths: list[str]) -> list[str]:
    """Basenames, extended with parent folders until they are unique."""
    parts = [[p for p in str(path).rstrip("/").split("/") if p] or [str(path)] for path in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth > max(len(p) for p in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    x = _number(v)
    if x is not None:
        return str(x)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return lines


def _best(points: list[tuple[int, float]], metric: str) -> float | None:
    values = [v for _, v in points if math.isfinite(v)]
    if not values:
        return None
    lower = any(tag in metric.lower() for tag in _LOWER_IS_BETTER)
    return min(values) if lower else max(values)


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") or "metric"


def plot_metric(runs: list[Run], metric: str, out_file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for run in runs:
        points = run.series.get(metric)
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=run.name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)


def plot_panels(runs: list[Run], metrics: list[str], out_file: Path, *, title: str = "") -> Path:
    """One figure, one panel per metric (value vs step, a line per run) -> `out_file` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.6), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            points = run.series.get(metric)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=run.name)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file


def build_report(run_dirs: list[str], out: str | Path, *, metrics: list[str] | None = None,
                 names: list[str] | None = None) -> Path:
    """Read `run_dirs`, write `<out>/report.md` and one PNG per metric; returns the report path.

    `metrics`: glob patterns selecting what is tabled and plotted (default: every metric).
    """
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"--names gives {len(names)} names for {len(run_dirs)} runs")
    names = names or _unique_names(run_dirs)
    runs = [read_run(p, n) for p, n in zip(run_dirs, names)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    all_metrics = sorted({m for r in runs for m in r.series})
    if metrics:
        all_metrics = [m for m in all_metrics if any(fnmatch.fnmatchcase(m, pat) for pat in metrics)]

    lines = ["# Run comparison", ""]
    lines += _table(["run", "path", "task", "last step", "logged rows"],
                    [[r.name, f"`{r.path}`", str(r.config.get("task", r.summary.get("task", "—"))),
                      max((pts[-1][0] for pts in r.series.values()), default=None),
                      max((len(pts) for pts in r.series.values()), default=0)] for r in runs])

    if all_metrics:
        lines += ["", "## Final metrics (last logged value; best over the run in brackets)", ""]
        header = ["metric"] + [r.name for r in runs]
        rows = []
        for m in all_metrics:
            row = [m]
            for r in runs:
                pts = r.series.get(m)
                row.append(f"{_fmt(pts[-1][1])} ({_fmt(_best(pts, m))})" if pts else "—")
            rows.append(row)
        lines += _table(header, rows)

    summary_keys = sorted({k for r in runs for k in r.summary})
    if summary_keys:
        lines += ["", "## summary.json", ""]
        lines += _table(["key"] + [r.name for r in runs],
                        [[k] + [r.summary.get(k) for r in runs] for k in summary_keys])

    flat = [_flatten(r.config) for r in runs]
    if len(runs) > 1 and any(flat):
        keys = sorted({k for f in flat for k in f})
        differing = [k for k in keys if k != "run_dir"  # always differs; in the runs table already
                     and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
        lines += ["", "## Config differences", ""]
        if differing:
            lines += _table(["key"] + [r.name for r in runs], [[k] + [f.get(k) for f in flat] for k in differing])
        else:
            lines.append("The resolved configs are identical.")

    if all_metrics:
        lines += ["", "## Plots", ""]
        used: set[str] = set()
        for m in all_metrics:
            slug = _slug(m)
            while slug in used:
                slug += "_"
            used.add(slug)
            png = out / f"{slug}.png"
            plot_metric(runs, m, png)
            lines += [f"![{m}]({png.name})", ""]

    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_rm.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    parser.add_argument("--metrics", default="",
                        help="comma-separated glob patterns of metrics to include, e.g. 'loss,eval_*'")
    parser.add_argument("--names", default="", help="comma-separated run labels (default: folder names)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.run_dirs, args.out,
                              metrics=[m for m in args.metrics.split(",") if m] or None,
                              names=[n for n in args.names.split(",") if n] or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
