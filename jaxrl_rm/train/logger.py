"""Run-directory writers: metrics.jsonl, TensorBoard events, summary.json, progress bar.

Only process 0 writes; other processes get a logger that does nothing, so multi-host runs
produce one set of files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np


def _scalar(v):
    if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
        v = v.item()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information
    return v


class RunLogger:
    """`log(step, metrics)` appends to metrics.jsonl and TensorBoard; `summary(d)` writes summary.json."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def summary(self, summary: dict) -> None:
        if self.active:
            clean = {k: _scalar(v) for k, v in summary.items()}
            (self.run_dir / "summary.json").write_text(json.dumps(clean, indent=2, sort_keys=True))

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def truncate_metrics_after(run_dir: str | Path, step: int) -> None:
    """On resume from `step`, drop metric rows logged after it (they will be logged again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists() or jax.process_index() != 0:
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept))


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
