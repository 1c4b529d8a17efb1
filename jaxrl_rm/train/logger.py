"""Run-directory writers: metrics.jsonl, TensorBoard events, summary.json, progress bar, and an
optional Weights & Biases mirror.

Only process 0 writes; other processes get a logger that does nothing, so multi-host runs
produce one set of files. Run directories may be local paths or URLs such as `gs://bucket/run`
(written through etils.epath; object stores cannot append, so there metrics.jsonl is rewritten
whole at each log — fine for a few thousand rows).

W&B is used only when `logging.wandb_project` is set *and* the `wandb` package is installed;
otherwise it is never imported and nothing touches the network.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np


def run_path(path):
    """A local `Path`, or an `etils.epath.Path` for URLs (`gs://...`) — `pathlib` would turn
    `gs://b/r` into `gs:/b/r`."""
    if "://" in str(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


def is_remote(path) -> bool:
    return "://" in str(path)


def _scalar(v):
    if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
        v = v.item()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information
    return v


def _number(v):
    """The float a metric row holds (including the "nan"/"inf" strings), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


class _WandB:
    """Mirror of metrics.jsonl / summary.json into a W&B run; resumes the same W&B run id."""

    def __init__(self, wandb, run_dir, project: str, entity: str, config: dict | None):
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                              name=Path(str(run_dir)).name, config=config or {},
                              dir=str(run_dir) if not is_remote(run_dir) else None)

    def log(self, step: int, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def summary(self, summary: dict) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """`log(step, metrics)` appends to metrics.jsonl, TensorBoard (and W&B when configured);
    `summary(d)` writes summary.json.

    `wandb_project`: W&B project name; empty = off. `config`: dict recorded as the W&B run config.
    """

    def __init__(self, run_dir, *, tensorboard: bool = True, wandb_project: str = "", wandb_entity: str = "",
                 config: dict | None = None):
        self.run_dir = run_path(run_dir)
        self.remote = is_remote(run_dir)
        self.active = jax.process_index() == 0
        self._tb = None
        self._wandb = None
        self._jsonl = None
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "metrics.jsonl"
            if self.remote:
                self._rows = path.read_text().splitlines() if path.exists() else []
            else:
                self._jsonl = open(path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            if wandb_project:
                try:
                    import wandb
                except ImportError:
                    print("[jaxrl_rm] logging.wandb_project is set but wandb is not installed "
                          "(pip install wandb); logging to the run directory only.", file=sys.stderr)
                else:
                    self._wandb = _WandB(wandb, self.run_dir, wandb_project, wandb_entity, config)

    @classmethod
    def for_config(cls, cfg, *, tensorboard: bool | None = None) -> "RunLogger":
        """The logger a pipeline's `cfg` asks for (run_dir, logging.*)."""
        from jaxrl_rm.configlib import to_dict

        log = cfg.logging
        return cls(cfg.run_dir, tensorboard=log.tensorboard if tensorboard is None else tensorboard,
                   wandb_project=getattr(log, "wandb_project", ""), wandb_entity=getattr(log, "wandb_entity", ""),
                   config=to_dict(cfg))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        line = json.dumps(row)
        if self.remote:
            self._rows.append(line)
            (self.run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in self._rows))
        else:
            self._jsonl.write(line + "\n")
            self._jsonl.flush()
        numeric = {k: x for k, v in row.items() if k != "step" and (x := _number(v)) is not None}
        if self._tb is not None:
            for k, x in numeric.items():  # the same numbers as metrics.jsonl (nan/inf included)
                self._tb.add_scalar(k, x, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, numeric)

    def summary(self, summary: dict) -> None:
        if self.active:
            clean = {k: _scalar(v) for k, v in summary.items()}
            (self.run_dir / "summary.json").write_text(json.dumps(clean, indent=2, sort_keys=True))
            if self._wandb is not None:
                self._wandb.summary(clean)

    def close(self) -> None:
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


def read_metrics(path) -> list[tuple[str, dict]]:
    """The rows of a `metrics.jsonl` as (line, parsed row), blank lines skipped.

    The file may be in the middle of a write (a reader beside a live run) or end in a row torn
    by `kill -9`: an unparsable *last* line without its newline is left out. Any other unparsable
    line is corruption and raises ValueError naming file and line."""
    text = path.read_text()
    lines = text.split("\n")  # a complete file ends with "\n": its last piece is ""
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines):  # still being written, or torn: not a row yet
                break
            raise ValueError(f"{path}:{i}: unreadable metrics row ({e.msg})") from e
    return rows


def truncate_metrics_after(run_dir: str | Path, step: int) -> None:
    """On resume from `step`, drop metric rows logged after it (they will be logged again),
    and a last row torn by the kill that stopped the run."""
    path = run_path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    kept = [line for line, row in read_metrics(path) if row.get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept))


def run_means(run_dir: str | Path, prefix: str, *, max_of: tuple[str, ...] = ("gold_gap",)) -> dict[str, float]:
    """Mean over the logged training rows (step > 0) of every numeric metric whose name starts
    with `prefix`, as `run_mean/<name>`: a run's average monitor values (e.g. a judge's
    `gold_agreement` and `judge_calls`) for summary.json. Metrics whose name ends with one of
    `max_of` also get `run_max/<name>`, their worst logged step: a learned reward's gold gap
    (`.../judge/gold_gap`) can average low while single steps are hacked. Empty when nothing was
    logged."""
    path = run_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    sums: dict[str, list[float]] = {}
    for _, row in read_metrics(path):
        if row.get("step", 0) <= 0:
            continue
        for k, v in row.items():
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
    out = {f"run_mean/{k}": float(np.mean(v)) for k, v in sums.items()}
    out.update({f"run_max/{k}": float(np.max(v)) for k, v in sums.items() if k.endswith(max_of)})
    return out


class Progress:
    """tqdm bar with loss and tokens/s; ETA from tqdm. Disabled off process 0 or when asked."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not enabled or jax.process_index() != 0)
        self._t0, self._tokens = time.perf_counter(), 0

    def update(self, tokens: int, **postfix) -> float:
        """Advance one step; returns tokens/s since the bar started."""
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in postfix.items()}, "tok/s": f"{rate:.0f}"})
        self.bar.update(1)
        return rate

    def close(self) -> None:
        self.bar.close()
