"""launch/ scripts: exact `--dry-run` commands, remote command strings that survive the remote
shell, the SLURM per-task environment, and shellcheck on every script."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm_gpu.sh"
SCRUB = ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "TPU_ACCELERATOR_TYPE", "TPU_VERSION", "JAXRL_RM_REPO",
         "JAXRL_RM_REF", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES",
         "JAX_COORDINATOR_PORT", "PYTHON")


def sh(script: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    full_env.update(env or {})
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def dry(script: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a --dry-run prints, each parsed back into its argv."""
    out = sh(script, "--dry-run", *args, env=env)
    return [shlex.split(line) for line in out.stdout.splitlines()]


TPU_ARGS = ("--name", "rl", "--zone", "us-central2-b")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rl", "--zone=us-central2-b"]
SETUP = ("export PATH=$HOME/.local/bin:$PATH && (command -v uv >/dev/null || curl -LsSf "
         "https://astral.sh/uv/install.sh | sh) && cd jaxrl_rm && uv venv -q --allow-existing --python 3.12 .venv"
         " && uv pip install -q --python .venv/bin/python -e . jax\\[tpu\\] gcsfs google-cloud-storage")


# --- TPU VM ----------------------------------------------------------------------------------
def test_tpu_create_plain_spot_and_queued():
    assert dry(TPU, "create", *TPU_ARGS, "--accelerator-type", "v4-32") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "rl", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base"]]
    assert dry(TPU, "create", *TPU_ARGS, "--accelerator-type", "v6e-8", "--spot", "--project", "p1") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "rl", "--zone=us-central2-b", "--project=p1",
         "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"]]
    assert dry(TPU, "--queued", "--spot", "create", *TPU_ARGS, "--accelerator-type", "v5litepod-16",
               "--version", "custom-rt") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rl", "--node-id=rl", "--zone=us-central2-b",
         "--accelerator-type=v5litepod-16", "--runtime-version=custom-rt", "--spot"]]


def test_tpu_install_from_this_checkout(tmp_path):
    cmds = dry(TPU, "install", *TPU_ARGS, env={"TMPDIR": str(tmp_path)})
    tarball = f"{tmp_path}/jaxrl_rm-src.tgz"
    assert cmds == [
        ["tar", "-czf", tarball, "--exclude=./.git", "--exclude=./.venv", "--exclude=./runs", "-C", str(REPO), "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "rl:jaxrl_rm-src.tgz", "--zone=us-central2-b",
         "--worker=all"],
        SSH + ["--worker=all", "--command=set -e; mkdir -p jaxrl_rm && tar -xzf jaxrl_rm-src.tgz -C jaxrl_rm && "
               + SETUP],
    ]


def test_tpu_install_from_git_and_env_defaults():
    env = {"TPU_NAME": "rl", "TPU_ZONE": "us-central2-b", "JAXRL_RM_REPO": "https://example.com/me/jaxrl_rm.git"}
    cmds = dry(TPU, "install", "--ref", "v0.1", "--extra-packages", "", env=env)
    setup = SETUP.replace(" gcsfs google-cloud-storage", "")
    assert cmds == [SSH + ["--worker=all", "--command=set -e; (test -d jaxrl_rm/.git || git clone -q "
                           "https://example.com/me/jaxrl_rm.git jaxrl_rm) && git -C jaxrl_rm fetch -q origin v0.1 && "
                           "git -C jaxrl_rm checkout -q --detach FETCH_HEAD && " + setup]]


def test_tpu_copy_data_local_and_bucket():
    assert dry(TPU, "copy-data", *TPU_ARGS, "./my data/train.jsonl") == [
        SSH + ["--worker=all", "--command=mkdir -p jaxrl_rm/data/"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "./my data/train.jsonl", "rl:jaxrl_rm/data/",
         "--zone=us-central2-b", "--worker=all"]]
    assert dry(TPU, "copy-data", *TPU_ARGS, "gs://bucket/sets", "inputs/") == [
        SSH + ["--worker=all", "--command=mkdir -p jaxrl_rm/inputs/ && gcloud storage cp -r gs://bucket/sets "
               "jaxrl_rm/inputs/"]]


def test_tpu_run_logs_stop_status_delete():
    train = ["--config", "configs/sft_tiny.yaml", "run_dir=gs://bucket/runs/a", "data.train=data/my file.jsonl"]
    (run,) = dry(TPU, "run", *TPU_ARGS, "--", *train)
    assert run == SSH + ["--worker=all", "--command=cd jaxrl_rm && (nohup .venv/bin/python -m jaxrl_rm.main --config "
                         "configs/sft_tiny.yaml run_dir=gs://bucket/runs/a data.train=data/my\\ file.jsonl "
                         "distributed.initialize=true > run.log 2>&1 < /dev/null & echo $! > run.pid)"]
    # An explicit distributed.initialize from the user is kept, not overridden.
    (run,) = dry(TPU, "run", *TPU_ARGS, "--", "distributed.initialize=false")
    assert run[-1].count("distributed.initialize") == 1 and "distributed.initialize=false" in run[-1]
    assert dry(TPU, "logs", *TPU_ARGS, "--follow") == [
        SSH + ["--worker=0", "--command=tail -n 100 -F jaxrl_rm/run.log"]]
    assert dry(TPU, "logs", *TPU_ARGS, "--worker", "all", "--log", "b.log") == [
        SSH + ["--worker=all", "--command=tail -n 100 jaxrl_rm/b.log"]]
    assert dry(TPU, "stop", *TPU_ARGS) == [SSH + ["--worker=all", "--command=cd jaxrl_rm && kill -TERM $(cat run.pid)"]]
    assert dry(TPU, "status", *TPU_ARGS) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "rl", "--zone=us-central2-b"]]
    assert dry(TPU, "delete", *TPU_ARGS) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rl", "--zone=us-central2-b", "--quiet"]]
    assert dry(TPU, "delete", *TPU_ARGS, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "rl", "--zone=us-central2-b", "--force", "--quiet"]]


def test_tpu_remote_run_command_survives_the_remote_shell(tmp_path):
    """Execute the exact --command string `run` sends, in a fake worker home: the python it starts
    receives the training arguments word for word, in the background, logging to run.log."""
    train = ["--config", "configs/x.yaml", "data.train=data/my file.jsonl", "name=it's", "x=$HOME;rm"]
    (run,) = dry(TPU, "run", *TPU_ARGS, "--", *train)
    remote = run[-1].removeprefix("--command=")
    venv = tmp_path / "jaxrl_rm" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > argv.txt\necho started\n')
    (venv / "python").chmod(0o755)
    subprocess.run(["bash", "-c", remote], cwd=tmp_path, check=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    work = tmp_path / "jaxrl_rm"
    for _ in range(200):  # the job runs in the background
        if (work / "argv.txt").exists() and (work / "run.log").read_text():
            break
        time.sleep(0.05)
    assert (work / "argv.txt").read_text().splitlines() == ["-m", "jaxrl_rm.main", *train,
                                                             "distributed.initialize=true"]
    assert (work / "run.log").read_text() == "started\n" and (work / "run.pid").read_text().strip().isdigit()


def test_tpu_errors_are_clear():
    out = sh(TPU, "--dry-run", "create", "--zone", "z", check=False)
    assert out.returncode == 2 and "--name" in out.stderr
    out = sh(TPU, "--dry-run", "create", *TPU_ARGS, check=False)
    assert out.returncode == 2 and "--accelerator-type" in out.stderr
    out = sh(TPU, "--dry-run", "explode", *TPU_ARGS, check=False)
    assert out.returncode == 2 and "unknown subcommand" in out.stderr
    out = sh(TPU, "--dry-run", "run", *TPU_ARGS, check=False)
    assert out.returncode == 2 and "after --" in out.stderr
    assert "create" in sh(TPU, "--help").stdout


# --- SLURM -----------------------------------------------------------------------------------
def test_slurm_submit_dry_run():
    train = ["--config", "configs/sft_tiny.yaml", "run_dir=/shared/runs/a b"]
    assert dry(SLURM, "submit", "--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--account", "ml",
               "--sbatch-arg", "--exclusive", "--python", "/shared/venv/bin/python", "--", *train) == [
        ["sbatch", "--job-name=jaxrl_rm", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4",
         "--time=04:00:00", "--output=slurm-%j.out", "--partition=gpu", "--account=ml", "--exclusive",
         str(SLURM), "launch", "--port", "12355", "--python", "/shared/venv/bin/python", "--", *train]]
    # outside an allocation the default subcommand is submit
    assert dry(SLURM, "--", "x=1")[0][0] == "sbatch"


def _launch(nodes: str, n: int, *extra: str, port: str = "12355") -> list[str]:
    return ["env", f"JAX_COORDINATOR_ADDRESS={nodes}:{port}", f"JAX_NUM_PROCESSES={n}", "srun", f"--ntasks={n}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c",
            'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"', "bash", *extra]


@pytest.mark.parametrize("nodelist,first", [("gpu[03-04,07],cpu1", "gpu03"), ("node7,node8", "node7"),
                                            ("a-b[12]", "a-b12"), ("solo", "solo")])
def test_slurm_launch_dry_run_from_flags(nodelist, first, monkeypatch):
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol would expand the made-up node list")
    cmds = dry(SLURM, "launch", "--nodelist", nodelist, "--num-processes", "3", "--port", "2222", "--",
               "--config", "configs/sft_tiny.yaml")
    assert cmds == [_launch(first, 3, "python", "-m", "jaxrl_rm.main", "--config", "configs/sft_tiny.yaml",
                            port="2222")]


def test_slurm_launch_inside_allocation_uses_slurm_env():
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol would expand the made-up node list")
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[11-12]", "SLURM_NTASKS": "2", "PYTHON": "py3"}
    assert dry(SLURM, "--", "run_dir=/r", env=env) == [_launch("gpu11", 2, "py3", "-m", "jaxrl_rm.main", "run_dir=/r")]


def test_slurm_tasks_get_their_process_ids(tmp_path):
    """Run the launch for real with a fake `srun` (runs the command once per task with
    SLURM_PROCID set) and a fake python that records what jax.distributed would read."""
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol would expand the made-up node list")
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\nn=1\nwhile [[ $1 == --* ]]; do\n'
                                   '  [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}\n  shift\ndone\n'
                                   'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@"; done\n')
    (tmp_path / "fakepy").write_text('#!/usr/bin/env bash\n'
                                     'echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $*"\n')
    for f in ("srun", "fakepy"):
        (tmp_path / f).chmod(0o755)
    out = sh(SLURM, "launch", "--nodelist", "n[1-2]", "--num-processes", "2", "--python", "fakepy", "--",
             "run_dir=/shared/a b", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.stdout.splitlines() == ["0 2 n1:12355 -m jaxrl_rm.main run_dir=/shared/a b",
                                       "1 2 n1:12355 -m jaxrl_rm.main run_dir=/shared/a b"]


def test_slurm_errors_are_clear():
    out = sh(SLURM, "--dry-run", "launch", "--", "x=1", check=False)
    assert out.returncode == 2 and "--nodelist" in out.stderr
    out = sh(SLURM, "--dry-run", "launch", "--nodelist", "n1", "--num-processes", "1", check=False)
    assert out.returncode == 2 and "after --" in out.stderr
    out = sh(SLURM, "--dry-run", "--bogus", check=False)
    assert out.returncode == 2 and "unknown argument" in out.stderr


# --- lint ------------------------------------------------------------------------------------
def test_shellcheck_passes_on_every_script():
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) >= 2
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("shellcheck is not installed but CI is set (apt-get install -y shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck); CI runs it")
    out = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
