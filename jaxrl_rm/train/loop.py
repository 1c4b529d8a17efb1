"""The training loop every pipeline shares: resume, steps, logging, evaluation, checkpoints,
preemption.

A pipeline gives the loop three callables:

    run_step(state, step) -> (state, metrics: dict, tokens: int)   one optimizer step
    evaluate(state) -> dict                                         held-out metrics
    host_state() -> dict                                            JSON-able extra state to checkpoint

The data-iterator state is the step number (batch streams are pure functions of the step), so a
resumed run replays exactly the uninterrupted run's batches. On SIGTERM/SIGINT the loop finishes
the current step, writes a checkpoint, waits for it and returns `preempted=True`.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import yaml

from jaxrl_rm.configlib import to_dict
from jaxrl_rm.train.checkpoint import Checkpointer
from jaxrl_rm.train.logger import Progress, RunLogger, run_path, truncate_metrics_after


def prepare_run_dir(cfg) -> Path:
    """Create `run_dir` and write the resolved config (process 0)."""
    run_dir = run_path(cfg.run_dir)  # local Path, or epath for gs:// URLs
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite updates; the message says which steps and checkpoint."""


class SkipTracker:
    """Counts skipped (non-finite) updates; `bad(step)` is True once `limit` come in a row."""

    def __init__(self, limit: int):
        self.limit, self.run, self.total = limit, 0, 0
        self.first_bad: int | None = None
        self.first_ids = None

    def bad(self, step: int) -> bool:
        self.run, self.total = self.run + 1, self.total + 1
        if self.first_bad is None:
            self.first_bad = step
        return self.run >= self.limit

    def good(self) -> None:
        self.run, self.first_bad, self.first_ids = 0, None, None


@dataclasses.dataclass
class LoopResult:
    state: object
    step: int
    eval_before: dict
    eval_after: dict
    preempted: bool
    extra: dict


def summarize(eval_before: dict, eval_after: dict, **extra) -> dict:
    """summary.json content: `<m>_before`, `<m>_after` (also plain `<m>`), and `<m>_gain` for
    accuracy and quality metrics (after - before)."""
    summary = dict(extra)
    for k, v in eval_after.items():
        summary[k] = v
        summary[f"{k}_after"] = v
    for k, v in eval_before.items():
        summary[f"{k}_before"] = v
        if ("accuracy" in k or k.startswith("quality/")) and k in eval_after:
            summary[f"{k}_gain"] = float(eval_after[k]) - float(v)
    return summary


def train_loop(*, cfg, state, abstract_state, run_step, evaluate=None,
               host_state: Callable[[], dict] | None = None,
               restore_host_state: Callable[[dict], None] | None = None, desc: str = "train") -> LoopResult:
    """Run `cfg.train.steps` steps with resume / logging / checkpoints. See module docstring."""
    run_dir = run_path(cfg.run_dir)
    logger = RunLogger.for_config(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start, eval_before, extra = 0, {}, {}
    if cfg.resume == "auto" and ckpt.latest_step() is not None:
        state, extra, start = ckpt.restore(abstract_state)
        eval_before = extra.get("eval_before", {})
        if restore_host_state is not None:
            restore_host_state(extra.get("host", {}))
        truncate_metrics_after(run_dir, start)
        print(f"[jaxrl_rm] resumed from {ckpt.directory} at step {start}", flush=True)
    elif evaluate is not None:
        eval_before = evaluate(state)
        logger.log(0, eval_before)

    def save(step, force=False):
        if skips.first_bad is not None and not force:
            return  # never checkpoint inside a run of skipped updates
        payload = {"eval_before": eval_before, "host": host_state() if host_state else {},
                   "skipped_updates": skips.total}
        ckpt.save(step, state, payload)

    total = cfg.train.steps
    progress = Progress(total, start, enabled=cfg.logging.progress, desc=desc)
    preempted, done = False, start
    t_last, tokens_since = time.perf_counter(), 0
    skips = SkipTracker(cfg.train.max_consecutive_skips)
    with PreemptionGuard() as guard:
        for step in range(start, total):
            state, metrics, tokens = run_step(state, step)
            done = step + 1
            tokens_since += tokens
            batch_ids = metrics.pop("batch_ids", None)
            if int(jax.device_get(metrics.get("skipped", 0))):
                logger.log(done, {"skipped_update": 1, "loss": jax.device_get(metrics.get("loss")),
                                  "batch_ids": batch_ids})
                if skips.bad(done):
                    if ckpt.latest_step() != skips.first_bad - 1:
                        save(skips.first_bad - 1, force=True)
                    ckpt.close()
                    logger.close()
                    raise DivergenceError(
                        f"{skips.limit} consecutive updates with non-finite loss or gradients (steps "
                        f"{skips.first_bad}..{done}, first batch ids {skips.first_ids or batch_ids}); the "
                        f"updates were skipped, so the checkpoint at step {skips.first_bad - 1} in "
                        f"{ckpt.directory} holds the weights from before the first bad step")
                skips.first_ids = skips.first_ids or batch_ids
            else:
                skips.good()
            if done % cfg.train.log_every == 0 or done == total:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                logger.log(done, metrics)
            loss = metrics.get("loss")
            progress.update(tokens, **({"loss": float(loss)} if loss is not None else {}))
            if evaluate is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < total:
                logger.log(done, evaluate(state))
            if guard.requested:
                save(done)
                ckpt.wait()
                preempted = True
                print(f"\n[jaxrl_rm] preempted: checkpoint at step {done} written to {ckpt.directory}; "
                      f"resume with the same command (resume=auto).", flush=True)
                break
            if ckpt.should_save(done) or done == total:
                save(done)
    progress.close()
    eval_after = {}
    if not preempted and evaluate is not None:
        eval_after = evaluate(state)
        logger.log(total, eval_after)
    ckpt.close()
    logger.close()
    return LoopResult(state=state, step=done, eval_before=eval_before,
                      eval_after=eval_after, preempted=preempted, extra=extra)


def write_summary(cfg, summary: dict) -> None:
    logger = RunLogger(cfg.run_dir, tensorboard=False)
    logger.summary(summary)
    logger.close()
