#!/usr/bin/env bash
# Cloud TPU VM / pod-slice lifecycle for jaxrl_rm: create, install, copy-data, run, logs, ssh,
# status, delete. Run it from your own machine (gcloud installed and authenticated).
#
#   launch/tpu_vm.sh create  --name rl --zone us-central2-b --accelerator-type v4-32 [--spot|--queued]
#   launch/tpu_vm.sh install --name rl --zone us-central2-b [--repo URL --ref main]
#   launch/tpu_vm.sh copy-data --name rl --zone us-central2-b ./data/train.jsonl [data/]
#   launch/tpu_vm.sh run     --name rl --zone us-central2-b -- --config configs/sft_tiny.yaml run_dir=gs://b/r
#   launch/tpu_vm.sh logs    --name rl --zone us-central2-b [--worker 0] [--follow]
#   launch/tpu_vm.sh delete  --name rl --zone us-central2-b [--queued]
#
# `--dry-run` (anywhere before `--`) prints every command, one per line and shell-quoted, instead
# of running it. Defaults come from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT,
# TPU_ACCELERATOR_TYPE, TPU_VERSION, JAXRL_RM_REPO, JAXRL_RM_REF.
#
# `run` starts `python -m jaxrl_rm.main ARGS distributed.initialize=true` on every worker at once
# (--worker=all) under nohup, output in --log on each worker; on a pod slice jax.distributed finds
# its peers from the TPU metadata. Use gs:// run directories on pod slices: every worker writes its
# shards of each checkpoint there (orbax / tensorstore), process 0 writes the metrics.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#/ { exit }' "$0"
  cat <<'EOF'

Options:
  --name NAME               TPU VM / slice name (env TPU_NAME)
  --zone ZONE               zone (env TPU_ZONE)
  --project PROJECT         GCP project (env TPU_PROJECT; default: gcloud's configured one)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 (create; env TPU_ACCELERATOR_TYPE)
  --version VERSION         TPU runtime (create; env TPU_VERSION; default chosen from the type)
  --spot                    create a Spot TPU
  --queued                  create / delete through a queued resource (same NAME)
  --repo URL --ref REF      install: clone URL at REF (default: copy this checkout, without .git/.venv/runs)
  --dir DIR                 checkout directory on the workers, relative to $HOME (default jaxrl_rm)
  --python-version V        python for the workers' venv, installed with uv (default 3.12)
  --extra-packages "P ..."  more pip packages for install (default: gcsfs google-cloud-storage, for gs:// run dirs)
  --log FILE                run/logs: log file on each worker, relative to --dir (default run.log)
  --worker W                logs/ssh: which worker (default 0; `all` for every one)
  --follow                  logs: keep streaming (tail -f)
  --dry-run                 print the commands instead of running them
EOF
}

DRY_RUN=0
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCEL="${TPU_ACCELERATOR_TYPE:-}"
VERSION="${TPU_VERSION:-}"
SPOT=0
QUEUED=0
REPO="${JAXRL_RM_REPO:-}"
REF="${JAXRL_RM_REF:-main}"
DIR="jaxrl_rm"
PYVER="3.12"
EXTRA_PACKAGES="gcsfs google-cloud-storage"
LOG="run.log"
WORKER="0"
FOLLOW=0
CMD=""
POSITIONAL=()
REST=()
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --accelerator-type) ACCEL="${2:?--accelerator-type needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --repo) REPO="${2:?--repo needs a value}"; shift ;;
    --ref) REF="${2:?--ref needs a value}"; shift ;;
    --dir) DIR="${2:?--dir needs a value}"; shift ;;
    --python-version) PYVER="${2:?--python-version needs a value}"; shift ;;
    --extra-packages) EXTRA_PACKAGES="${2?--extra-packages needs a value}"; shift ;;
    --log) LOG="${2:?--log needs a value}"; shift ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    --follow) FOLLOW=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; REST=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z "$CMD" ]]; then CMD="$1"; else POSITIONAL+=("$1"); fi ;;
  esac
  shift
done

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

# Shell-quote words into one string for a remote --command.
quote() {
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

need() { [[ -n "$2" ]] || die "$CMD needs $1"; }

default_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

common_flags() {
  FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then FLAGS+=("--project=$PROJECT"); fi
}

# gcloud compute tpus tpu-vm ssh NAME --worker=W --command=REMOTE
tpu_ssh() {
  local worker="$1" remote="$2"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${FLAGS[@]}" "--worker=$worker" "--command=$remote"
}

[[ -n "$CMD" ]] || { usage; exit 2; }
need "--name (or TPU_NAME)" "$NAME"
need "--zone (or TPU_ZONE)" "$ZONE"
common_flags
QDIR="$(quote "$DIR")"

case "$CMD" in
  create)
    need "--accelerator-type" "$ACCEL"
    VERSION="${VERSION:-$(default_version "$ACCEL")}"
    if ((QUEUED)); then
      args=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${FLAGS[@]}"
            "--accelerator-type=$ACCEL" "--runtime-version=$VERSION")
      if ((SPOT)); then args+=(--spot); fi
      run "${args[@]}"
      echo "# queued: wait for ACTIVE with: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
    else
      args=(gcloud compute tpus tpu-vm create "$NAME" "${FLAGS[@]}"
            "--accelerator-type=$ACCEL" "--version=$VERSION")
      if ((SPOT)); then args+=(--spot); fi
      run "${args[@]}"
    fi
    ;;

  install)
    # jax[tpu] brings libtpu from PyPI; uv provides a python >= 3.11 whatever the image ships.
    read -r -a extra <<<"$EXTRA_PACKAGES"
    setup="export PATH=\$HOME/.local/bin:\$PATH && (command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
    setup+=" && cd $QDIR"
    setup+=" && uv venv -q --allow-existing --python $(quote "$PYVER") .venv"
    setup+=" && uv pip install -q --python .venv/bin/python -e . $(quote "jax[tpu]" "${extra[@]}")"
    if [[ -n "$REPO" ]]; then
      fetch="(test -d $QDIR/.git || git clone -q $(quote "$REPO") $QDIR)"
      fetch+=" && git -C $QDIR fetch -q origin $(quote "$REF") && git -C $QDIR checkout -q --detach FETCH_HEAD"
      tpu_ssh all "set -e; $fetch && $setup"
    else
      tarball="${TMPDIR:-/tmp}/jaxrl_rm-src.tgz"
      run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs -C "$ROOT" .
      run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:jaxrl_rm-src.tgz" "${FLAGS[@]}" --worker=all
      tpu_ssh all "set -e; mkdir -p $QDIR && tar -xzf jaxrl_rm-src.tgz -C $QDIR && $setup"
    fi
    ;;

  copy-data)
    ((${#POSITIONAL[@]} >= 1)) || die "copy-data needs SOURCE [DEST] (local path or gs://...)"
    src="${POSITIONAL[0]}"
    dest="${POSITIONAL[1]:-data/}"
    if [[ "$src" == gs://* ]]; then  # every worker pulls from the bucket itself
      tpu_ssh all "mkdir -p $QDIR/$(quote "$dest") && gcloud storage cp -r $(quote "$src") $QDIR/$(quote "$dest")"
    else
      tpu_ssh all "mkdir -p $QDIR/$(quote "$dest")"
      run gcloud compute tpus tpu-vm scp --recurse "$src" "$NAME:$DIR/$dest" "${FLAGS[@]}" --worker=all
    fi
    ;;

  run)
    ((${#REST[@]} >= 1)) || die "run needs the training arguments after --, e.g. -- --config configs/sft_tiny.yaml"
    # distributed.initialize=true goes first, so an explicit override from the user still wins.
    py=(.venv/bin/python -m jaxrl_rm.main "${REST[@]}")
    if [[ " ${REST[*]} " != *" distributed.initialize="* ]]; then py+=(distributed.initialize=true); fi
    tpu_ssh all "cd $QDIR && (nohup $(quote "${py[@]}") > $(quote "$LOG") 2>&1 < /dev/null & echo \$! > run.pid)"
    echo "# started on all workers; follow with: $0 logs --name $NAME --zone $ZONE --follow" >&2
    ;;

  logs)
    if ((FOLLOW)); then tail_cmd="tail -n 100 -F"; else tail_cmd="tail -n 100"; fi
    tpu_ssh "$WORKER" "$tail_cmd $QDIR/$(quote "$LOG")"
    ;;

  ssh)
    if ((${#REST[@]})); then
      tpu_ssh "$WORKER" "cd $QDIR && $(quote "${REST[@]}")"
    else
      run gcloud compute tpus tpu-vm ssh "$NAME" "${FLAGS[@]}" "--worker=$WORKER"
    fi
    ;;

  stop)  # SIGTERM: the run finishes its step, writes a checkpoint and exits 0
    tpu_ssh all "cd $QDIR && kill -TERM \$(cat run.pid)"
    ;;

  status)
    if ((QUEUED)); then
      run gcloud compute tpus queued-resources describe "$NAME" "${FLAGS[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$NAME" "${FLAGS[@]}"
    fi
    ;;

  delete)
    if ((QUEUED)); then
      run gcloud compute tpus queued-resources delete "$NAME" "${FLAGS[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${FLAGS[@]}" --quiet
    fi
    ;;

  *) die "unknown subcommand '$CMD' (create | install | copy-data | run | logs | ssh | stop | status | delete)" ;;
esac
