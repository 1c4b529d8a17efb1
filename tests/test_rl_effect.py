"""RL improves something: the README's RLVR recipe (`configs/rlvr_tiny.yaml`) shortened to 50 GRPO
steps lifts held-out accuracy by >= 8 points. A loop that stopped learning - a sign flip in the
advantages, a loss that no longer reaches the parameters, rewards that never vary - fails it.

Measured 2026-12-07 (seed 0) under three CPU instruction sets, which round floats differently:
69.1 % -> 97.7 % (default, AVX-512), 64.5 % -> 80.1 % (`XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`),
71.9 % -> 89.8 % (`--xla_cpu_max_isa=AVX`). The recipe's warm-up decays its learning rate so that
where GRPO starts does not hang on rounding (with the constant-lr warm-up it had before, the same
seed started at 26 %, 53 % and 77 %, and this test passed on one CI machine and failed on the next).
Other seeds start lower and gain later: seed 1 goes 30.5 % -> 30.9 % at step 50, 60.5 % at step 300.
A numerics change that fails this test needs those figures re-measured, not the bound loosened."""

import pytest

from conftest import REPO
from jaxrl_rm.config import load_config
from jaxrl_rm.train.grpo import run_grpo


@pytest.mark.slow
def test_rlvr_recipe_gains_eight_points_held_out_in_fifty_steps(tmp_path):
    cfg = load_config(str(REPO / "configs" / "rlvr_tiny.yaml"),
                      [f"run_dir={tmp_path}", "train.steps=50", "train.eval_every=0",
                       "logging.progress=false"])
    summary = run_grpo(cfg)
    assert summary["steps"] == 50
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.08, summary
