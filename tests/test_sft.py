"""SFT pipeline end to end: CLI, run-directory contract, bad rows, exact resume after kill -9."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from jaxrl_rm.data.pipeline import BatchStream, pack_examples, tokenize_prompt_response
from jaxrl_rm.main import main
from test_reliability import spy_steps

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "data.max_length=16", "data.synthetic_size=256", "train.batch_size=8", "logging.progress=false",
        "logging.tensorboard=false"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tokenize_truncation_and_packing():
    ids, mask = tokenize_prompt_response(list(range(10, 30)), [5, 6, 7], max_length=8, eos_id=2)
    assert ids.tolist() == [26, 27, 28, 29, 5, 6, 7, 2] and mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    packed = pack_examples([(np.arange(3), np.ones(3, bool)), (np.arange(6), np.ones(6, bool)),
                            (np.arange(4), np.ones(4, bool))], length=8, pad_id=0)
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1] * 6 + [0, 0]]
    assert packed["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_batch_stream_is_a_pure_function_of_step():
    rows = {"x": np.arange(10)}
    a, b = BatchStream(rows, 4, seed=3), BatchStream(rows, 4, seed=3)
    seen = np.concatenate([a.batch(s)["x"] for s in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # epoch 0 is a permutation
    assert [b.batch(s)["x"].tolist() for s in (4, 1)] == [a.batch(4)["x"].tolist(), a.batch(1)["x"].tolist()]


def test_batch_stream_cuts_padding_to_the_global_batch_width():
    """With `lengths`, a batch's `[B, W]` arrays are cut to the power-of-two bucket of its longest
    row (only padding columns go), 1-D arrays pass whole, and the rows are the uncut stream's."""
    from jaxrl_rm.data.pipeline import length_bucket, pad_examples

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(3, 15, 30), [60, 64]])
    rows = pad_examples([(np.arange(1, n + 1), np.ones(n, bool)) for n in lengths], 64, 0)
    rows["id"] = np.arange(len(lengths))
    full, cut = BatchStream(rows, 4, seed=1), BatchStream(rows, 4, seed=1, lengths=rows["attention_mask"].sum(1))
    widths = set()
    for step in range(20):
        a, b = full.batch(step), cut.batch(step)
        width = length_bucket(int(lengths[a["id"]].max()), 64)
        widths.add(width)
        assert b["input_ids"].shape == (4, width) and b["loss_mask"].shape == (4, width)
        assert (b["id"] == a["id"]).all() and (b["input_ids"] == a["input_ids"][:, :width]).all()
        assert not a["attention_mask"][:, width:].any()  # only padding was cut
    assert widths == {16, 64}  # short batches at 16 columns, a batch holding a long row at the full 64
    assert length_bucket(3, 64) == 16 and length_bucket(17, 64) == 32 and length_bucket(40, 48) == 48


def test_sft_loss_is_the_same_on_a_cut_batch():
    """The cut is exact: the summed NLL and token count of a right-padded batch do not depend on
    how many padding columns it carries."""
    import jax.numpy as jnp

    from jaxrl_rm.config import ModelSpec
    from jaxrl_rm.data.pipeline import pad_examples
    from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.train.sft import next_token_loss

    tok = load_or_build_tokenizer("")
    model = build_model(ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1), tok, seed=0)
    rows = pad_examples([(np.arange(5, 5 + n), np.arange(n) >= 2) for n in (5, 9, 12)], 48, 0)
    full = next_token_loss(model, {k: jnp.asarray(v) for k, v in rows.items()})
    cut = next_token_loss(model, {k: jnp.asarray(v[:, :16]) for k, v in rows.items()})
    assert float(cut[1]) == float(full[1]) > 0
    assert float(cut[0]) == pytest.approx(float(full[0]), rel=1e-5)


def test_sft_cli_trains_and_writes_run_dir(tmp_path):
    """configs/sft_tiny.yaml through the CLI. What keeps it at about a minute is that the train
    step, the eval step and the sampler compile once each (no per-step recompilation), counted
    from JAX's compile log rather than timed on a shared machine."""
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jaxrl_rm.main", "--config", "configs/sft_tiny.yaml",
                          f"run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "JAX_LOG_COMPILES": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    compiles = re.findall(r"Compiling jit\((\w+)\)", out.stderr)
    assert [compiles.count(f) for f in ("step", "evaluate", "_generate_core")] == [1, 1, 1], sorted(compiles)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert all("step" in r for r in _rows(run_dir))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss_after"] < 0.6 * summary["eval_loss_before"]
    assert "tok/s" in out.stderr  # progress bar with throughput


def test_bad_rows_error_or_skip(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(12)]
    lines = good[:3] + ['{"prompt": "q", "response": ""}'] + good[3:7] + ['{"prompt": 3, "response": "x"}'] + good[7:]
    data.write_text("\n".join(lines) + "\n")
    base = [f"data.train={data}", "train.steps=2", f"run_dir={tmp_path / 'r'}"] + TINY
    with pytest.raises(ValueError) as e:
        main(base)
    assert f"{data}:4" in str(e.value) and "response" in str(e.value)
    assert main(base + ["data.on_bad_row=skip", f"run_dir={tmp_path / 'r2'}"]) == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["data/rows_skipped"] == 2 and summary["train_examples"] == 12


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, monkeypatch, capsys):
    """kill -9 after a synchronous checkpoint; the rerun resumes from it and runs only the rest."""
    common = TINY + ["train.steps=14", "train.log_every=1", "checkpoint.every=4", "checkpoint.async_save=false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ran = spy_steps(monkeypatch)
    assert main(common + [f"run_dir={ref_dir}"]) == 0
    ref_ran = list(ran)
    cmd = [sys.executable, "-m", "jaxrl_rm.main", *common, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert done_before < 14
    capsys.readouterr()
    del ran[:]
    assert main(common + [f"run_dir={run_dir}"]) == 0  # resume=auto
    assert f"at step {done_before}" in capsys.readouterr().out
    assert ran == [r for r in ref_ran if r[0] > done_before]  # the remaining steps only, same batches
    ref = [(r["step"], r["loss"]) for r in _rows(ref_dir) if "loss" in r]
    got = [(r["step"], r["loss"]) for r in _rows(run_dir) if "loss" in r]
    assert [s for s, _ in got] == list(range(1, 15)) and got == ref  # each step once, same values
