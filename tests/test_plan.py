"""`--plan TOPOLOGY`: every step of a config compiled for a TPU slice with libtpu (nothing runs).

Checks that the planner compiles the trainers' own jitted steps (SFT, GRPO with its rollout and
reward scoring, a pipeline whose later stages load earlier stages' exports), that its per-chip
peak adds up (resident weights + the step's transients), that a batch too large for the chip
exits 1 naming the step, the chip's HBM and the shortfall, and that it needs no weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tpu_aot

require_tpu_aot()

pytestmark = pytest.mark.tpu_aot

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _plan(config, topology, overrides=(), **kwargs):
    from jaxrl_rm.config import load_config
    from jaxrl_rm.plan import plan

    return plan(load_config(config, list(overrides)), topology, **kwargs)


def test_sft_plan_counts_resident_state_once_and_shards_the_batch(tmp_path):
    """Default (SFT) config on 4 v5e chips, 2 micro-batches: one train step whose arguments are
    the train state + batch, the state donated (counted once in the peak), gradients all-reduced
    over `data`, and no all-gather: every micro-batch keeps each chip's own rows (a contiguous
    split of the sharded batch put each micro-batch on two chips and gathered it)."""
    result = _plan(None, "v5e:2x2", [f"run_dir={tmp_path}", "train.micro_batches=2"])
    (phase,) = result.phases
    (step,) = phase.steps
    assert (phase.name, step.name) == ("sft", "train_step")
    r = step.report
    state = phase.resident
    assert r.argument_bytes > state and r.alias_bytes >= state * 0.99  # the donated train state
    assert step.peak(state) == state + (r.argument_bytes - state) + r.temp_bytes + r.output_bytes - r.alias_bytes
    assert "all-reduce" in r.collectives and "all-gather" not in r.collectives, r.collectives
    summary = result.summary()
    assert summary["fits"] and summary["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert set(summary["steps"]) == {"sft/train_step"}


def test_pipeline_stages_plan_from_earlier_exports(tmp_path):
    """rlhf_bt_tiny: SFT -> BT RM (from the SFT export) -> GRPO with the RM as reward. The
    exports do not exist yet; each stage is planned with the architecture of the stage that
    writes it, and the GRPO phase holds the RM's weights resident."""
    result = _plan(str(ROOT / "configs/rlhf_bt_tiny.yaml"), "v5e:2x2", [f"run_dir={tmp_path}"])
    names = [f"{ph.name}/{st.name}" for ph in result.phases for st in ph.steps]
    assert names[0].endswith("sft/train_step")
    assert any(n.endswith("rm_bt/train_step") for n in names), names
    grpo = result.phases[-1]
    assert [st.name for st in grpo.steps][:2] == ["rollout", "train_step"]
    assert any(st.name.startswith("score/") for st in grpo.steps), grpo.steps
    assert any("params" in k and "policy" not in k for k in grpo.residents), grpo.residents
    assert not Path(tmp_path, "sft").exists()  # nothing ran, nothing was written


def test_plan_steps_selects_steps_by_pattern(tmp_path):
    """`--plan-steps`: only the steps matching the patterns are compiled and reported (a 7B step
    takes minutes to compile on a CPU host); a pattern matching no step names itself."""
    from jaxrl_rm.configlib import ConfigError

    config = str(ROOT / "configs/rlhf_bt_tiny.yaml")
    result = _plan(config, "v5e:2x2", [f"run_dir={tmp_path}"], compile=False,
                   steps=["*/rollout", "*rm_bt/train_step"])
    names = [row["step"] for row in result.rows()]
    assert len(names) == 2 and names[0].endswith("rm_bt/train_step") and names[1].endswith("/rollout"), names
    with pytest.raises(ConfigError, match="'grpo/no_such_step' matches no step"):
        _plan(config, "v5e:2x2", [f"run_dir={tmp_path}"], compile=False, steps=["grpo/no_such_step"])


def test_rollout_reports_its_kv_cache_per_chip(tmp_path):
    """The sampler's KV cache on one chip, from the model's shape: rlvr_tiny's 16 prompts x 8 samples
    over 4 chips are 32 rows, each 32 prompt + 16 completion slots (the compiled buckets) of 2
    layers x K, V x 2 heads x 32 dims in float32; and how many rows' caches the HBM left holds."""
    result = _plan(str(ROOT / "configs/rlvr_tiny.yaml"), "v5e:2x2", [f"run_dir={tmp_path}"], steps=["grpo/rollout"])
    (row,) = result.rows()
    row_bytes = 2 * 2 * 2 * 32 * (32 + 16) * 4
    assert row["kv_rows_per_chip"] == 32 and row["kv_cache_gib"] * GIB == 32 * row_bytes
    assert row["kv_max_rows_per_chip"] == (16 * GIB - (row["peak_gib"] * GIB - 32 * row_bytes)) // row_bytes
    assert "KV cache of grpo/rollout: 1.5 MiB per chip (32 sample rows)" in result.table()


def test_slot_engine_rollout_is_planned_with_its_own_caches(tmp_path):
    """`grpo.rollout_engine=slots`: the planner compiles the slot engine's decode (a slot group per
    data shard) and counts its caches: 128 samples over 4 chips are 32 sample slots of 8 completion
    positions and 128 / 8 / 4 = 4 shared prompt slots of 24 positions per chip, against 32 rows of
    32 + 16 bucketed positions for the static sampler; one more sample slot costs 8 + 24 / 8
    positions."""
    result = _plan(str(ROOT / "configs/rlvr_tiny.yaml"), "v5e:2x2",
                   [f"run_dir={tmp_path}", "grpo.rollout_engine=slots"], steps=["grpo/rollout"])
    (row,) = result.rows()
    slot_bytes = 2 * 2 * 2 * 32 * 4  # layers x (K, V) x heads x head_dim x float32
    assert row["kv_cache_gib"] * GIB == slot_bytes * (32 * 8 + 4 * 24)
    assert row["kv_rows_per_chip"] == 32 and row["kv_unit"] == "sample slots, 4 prompt slots"
    assert row["kv_max_rows_per_chip"] == int((16 * GIB - (row["peak_gib"] * GIB - row["kv_cache_gib"] * GIB))
                                              // (slot_bytes * (8 + 24 / 8)))
    assert row["collectives"] == {"all-reduce": 1}, row["collectives"]  # the loop's flag; no cache moves
    assert "(32 sample slots, 4 prompt slots) in float32" in result.table()


def test_ensemble_reward_plans_each_member_under_its_own_name(tmp_path):
    """Two judges in one ensemble: two scoring programs and two resident weight entries, named
    `<ensemble>/m<i>` (lowered only: the planner's own tests compile)."""
    tiny = tmp_path / "judge"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    judge = {"type": "judge", "path": str(tiny), "options": {"max_new_tokens": 8, "max_prompt_length": 64}}
    task = {"name": "math", "kind": "verifiable", "data": "synthetic:arithmetic", "rewards": [
        {"type": "ensemble", "options": {"name": "jury", "reduce": "min", "members": [judge, judge]}}]}
    result = _plan(None, "v5e:2x2", [f"run_dir={tmp_path / 'run'}", "task=grpo", "grpo.tasks=" + json.dumps([task])],
                   compile=False)
    steps = [row["step"] for row in result.rows()]
    assert "grpo/score/jury/m0" in steps and "grpo/score/jury/m1" in steps, steps
    assert {"jury/m0 params", "jury/m1 params"} <= set(result.phases[-1].residents)


def test_oversized_batch_exits_1_naming_step_hbm_and_shortfall(tmp_path):
    """A real-width model (d 2048) with 64 sequences of 4096 tokens per chip of SFT cannot fit a
    v5e chip's 16 GiB: the command exits 1 and says which step, the HBM and by how much."""
    cmd = [sys.executable, "-m", "jaxrl_rm.main", "--plan", "v5e:2x2", f"run_dir={tmp_path}", "mesh.data=4",
           "model.hidden_size=2048", "model.intermediate_size=5632", "model.num_hidden_layers=2",
           "model.num_attention_heads=16", "model.num_key_value_heads=4", "data.max_length=4096",
           "train.batch_size=256", "model.dtype=bfloat16"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("plan: ")]
    assert errors, out.stderr[-2000:]
    assert "step sft/train_step needs" in errors[0] and "v5e chip has 16 GiB HBM: short by" in errors[0], errors
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["fits"] is False and summary["max_peak_gib"] > 16
    short = float(errors[0].rsplit("short by ", 1)[1].split()[0])
    assert abs(short - (summary["max_peak_gib"] - 16)) < 0.01


RECIPES = sorted((ROOT / "configs/recipes").glob("*.yaml"))


def _planned_for(path):
    """The topology a recipe's header names: `# planned for: v5p:2x2x2 ...`."""
    for line in path.read_text().splitlines():
        if line.startswith("# planned for:"):
            return line.split(":", 1)[1].split()[0]
    raise AssertionError(f"{path.name}: no '# planned for: TOPOLOGY' header line")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_lowers_on_its_topology_and_its_weights_fit(recipe, tmp_path):
    """Each paper-scale recipe, on the topology its header names and the mesh it sets: every
    step lowers for the placed shapes (the planner's fast mode: no compile), and the weights and
    optimizer states that stay resident fit the chip's HBM with room for activations."""
    result = _plan(str(recipe), _planned_for(recipe), [f"run_dir={tmp_path}"], compile=False)
    assert result.phases and all(ph.steps for ph in result.phases)
    for ph in result.phases:
        assert ph.resident < 0.8 * result.hbm_bytes, (ph.name, ph.residents)
        assert any(st.name == "train_step" for st in ph.steps), [st.name for st in ph.steps]
