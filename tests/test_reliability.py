"""Reliability: divergence guards, preemption (SIGTERM / SIGKILL) with exact resume, config fuzzing."""

import json
import os
import re
import shutil
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
# Two tasks (the second starting at step 2) and DAPO dynamic sampling on a graded score.
GRPO_MIX = GRPO[:-1] + [
    "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2", "grpo.dynamic_sampling_metric=score",
    "grpo.tasks=[{name: rev, data: 'synthetic:reverse', ratio: 0.75, rewards: [{type: exact_match}, "
    "{type: hidden_quality}]}, {name: ari, data: 'synthetic:arithmetic', ratio: 0.25, start_step: 2, "
    "rewards: [{type: exact_match}]}]"]
J1 = ["task=judge_j1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
      "judge.train_sampler=corrupt", "judge.eval_sampler=corrupt", "judge.num_train_prompts=32",
      "judge.num_eval_prompts=16", "judge.warmup_steps=0", "judge.eval_size=8", "grpo.prompts_per_step=4",
      "grpo.num_samples=4", "grpo.max_new_tokens=6", "grpo.max_prompt_length=48", "logging.progress=false",
      "logging.tensorboard=false"]


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


def _wait_for(predicate, timeout=300, poll=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _ckpt_steps(run_dir):
    """Steps of the complete checkpoints (Orbax renames a step's temporary directory when done)."""
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _tmp_dirs(run_dir):
    """Temporary directories of checkpoints being written (or left by a kill during a save)."""
    d = run_dir / "checkpoints"
    return {p.name for p in d.iterdir() if "tmp" in p.name} if d.exists() else set()


def _resumed_at(text):
    """The step a run said it resumed from ("resumed from <dir> at step N"), or None."""
    found = re.findall(r"resumed from \S+ at step (\d+)", text)
    return int(found[-1]) if found else None


def train_rows(run_dir):
    """metrics.jsonl's training rows in file order (each step must appear once)."""
    return [r for r in rows(run_dir) if "loss" in r and "skipped_update" not in r]


def spy_steps(monkeypatch):
    """Record [(step, batch_ids, sample_hash)] of every step that every pipeline's train loop runs
    in this process from now on: the proof of which steps a (resumed) run really ran and on what."""
    from jaxrl_rm.train import grpo, judge, loop, reward_model, sft

    ran = []

    def spy(*, run_step, **kwargs):
        def step(state, s):
            state, metrics, tokens = run_step(state, s)
            ran.append((s + 1, metrics.get("batch_ids"), metrics.get("sample_hash")))
            return state, metrics, tokens

        return loop.train_loop(run_step=step, **kwargs)

    for module in (sft, grpo, judge, reward_model):
        monkeypatch.setattr(module, "train_loop", spy)
    return ran


def _kill_resume_check(tmp_path, monkeypatch, capsys, args, keys, total, *, save_tries=6):
    """Run `args` once uninterrupted and once SIGKILLed twice — after its first checkpoint, then
    while a checkpoint is being written (retried with other timings until a kill lands inside a
    save) — then resumed to the end, and check that it really resumed:

    - every restarted process resumed from the last complete checkpoint before its kill (never
      the torn one), the final one included;
    - the final process ran exactly the remaining steps, on the uninterrupted run's batches
      (batch ids, and GRPO's per-step `sample_hash`: sampler RNG, task-mixer counters, dynamic
      sampling);
    - metrics.jsonl holds each step once, with the uninterrupted run's values of `keys`.
    """
    ref, run = tmp_path / "ref", tmp_path / "run"
    ran = spy_steps(monkeypatch)
    assert main(args + [f"run_dir={ref}"]) == 0
    ref_ran = list(ran)
    assert [s for s, _, _ in ref_ran] == list(range(1, total + 1))
    cmd = [sys.executable, "-m", "jaxrl_rm.main", *args, f"run_dir={run}"]
    launches = []

    def kill_when(point, delay=0.0, poll=0.02):
        """Start the run, SIGKILL it `delay` s after `point(new complete steps, new tmp dirs)`.
        Returns (finished on its own, temporary directories the kill left behind)."""
        before, tmp_before = _ckpt_steps(run), _tmp_dirs(run)
        log = tmp_path / f"launch{len(launches)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            assert _wait_for(lambda: point(set(_ckpt_steps(run)) - set(before), _tmp_dirs(run) - tmp_before)
                             or proc.poll() is not None, poll=poll)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        text = log.read_text()
        launches.append(text)
        assert _resumed_at(text) == (before[-1] if before else None), text[-3000:]
        if proc.returncode == 0:
            return True, set()
        assert proc.returncode == -signal.SIGKILL, text[-3000:]
        return False, _tmp_dirs(run) - tmp_before

    kill_when(lambda done, tmp: bool(done))  # right after a checkpoint
    caught_saving = False
    for attempt in range(save_tries):  # while a checkpoint is written: vary the timing until one is hit
        finished, torn = kill_when(lambda done, tmp: bool(tmp), delay=0.004 * attempt, poll=0.001)
        if finished:  # ran to the end between kills: start over
            shutil.rmtree(run)
        elif torn:
            caught_saving = True
            break
    assert caught_saving, f"no SIGKILL landed inside a checkpoint write in {save_tries} tries"
    last_complete = _ckpt_steps(run)[-1]
    assert all(int(name.split(".")[0]) > last_complete for name in torn)  # the torn save is the newest

    capsys.readouterr()
    del ran[:]
    assert main(args + [f"run_dir={run}"]) == 0  # resume=auto finishes the run
    assert _resumed_at(capsys.readouterr().out) == last_complete
    assert ran == [r for r in ref_ran if r[0] > last_complete]  # only the remaining steps, same batches
    got, want = train_rows(run), train_rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, total + 1))
    assert [tuple(r.get(k) for k in keys) for r in got] == [tuple(r.get(k) for k in keys) for r in want]
    return ran


@pytest.mark.slow
def test_sigkill_at_two_points_resumes_exactly_sft(tmp_path, monkeypatch, capsys):
    args = SFT + ["train.steps=24", "checkpoint.every=2", "checkpoint.async_save=true"]
    _kill_resume_check(tmp_path, monkeypatch, capsys, args, ("loss", "grad_norm"), 24)


@pytest.mark.slow
def test_sigkill_at_two_points_resumes_exactly_grpo(tmp_path, monkeypatch, capsys):
    """Two tasks (ratios, a late start), dynamic sampling: the task mixer's counters and credit
    move by a data-dependent amount per step, so only a restored mixer replays the batches."""
    args = GRPO_MIX + ["train.steps=12", "checkpoint.every=2", "checkpoint.async_save=true"]
    ran = _kill_resume_check(tmp_path, monkeypatch, capsys, args, ("loss", "reward_mean", "sample_hash"), 12)
    assert all(ids and any(i.startswith("arith-") for i in ids) for _, ids, _ in ran)  # both tasks drawn


@pytest.mark.slow
def test_sigkill_at_two_points_resumes_exactly_judge_j1(tmp_path, monkeypatch, capsys):
    """The J1 judge loop (data stage reused, RL stage resumed) from the corrupt sampler's judgments."""
    args = J1 + ["train.steps=8", "checkpoint.every=2", "checkpoint.async_save=true"]
    _kill_resume_check(tmp_path, monkeypatch, capsys, args, ("loss", "reward_mean", "sample_hash"), 8)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    args = SFT + ["train.steps=40", "checkpoint.every=100"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ran = spy_steps(monkeypatch)
    assert main(args + [f"run_dir={ref}"]) == 0
    ref_ran = list(ran)
    proc = subprocess.Popen([sys.executable, "-m", "jaxrl_rm.main", *args, f"run_dir={run}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: (run / "metrics.jsonl").exists() and len(rows(run)) >= 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preempted: checkpoint at step" in out and "resume with the same command" in out
    at = int(re.search(r"preempted: checkpoint at step (\d+)", out).group(1))
    assert _ckpt_steps(run) == [at] and at < 40
    capsys.readouterr()
    del ran[:]
    assert main(args + [f"run_dir={run}"]) == 0
    assert _resumed_at(capsys.readouterr().out) == at
    assert ran == [r for r in ref_ran if r[0] > at]  # the remaining steps only, on the same batches
    assert [r["step"] for r in train_rows(run)] == list(range(1, 41))
    assert step_metrics(run, ("loss", "grad_norm")) == step_metrics(ref, ("loss", "grad_norm"))


# --- 1000 malformed configs: only ConfigError, always naming a key --------------------------------
_KEYS = ["task", "run_dir", "seed", "resume", "model.hidden_size", "model.dtype", "model.model_type", "optim.lr",
         "optim.learning_rate", "optim.schedule", "train.steps", "train.batch_size", "train.micro_batches",
         "data.on_bad_row", "data.max_length", "mesh.data", "grpo.num_samples", "grpo.clip_low", "grpo.clip_high",
         "grpo.tasks", "grpo.tasks.0", "grpo.loss_agg_mode", "nope", "model.nope.deeper", "logging.tensorboard"]
_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.sampled_from(["name", "ratio", "x", "rewards"]), st.integers(-1, 3), max_size=2))


def _names_key(message: str, key: str) -> bool:
    """`message` names `key` as a whole dotted name, or the section it fails at (`model.nope` for
    an unknown `model.nope.deeper`, `grpo.tasks` for `grpo.tasks.0`); never a bare top section."""
    parts = key.split(".")
    for n in range(len(parts), min(2, len(parts)) - 1, -1):
        if re.search(rf"(?<![\w.]){re.escape('.'.join(parts[:n]))}(?!\w)", message):
            return True
    return False


def test_names_key():
    assert _names_key("unknown config key 'model.nope'; valid keys under 'model': dtype", "model.nope.deeper")
    assert _names_key("grpo.tasks: expected a list, got {'0': 1}", "grpo.tasks.0")
    assert _names_key("task: expected one of ['sft'], got 3", "task")
    assert not _names_key("grpo.tasks: expected a list", "task")  # a word inside another key
    assert not _names_key("model: bad", "model.hidden_size") and not _names_key("expected int, got 3", "seed")


def test_hypothesis_examples_are_the_same_every_run(request):
    """tests/conftest.py loads the derandomized `ci` profile unless --hypothesis-profile names one."""
    if request.config.getoption("--hypothesis-profile", None) not in (None, "ci"):
        pytest.skip("another Hypothesis profile was asked for")
    d = settings.default
    assert d.derandomize and d.database is None and d.deadline is None and d.max_examples == 100
    # a test's own @settings (here max_examples=1000) keeps the profile's fixed seed
    assert test_malformed_configs_fail_only_with_config_errors._hypothesis_internal_use_settings.derandomize


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=4))
def test_malformed_configs_fail_only_with_config_errors(pairs):
    """Any other exception fails; a ConfigError names one of the overridden keys."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    try:
        load_config(None, overrides)
    except ConfigError as e:
        assert any(_names_key(str(e), k) for k, _ in pairs), (pairs, str(e))


@pytest.mark.slow
def test_sigkill_at_two_points_resumes_exactly_reward_model(tmp_path, monkeypatch, capsys):
    args = ["task=rm_bt", "data.train=synthetic:reverse_pairs", "data.synthetic_size=256", "data.max_length=24",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "train.batch_size=8",
            "rm.eval_size=32", "train.steps=24", "checkpoint.every=2", "checkpoint.async_save=true",
            "logging.progress=false", "logging.tensorboard=false"]
    _kill_resume_check(tmp_path, monkeypatch, capsys, args, ("loss", "grad_norm"), 24)


def test_metrics_readers_skip_a_torn_last_row(tmp_path):
    """metrics.jsonl read while its run writes it, or left by kill -9 in the middle of a row, ends
    in an incomplete line: every reader skips it (summary means, resume truncation, reports); an
    unreadable row elsewhere is corruption and still raises, naming file and line."""
    from jaxrl_rm.report import read_run
    from jaxrl_rm.train.logger import RunLogger, run_means, truncate_metrics_after

    log = RunLogger(tmp_path, tensorboard=False)
    for step, x in ((0, 9.0), (1, 1.0), (2, 3.0), (3, 5.0)):
        log.log(step, {"reward/x": x, "loss": 0.5})
    log.close()
    path = tmp_path / "metrics.jsonl"
    full = path.read_text()
    torn = full + json.dumps({"step": 4, "reward/x": 100.0})[:-7]  # '{"step": 4, "reward/x"'
    path.write_text(torn)
    assert run_means(tmp_path, "reward/") == {"run_mean/reward/x": 3.0}  # steps 1-3; step 0 is eval
    assert dict(read_run(str(tmp_path)).series["reward/x"]) == {0: 9.0, 1: 1.0, 2: 3.0, 3: 5.0}
    truncate_metrics_after(tmp_path, 2)  # resume from the checkpoint at step 2
    assert [r["step"] for r in rows(tmp_path)] == [0, 1, 2]
    path.write_text(torn)
    truncate_metrics_after(tmp_path, 3)
    log = RunLogger(tmp_path, tensorboard=False)  # the resumed run appends whole rows again
    log.log(4, {"reward/x": 7.0})
    log.close()
    assert [r["step"] for r in rows(tmp_path)] == [0, 1, 2, 3, 4]
    path.write_text(full.replace('"loss"', "loss", 1))
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: unreadable"):
        run_means(tmp_path, "reward/")
