#!/usr/bin/env bash
#SBATCH --job-name=jaxrl_rm
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j.out
# Multi-node GPU runs of jaxrl_rm under SLURM: one JAX process per node, each driving all of its
# node's GPUs; jax.distributed.initialize gets its coordinator, process count and process id from
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which this script exports.
#
#   # from a login node: submit (sbatch re-runs this script as the batch step)
#   launch/slurm_gpu.sh submit --nodes 2 --gpus-per-node 8 --partition gpu -- --config configs/sft_tiny.yaml run_dir=/shared/runs/a
#   # or sbatch it yourself (the #SBATCH lines above are defaults)
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh -- --config configs/sft_tiny.yaml run_dir=/shared/runs/a
#   # inside an allocation (salloc / the batch step): srun one process per node
#   launch/slurm_gpu.sh launch -- --config configs/sft_tiny.yaml run_dir=/shared/runs/a
#
# The subcommand defaults to `launch` inside an allocation (SLURM_JOB_ID set), else `submit`.
# `--dry-run` prints every command, one per line and shell-quoted, instead of running it; the
# node list and task count then come from --nodelist / --num-processes when SLURM is absent.
# The run directory must be on a filesystem every node sees (checkpoints are written collectively).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#/ { exit }' "$0"
  cat <<'EOF'

Options:
  submit:  --nodes N (2)  --gpus-per-node G (8)  --time HH:MM:SS (04:00:00)  --partition P
           --account A  --job-name NAME (jaxrl_rm)  --output FILE (slurm-%j.out)
           --sbatch-arg ARG (repeatable: anything else for sbatch)
  launch:  --nodelist LIST (SLURM_JOB_NODELIST)  --num-processes N (SLURM_NTASKS)
           --port PORT (coordinator port on the first node; 12355)
  both:    --python PY (python; e.g. /shared/venv/bin/python)  --dry-run
EOF
}

DRY_RUN=0
CMD=""
NODES=2
GPUS=8
TIME="04:00:00"
PARTITION=""
ACCOUNT=""
JOB_NAME="jaxrl_rm"
OUTPUT="slurm-%j.out"
SBATCH_EXTRA=()
NODELIST="${SLURM_JOB_NODELIST:-}"
NUM_PROCESSES="${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-}}"
PORT="${JAX_COORDINATOR_PORT:-12355}"
PYTHON="${PYTHON:-python}"
ARGS=()

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    submit|launch) [[ -z "$CMD" ]] || die "two subcommands: $CMD and $1"; CMD="$1" ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES="${2:?--nodes needs a value}"; shift ;;
    --gpus-per-node) GPUS="${2:?--gpus-per-node needs a value}"; shift ;;
    --time) TIME="${2:?--time needs a value}"; shift ;;
    --partition) PARTITION="${2:?--partition needs a value}"; shift ;;
    --account) ACCOUNT="${2:?--account needs a value}"; shift ;;
    --job-name) JOB_NAME="${2:?--job-name needs a value}"; shift ;;
    --output) OUTPUT="${2:?--output needs a value}"; shift ;;
    --sbatch-arg) SBATCH_EXTRA+=("${2:?--sbatch-arg needs a value}"); shift ;;
    --nodelist) NODELIST="${2:?--nodelist needs a value}"; shift ;;
    --num-processes) NUM_PROCESSES="${2:?--num-processes needs a value}"; shift ;;
    --port) PORT="${2:?--port needs a value}"; shift ;;
    --python) PYTHON="${2:?--python needs a value}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
  shift
done
if [[ -z "$CMD" ]]; then
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then CMD=launch; else CMD=submit; fi
fi

# Print (dry run) or execute one command.
run() {
  if ((DRY_RUN)); then
    local line
    printf -v line '%q ' "$@"
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}

# First host of a SLURM node list ("gpu[03-04,07],cpu1" -> gpu03): scontrol when present, else
# the same rule by hand (so dry runs work off-cluster).
first_host() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | head -n 1
  elif [[ "$list" =~ ^([^,\[]+)\[([^],-]+) ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "${list%%,*}"
  fi
}

case "$CMD" in
  submit)
    self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    cmd=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1 "--gpus-per-node=$GPUS"
         "--time=$TIME" "--output=$OUTPUT")
    if [[ -n "$PARTITION" ]]; then cmd+=("--partition=$PARTITION"); fi
    if [[ -n "$ACCOUNT" ]]; then cmd+=("--account=$ACCOUNT"); fi
    cmd+=("${SBATCH_EXTRA[@]}" "$self" launch --port "$PORT" --python "$PYTHON" -- "${ARGS[@]}")
    run "${cmd[@]}"
    ;;

  launch)
    [[ -n "$NODELIST" ]] || die "launch needs a node list: run inside an allocation or pass --nodelist"
    [[ -n "$NUM_PROCESSES" ]] || die "launch needs the process count: run inside an allocation or pass --num-processes"
    ((${#ARGS[@]})) || die "launch needs the training arguments after --"
    coordinator="$(first_host "$NODELIST"):$PORT"
    # Every task sets its own process id from SLURM_PROCID (expanded by the task's shell, not here).
    # shellcheck disable=SC2016
    per_task='export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'
    run env "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$NUM_PROCESSES" \
      srun "--ntasks=$NUM_PROCESSES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      bash -c "$per_task" bash "$PYTHON" -m jaxrl_rm.main "${ARGS[@]}"
    ;;
esac
