#!/usr/bin/env bash
# Train bd3jax on a Cloud TPU VM slice: create it, install this checkout on every worker, run
# main.py on all workers at once, tear it down. See launch/README.md.
#
#   launch/tpu_vm.sh [OPTIONS] [STEP...] -- MAIN_PY_FLAGS...
#
# STEP: create | install | train | delete | all (default: all = create, install, train, delete;
# the slice is deleted even when training fails). Running `train` again resumes from --workdir.
#
# Options:
#   --name=NAME            TPU VM (and queued resource) name                        (required)
#   --zone=ZONE            e.g. us-east5-a                                          (required)
#   --accelerator=TYPE     e.g. v5p-32, v4-32, v5litepod-16                         (required)
#   --workdir=gs://...     checkpoints and TensorBoard events, shared by all hosts  (required)
#   --project=PROJECT      default: gcloud's configured project
#   --version=VERSION      TPU software version; default by family (v4, v5p, v5e, v6e)
#   --queued               create through a queued resource (waits for capacity)
#   --spot                 spot capacity (preemptible; the run resumes when re-launched)
#   --dry-run              print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

name="" zone="" accelerator="" workdir="" project="" version="" queued=0 spot=0 dry_run=0
steps=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    create|install|train|delete|all) steps+=("$1") ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (flags for main.py go after --)" ;;
  esac
  shift
done
main_flags=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(all)
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$accelerator" ]] || die "--accelerator is required (e.g. v5p-32)"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker can reach, got '$workdir'"
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default software version for '$accelerator'; pass --version" ;;
  esac
fi

gcloud_flags=(--zone="$zone")
[[ -z "$project" ]] || gcloud_flags+=(--project="$project")
tarball="/tmp/bd3jax-$name.tar.gz"
repo="$(cd "$(dirname "$0")/.." && pwd)"

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$repo/launch/common.sh"

create() {
  local spot_flag=()
  [[ $spot -eq 0 ]] || spot_flag=(--spot)
  if [[ $queued -eq 1 ]]; then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${spot_flag[@]}" "${gcloud_flags[@]}"
    echo "# waiting until the queued resource is ACTIVE"
    local state=""
    until [[ $dry_run -eq 1 || "$state" == ACTIVE ]]; do
      state="$(gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}" \
        --format='value(state.state)')"
      [[ "$state" != FAILED && "$state" != SUSPENDED ]] || die "queued resource $name is $state"
      [[ "$state" == ACTIVE ]] || sleep 30
    done
  else
    run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$accelerator" \
      --version="$version" "${spot_flag[@]}" "${gcloud_flags[@]}"
  fi
}

install() {  # the committed HEAD of this checkout, on every worker
  run git -C "$repo" archive --format=tar.gz --prefix=bd3jax/ -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:bd3jax.tar.gz" --worker=all "${gcloud_flags[@]}"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" --command="rm -rf bd3jax \
&& tar xzf bd3jax.tar.gz && python3 -m pip install -q -U \"jax[tpu]\" && python3 -m pip install -q -e bd3jax"
}

train() {  # every worker runs main.py; JAX's distributed runtime finds the others
  local remote
  remote="cd bd3jax && $(quote python3 main.py --distributed=on --workdir="$workdir" "${main_flags[@]}")"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" --command="$remote"
}

delete() {
  if [[ $queued -eq 1 ]]; then
    run gcloud compute tpus queued-resources delete "$name" --force --quiet "${gcloud_flags[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$name" --quiet "${gcloud_flags[@]}"
  fi
}

for step in "${steps[@]}"; do
  case "$step" in
    all)
      create
      trap delete EXIT   # tear down even if installing or training fails
      install
      train ;;
    *) "$step" ;;
  esac
done
