"""RL improves something: the README's RLVR recipe (`configs/rlvr_tiny.yaml`) shortened to 50 GRPO
steps still lifts held-out accuracy by >= 8 points (measured: 27.7 % -> 49.2 % at step 50, 80.9 %
at step 300 on 2026-12-06). A loop that stopped learning - a sign flip in the advantages, a loss
that no longer reaches the parameters, rewards that never vary - fails it.

The gain is this seed's and this layer layout's: the 200-step SFT warm-up is chaotic, so a change of
float rounding moves where GRPO starts (scanned layers: 38.3 % -> 41.4 %; seeds 1 and 2: the warm-up
alone reaches 90-94 %; README, "Layer layout and remat"). A numerics change that fails this test
needs that table re-measured, not the bound loosened."""

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
