"""Orbax checkpoints of the train state plus a small JSON of host-side state.

What is saved: params, optimizer state, step and RNG (one pytree, restored onto the current mesh's
shardings), and `extra` JSON (data-iterator position, metrics needed to resume, anything else a
trainer needs). Orbax writes each step into a temporary directory and renames it when complete,
so a save interrupted by `kill -9` never becomes the latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keep-last-N, interval-based, optionally async checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute() if "://" not in str(directory) else directory
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, extra: dict | None = None) -> bool:
        """Save `state` (pytree of arrays) and `extra` (JSON) at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """Restore onto the shardings of `abstract_state` (a pytree of arrays or ShapeDtypeStructs).

        Returns (state, extra, step)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" not in str(e):
                raise
            raise ValueError(
                f"{self.directory}: the checkpoint at step {step} does not fit this run's state "
                f"({str(e).splitlines()[0]}). A run resumes only with the model it was saved with, "
                "layer layout included: check model.scan_layers (runs saved before that key existed "
                "are unrolled: model.scan_layers=false) and the architecture.") from e
        return restored["state"], dict(restored["extra"] or {}), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
