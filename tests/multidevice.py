"""Run a snippet in a fresh interpreter with N fake CPU devices (XLA flags must precede jax import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_with_devices(code: str, n: int = 8, timeout: int = 600) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"subprocess failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out.stdout
