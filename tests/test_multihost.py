"""Multi-host correctness on one machine: two JAX processes joined by `jax.distributed` over
localhost (CPU, gloo collectives) must train exactly like one process with the same global batch.

Each process has 2 fake CPU devices; the mesh is data=2 x fsdp=2, so the batch is split across
processes (each builds only its rows, assembled with `jax.make_array_from_process_local_data`) and
parameters / optimizer state are sharded across processes too (checkpoints are written
collectively). The single-process reference has 4 devices and the same mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

TINY = ["--config", "configs/sft_tiny.yaml", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_hidden_layers=1", "data.max_length=16", "data.synthetic_size=256", "train.batch_size=8",
        "train.log_every=1", "train.eval_batches=2", "grpo.eval_size=8", "logging.progress=false",
        "checkpoint.every=2", "checkpoint.async_save=false", "mesh.data=2", "mesh.fsdp=2"]
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}:{REPO / 'tests'}", **(extra or {}))
    return env


def run_processes(commands: list[list[str]], envs: list[dict], timeout: float = 600) -> list[str]:
    """Start every command at once, wait for all; on any failure stop the rest and report all."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs)]
    deadline = time.monotonic() + timeout
    outputs: list[tuple[int | None, str, str]] = [None] * len(procs)  # type: ignore[list-item]
    failed = False
    try:
        while any(o is None for o in outputs):
            for i, p in enumerate(procs):
                if outputs[i] is None and p.poll() is not None:
                    out, err = p.communicate()
                    outputs[i] = (p.returncode, out, err)
                    failed |= p.returncode != 0
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if outputs[i] is None:  # a peer failed or we timed out: stop this one (we started it)
                p.kill()
                out, err = p.communicate()
                outputs[i] = (None, out, err)
    if any(rc != 0 for rc, _, _ in outputs):
        report = "\n".join(f"--- process {i} (rc={rc})\n{out[-2000:]}\n{err[-6000:]}"
                           for i, (rc, out, err) in enumerate(outputs))
        raise AssertionError(f"multi-process run failed or timed out:\n{report}")
    return [out for _, out, _ in outputs]


def main_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxrl_rm.main", *TINY, *args]


def two_process_run(args: list[str], *, via_env: bool = True) -> list[str]:
    """`python -m jaxrl_rm.main` as 2 processes x 2 CPU devices; coordinates via the env vars
    the launchers export, or via the `distributed.*` config keys."""
    address = f"localhost:{free_port()}"
    commands, envs = [], []
    for pid in range(2):
        if via_env:
            env = _env(2, {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)})
            commands.append(main_cmd(*args))
        else:
            env = _env(2)
            commands.append(main_cmd(*args, f"distributed.coordinator_address={address}",
                                     "distributed.num_processes=2", f"distributed.process_id={pid}"))
        envs.append(env)
    return run_processes(commands, envs)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def by_step(run_dir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run_dir) if key in r}


def test_collectives_and_process_local_batches():
    """Plumbing, quickly: initialise from the environment, build a global batch from each
    process's BatchStream rows, and reduce it — both processes see the single-process value."""
    code = textwrap.dedent("""
        import json, numpy as np, jax, jax.numpy as jnp
        from jaxrl_rm.config import DistributedConfig
        from jaxrl_rm.parallel.mesh import (fetch_global, maybe_initialize_distributed, make_mesh,
                                            process_sum)
        from jaxrl_rm.parallel.rules import shard_batch
        from jaxrl_rm.data.pipeline import BatchStream
        multi = maybe_initialize_distributed(DistributedConfig())
        mesh = make_mesh(data=-1, fsdp=2)
        stream = BatchStream({"x": np.arange(40, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)},
                             8, seed=1)
        batch = shard_batch(stream.batch(3), mesh)
        total = float(jax.jit(lambda b: (b["x"] ** 2).sum())(batch))
        print("RESULT", json.dumps({"multi": multi, "pc": jax.process_count(), "local_rows": int(stream.batch(3)["x"].shape[0]),
                          "total": total, "rows": fetch_global(batch)["x"][:, 0].tolist(),
                          "tokens": process_sum(int(stream.batch(3)["x"].shape[0]))}))
    """)
    address = f"localhost:{free_port()}"
    outs = run_processes(
        [[sys.executable, "-c", code]] * 2,
        [_env(2, {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
         for i in range(2)], timeout=300)
    (ref,) = run_processes([[sys.executable, "-c", code]], [_env(4)], timeout=300)
    ref, *got = [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:])
                 for o in [ref, *outs]]
    assert ref["multi"] is False and ref["pc"] == 1 and ref["local_rows"] == 8
    for g in got:
        assert g["multi"] is True and g["pc"] == 2 and g["local_rows"] == 4
        assert g["rows"] == ref["rows"] and g["total"] == pytest.approx(ref["total"], rel=1e-6)
        assert g["tokens"] == 8


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """SFT over 2 processes == SFT in 1 process (same global batch), step by step, including a
    resume from a checkpoint both processes wrote; only process 0 writes the run files."""
    ref_dir, mh_dir = tmp_path / "single", tmp_path / "multi"
    # 2 processes, 2 steps (checkpoint at step 2), coordinated through the environment ...
    outs = two_process_run([f"run_dir={mh_dir}", "train.steps=2"], via_env=True)
    # ... then resumed to 4 steps, coordinated through the config keys.
    two_process_run([f"run_dir={mh_dir}", "train.steps=4"], via_env=False)
    run_processes([main_cmd(f"run_dir={ref_dir}", "train.steps=4")], [_env(4)])

    ref_loss, mh_loss = by_step(ref_dir, "loss"), by_step(mh_dir, "loss")
    assert sorted(ref_loss) == sorted(mh_loss) == [1, 2, 3, 4]
    for step in ref_loss:
        assert mh_loss[step] == pytest.approx(ref_loss[step], rel=1e-5), step
    assert by_step(mh_dir, "grad_norm") == pytest.approx(by_step(ref_dir, "grad_norm"), rel=1e-5)
    ref_sum = json.loads((ref_dir / "summary.json").read_text())
    mh_sum = json.loads((mh_dir / "summary.json").read_text())
    assert mh_sum["eval_loss_after"] == pytest.approx(ref_sum["eval_loss_after"], rel=1e-5)
    assert mh_sum["eval_loss_before"] == pytest.approx(ref_sum["eval_loss_before"], rel=1e-5)
    assert mh_sum["steps"] == 4

    # One writer: no duplicated rows (each step once; evaluations before, at the end of the first
    # launch, and after), one event file per launch.
    assert [r["step"] for r in rows(mh_dir) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows(mh_dir) if "eval_loss" in r] == [0, 2, 4]
    assert len(list((mh_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per launch
    # Collective checkpoints: both steps complete, restorable (the resume above used step 2).
    assert sorted(p.name for p in (mh_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (mh_dir / "hf" / "config.json").exists()  # HF export: params gathered from both processes
    assert all(o.strip() for o in outs)  # both processes finished and printed their summary
