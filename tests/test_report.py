"""Watching runs: `python -m jaxrl_rm.report` over run directories, TensorBoard events that hold
the same numbers as metrics.jsonl, and the optional W&B mirror (no network, no import when off)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import types

import pytest
import yaml

from conftest import REPO
from jaxrl_rm.config import load_config
from jaxrl_rm.train.logger import RunLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir, *, lr: float, scale: float, tensorboard: bool = False, nan_at_end: bool = False):
    """A run directory written by the real RunLogger, with a config.yaml like prepare_run_dir's."""
    cfg = load_config(None, [f"optim.learning_rate={lr}", f"run_dir={run_dir}"])
    from jaxrl_rm.configlib import to_dict

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    logger = RunLogger(run_dir, tensorboard=tensorboard)
    logger.log(0, {"eval_loss": 3.0})
    for step in range(1, 7):
        logger.log(step, {"loss": scale * 3.0 / step, "grad_norm": 1.0 + 0.1 * step, "skipped": 0,
                          "tokens_per_s": 100.0 * step})
    logger.log(6, {"eval_loss": float("nan") if nan_at_end else scale, "accuracy": 0.5 * scale})
    logger.summary({"task": "sft", "eval_loss_after": scale, "eval_loss_before": 3.0, "steps": 6})
    logger.close()
    return run_dir


def test_report_cli_writes_pngs_and_markdown(tmp_path):
    a = make_run(tmp_path / "runs" / "lr1e-3", lr=1e-3, scale=1.0)
    b = make_run(tmp_path / "runs" / "lr3e-3", lr=3e-3, scale=0.5, nan_at_end=True)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "jaxrl_rm.report", str(a), str(b), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert proc.stdout.strip() == str(out / "report.md")
    # runs table and the final-metrics table with both runs as columns
    assert "| run | path | task | last step | logged rows |" in md
    assert f"| lr1e-3 | `{a}` | sft | 6 | 6 |" in md
    assert "| metric | lr1e-3 | lr3e-3 |" in md
    assert "| loss | 0.5 (0.5) | 0.25 (0.25) |" in md          # last value (best: min for losses)
    assert "| accuracy | 0.5 (0.5) | 0.25 (0.25) |" in md      # best: max for accuracies
    assert "| eval_loss | 1 (1) | nan (3) |" in md              # NaN kept; best over finite values
    assert "| eval_loss_after | 1 | 0.5 |" in md               # summary.json side by side
    assert "| optim.learning_rate | 0.001 | 0.003 |" in md     # config differences only
    assert "| run_dir |" not in md and "| seed |" not in md
    for metric in ("loss", "eval_loss", "grad_norm", "tokens_per_s", "accuracy", "skipped"):
        png = out / f"{metric}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, metric
        assert f"![{metric}]({metric}.png)" in md


def test_report_filters_names_and_errors(tmp_path, capsys):
    from jaxrl_rm.report import main

    a = make_run(tmp_path / "x" / "run", lr=1e-3, scale=1.0)
    b = make_run(tmp_path / "y" / "run", lr=1e-3, scale=0.5)
    out = tmp_path / "rep"
    assert main([str(a), str(b), "--out", str(out), "--metrics", "loss,eval_*"]) == 0
    md = (out / "report.md").read_text()
    assert "| metric | x/run | y/run |" in md  # same basename: parent folders make names unique
    assert "The resolved configs are identical." in md
    assert sorted(p.name for p in out.glob("*.png")) == ["eval_loss.png", "loss.png"]
    assert main([str(a), "--out", str(out), "--names", "base"]) == 0
    assert "| base |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: not a run directory" in capsys.readouterr().err
    # a torn last line (run killed mid-write) is skipped with a warning, not fatal
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    assert main([str(a), "--out", str(out)]) == 0
    assert "skipping unreadable row" in capsys.readouterr().err


def _tensorboard_scalars(run_dir) -> dict[tuple[str, int], float]:
    """Parse TFRecord event files (length, crc, Event proto, crc) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_tensorboard_holds_the_metrics_jsonl_numbers(tmp_path):
    run = make_run(tmp_path / "run", lr=1e-3, scale=1.0, tensorboard=True, nan_at_end=True)
    jsonl = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step":
                jsonl[(k, row["step"])] = float(v)
    tb = _tensorboard_scalars(run)
    assert set(tb) == set(jsonl)
    for key, value in jsonl.items():
        if math.isnan(value):
            assert math.isnan(tb[key]), key
        else:
            assert tb[key] == pytest.approx(value, rel=1e-6), key


class _FakeRun:
    def __init__(self, calls):
        self.calls, self.summary = calls, {}

    def log(self, data, step):
        self.calls.append(("log", step, dict(data)))

    def finish(self):
        self.calls.append(("finish", dict(self.summary)))


def _fake_wandb(calls):
    mod = types.ModuleType("wandb")
    mod.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls)

    mod.init = init
    return mod


def test_wandb_mirror_when_configured(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "logging.wandb_project=proj",
                             "logging.wandb_entity=team", "logging.tensorboard=false"])
    for _ in range(2):  # a resumed run continues the same W&B run id
        logger = RunLogger.for_config(cfg)
        logger.log(3, {"loss": 0.5, "skipped": 0, "note": "text is not a metric"})
        logger.summary({"eval_loss_after": 0.25})
        logger.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and all(i["id"] == "abc123" and i["resume"] == "allow" for i in inits)
    assert inits[0]["project"] == "proj" and inits[0]["entity"] == "team" and inits[0]["name"] == "run"
    assert inits[0]["config"]["logging"]["wandb_project"] == "proj"
    assert ("log", 3, {"loss": 0.5, "skipped": 0.0}) in calls
    assert ("finish", {"eval_loss_after": 0.25}) in calls
    assert (tmp_path / "run" / "wandb_id.txt").read_text().strip() == "abc123"


def test_wandb_off_or_missing_never_touches_it(tmp_path, monkeypatch, capsys):
    exploding = types.ModuleType("wandb")
    exploding.init = lambda **kw: (_ for _ in ()).throw(AssertionError("wandb used while off"))
    monkeypatch.setitem(sys.modules, "wandb", exploding)
    logger = RunLogger.for_config(load_config(None, [f"run_dir={tmp_path / 'a'}", "logging.tensorboard=false"]))
    logger.log(1, {"loss": 1.0})
    logger.close()
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed": import raises ImportError
    logger = RunLogger.for_config(load_config(None, [f"run_dir={tmp_path / 'b'}", "logging.tensorboard=false",
                                                     "logging.wandb_project=proj"]))
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert "wandb is not installed" in capsys.readouterr().err
    assert (tmp_path / "b" / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'


def test_url_run_dirs_keep_their_scheme_and_object_store_writes_rewrite(tmp_path, monkeypatch):
    """gs:// run directories: paths are not mangled (pathlib would make `gs:/b`), and on object
    stores (no append) metrics.jsonl is rewritten whole, keeping rows from before a resume."""
    from jaxrl_rm.train import logger as logger_mod

    assert str(logger_mod.run_path("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    monkeypatch.setattr(logger_mod, "is_remote", lambda path: True)  # a local dir through the URL code path
    for step in (1, 2):
        log = RunLogger(tmp_path / "r", tensorboard=False)
        log.log(step, {"loss": float(step)})
        log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_run_means_average_training_rows_of_a_prefix(tmp_path):
    from jaxrl_rm.train.logger import run_means

    rows = [{"step": 0, "reward/t/j/gold_agreement": 9.0},  # evaluation row: not a training step
            {"step": 5, "reward/t/j/gold_agreement": 0.5, "reward/t/j/judge_calls": 32, "loss": 1.0, "reward/x": "s"},
            {"step": 10, "reward/t/j/gold_agreement": 0.7, "reward/t/j/judge_calls": 32, "reward/t/flag": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = run_means(tmp_path, "reward/")
    assert means == pytest.approx({"run_mean/reward/t/j/gold_agreement": 0.6, "run_mean/reward/t/j/judge_calls": 32.0})
    rows[1]["reward/t/j/gold_gap"], rows[2]["reward/t/j/gold_gap"] = 0.25, -0.05
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = run_means(tmp_path, "reward/")  # the gold gap's worst logged step too
    assert means["run_mean/reward/t/j/gold_gap"] == pytest.approx(0.1)
    assert means["run_max/reward/t/j/gold_gap"] == pytest.approx(0.25) and "run_max/reward/t/j/judge_calls" not in means
    assert run_means(tmp_path / "missing", "reward/") == {}
