"""Config system: YAML + extends + overrides, and errors that name the key or the file."""

import subprocess
import sys

import pytest

from jaxrl_rm.config import Config, load_config
from jaxrl_rm.configlib import ConfigError
from jaxrl_rm.main import main

from conftest import REPO


def test_defaults_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim: {learning_rate: 0.5, warmup_steps: 3}\ntrain: {steps: 7}\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\noptim: {learning_rate: 1e-4}\n")
    cfg = load_config(top, ["train.batch_size=8", "run_dir=/tmp/r", "mesh.tensor=2", "model.dtype=bfloat16"])
    assert isinstance(cfg, Config)
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.warmup_steps == 3  # merged with the base
    assert cfg.train.steps == 7 and cfg.train.batch_size == 8
    assert cfg.run_dir == "/tmp/r" and cfg.mesh.tensor == 2 and cfg.model.dtype == "bfloat16"


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, needle", [
    (["optim.lr=3"], "unknown config key 'optim.lr'; valid keys under 'optim': b1, b2, end_lr_fraction"),
    (["nonsense=1"], "unknown config key 'nonsense'; valid keys at the top level:"),
    (["train.steps=ten"], "train.steps: expected int, got 'ten'"),
    (["optim.learning_rate=fast"], "optim.learning_rate: expected float"),
    (["logging.tensorboard=maybe"], "logging.tensorboard: expected bool"),
    (["data.on_bad_row=ignore"], "data.on_bad_row: expected one of ['error', 'skip']"),
    (["train.micro_batches=3"], "train.micro_batches: must be > 0 and divide train.batch_size=32"),
    (["optim.learning_rate=-1"], "optim.learning_rate: must be > 0"),
    (["grpo.kl_clamp=-1"], "grpo.kl_clamp: must be >= 0 (0: off)"),
    (["warmup.warmup_steps=-1"], "warmup.warmup_steps: must be >= 0"),
    (["warmup.schedule=step"], "warmup.schedule: expected one of ['constant', 'cosine', 'linear']"),
    (["train"], "is not of the form key=value"),
    (["train.steps.x=1"], "train.steps: expected int, got {'x': 1}"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        load_config(bad)
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_cli_exit_codes_and_help(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["optim.lr=1"]) == 2
    assert "unknown config key 'optim.lr'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "jaxrl_rm.main", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0
    assert "optim.learning_rate (float) = 0.001" in out.stdout and "--config" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxrl_rm.main", "train.stepz=3"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "train.stepz" in bad.stderr


def test_the_sft_warmup_runs_its_own_schedule(tmp_path, monkeypatch):
    """`warmup.*` sets the warm-up SFT's lr, schedule and lr warm-up; the rest is the RL's `optim`."""
    import jaxrl_rm.train.sft as sft
    from jaxrl_rm.train.grpo import warm_start

    seen = {}

    def fake_run_sft(cfg):
        seen["cfg"] = cfg
        return {"preempted": False}

    monkeypatch.setattr(sft, "run_sft", fake_run_sft)
    cfg = load_config(REPO / "configs" / "rlvr_tiny.yaml", [f"run_dir={tmp_path}", "warmup.warmup_steps=7"])
    out = warm_start(cfg)
    sft_cfg = seen["cfg"]
    assert (sft_cfg.task, sft_cfg.train.steps, sft_cfg.train.batch_size) == ("sft", 120, 32)
    assert (sft_cfg.optim.learning_rate, sft_cfg.optim.schedule, sft_cfg.optim.warmup_steps) == (3e-3, "cosine", 7)
    assert sft_cfg.optim.b2 == cfg.optim.b2 == 0.99 and cfg.optim.schedule == "constant"
    assert out.model.path == str(tmp_path / "sft_warmup" / "hf")
