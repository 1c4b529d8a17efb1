"""Reliability: divergence guards, preemption (SIGTERM / SIGKILL) with exact resume, config fuzzing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO
from jaxrl_rm.config import load_config
from jaxrl_rm.configlib import ConfigError
from jaxrl_rm.main import main
from jaxrl_rm.train.loop import DivergenceError

SFT = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.max_length=16",
       "data.synthetic_size=256", "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false",
       "grpo.eval_size=8", "grpo.max_new_tokens=4"]
GRPO = ["task=grpo", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "grpo.prompts_per_step=4", "grpo.num_samples=4", "grpo.max_new_tokens=6", "grpo.max_prompt_length=16",
        "grpo.eval_size=8", "data.synthetic_size=64", "logging.progress=false", "logging.tensorboard=false",
        "grpo.tasks=[{name: rev, data: 'synthetic:reverse', rewards: [{type: exact_match}]}]"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_metrics(run_dir, keys):
    return {r["step"]: tuple(r.get(k) for k in keys) for r in rows(run_dir) if "loss" in r and "skipped_update" not in r}


def test_nan_batch_is_skipped_logged_and_training_continues(tmp_path):
    assert main(SFT + ["train.steps=8", "debug.nan_steps=[3]", f"run_dir={tmp_path}"]) == 0
    skipped = [r for r in rows(tmp_path) if r.get("skipped_update")]
    assert [r["step"] for r in skipped] == [4]
    assert skipped[0]["loss"] == "nan" and len(skipped[0]["batch_ids"]) == 8
    normal = [r for r in rows(tmp_path) if "grad_norm" in r]
    assert all(r["skipped"] == (1 if r["step"] == 4 else 0) for r in normal)
    assert isinstance(normal[-1]["loss"], float)  # finite after the skipped step


def test_consecutive_nans_stop_with_checkpoint_before_first_bad_step(tmp_path):
    with pytest.raises(DivergenceError) as e:
        main(SFT + ["train.steps=12", "debug.nan_steps=[4, 5, 6]", "train.max_consecutive_skips=3",
                    "checkpoint.every=2", f"run_dir={tmp_path}"])
    msg = str(e.value)
    assert "3 consecutive updates" in msg and "steps 5..7" in msg and "checkpoint at step 4" in msg
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4  # nothing saved inside the bad run; latest = before the first bad step


def _wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _ckpt_steps(run_dir):
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _saving(run_dir):
    d = run_dir / "checkpoints"
    return d.exists() and any("tmp" in p.name for p in d.iterdir())


def _kill_resume_compare(tmp_path, args, keys, total):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(args + [f"run_dir={ref}"]) == 0
    cmd = [sys.executable, "-m", "jaxrl_rm.main", *args, f"run_dir={run}"]
    kill_points = [lambda: len(_ckpt_steps(run)) >= 1,            # right after a checkpoint
                   lambda: _saving(run),                             # while a checkpoint is written
                   lambda: bool(_ckpt_steps(run)) and _ckpt_steps(run)[-1] >= total - 3]
    caught_saving = False
    for point in kill_points:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hit = _wait_for(lambda: point() or proc.poll() is not None)
        during_save = _saving(run)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        caught_saving |= hit and during_save
    assert main(args + [f"run_dir={run}"]) == 0  # resume=auto finishes the run
    got, want = step_metrics(run, keys), step_metrics(ref, keys)
    assert sorted(want) == list(range(1, total + 1))
    assert got == want
    return caught_saving


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_exactly_sft(tmp_path):
    args = SFT + ["train.steps=24", "checkpoint.every=2", "checkpoint.async_save=true"]
    _kill_resume_compare(tmp_path, args, ("loss", "grad_norm"), 24)


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_exactly_grpo(tmp_path):
    args = GRPO + ["train.steps=12", "checkpoint.every=2", "checkpoint.async_save=true"]
    _kill_resume_compare(tmp_path, args, ("loss", "reward_mean", "sample_hash"), 12)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path):
    args = SFT + ["train.steps=40", "checkpoint.every=100"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(args + [f"run_dir={ref}"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "jaxrl_rm.main", *args, f"run_dir={run}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: (run / "metrics.jsonl").exists() and len(rows(run)) >= 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preempted: checkpoint at step" in out and "resume with the same command" in out
    assert _ckpt_steps(run) and _ckpt_steps(run)[-1] < 40
    assert main(args + [f"run_dir={run}"]) == 0
    assert step_metrics(run, ("loss", "grad_norm")) == step_metrics(ref, ("loss", "grad_norm"))


# --- 1000 malformed configs: only ConfigError, always naming a key --------------------------------
_KEYS = ["task", "run_dir", "seed", "resume", "model.hidden_size", "model.dtype", "model.model_type", "optim.lr",
         "optim.learning_rate", "optim.schedule", "train.steps", "train.batch_size", "train.micro_batches",
         "data.on_bad_row", "data.max_length", "mesh.data", "grpo.num_samples", "grpo.clip_low", "grpo.clip_high",
         "grpo.tasks", "grpo.tasks.0", "grpo.loss_agg_mode", "nope", "model.nope.deeper", "logging.tensorboard"]
_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.sampled_from(["name", "ratio", "x", "rewards"]), st.integers(-1, 3), max_size=2))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=4))
def test_malformed_configs_fail_only_with_config_errors(pairs):
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    try:
        load_config(None, overrides)
    except ConfigError as e:
        assert str(e)  # a message, naming a key or value


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_exactly_reward_model(tmp_path):
    args = ["task=rm_bt", "data.train=synthetic:reverse_pairs", "data.synthetic_size=256", "data.max_length=24",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "train.batch_size=8",
            "rm.eval_size=32", "train.steps=24", "checkpoint.every=2", "checkpoint.async_save=true",
            "logging.progress=false", "logging.tensorboard=false"]
    _kill_resume_compare(tmp_path, args, ("loss", "grad_norm"), 24)
