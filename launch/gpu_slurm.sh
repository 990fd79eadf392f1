#!/usr/bin/env bash
# Train bd3jax on GPU nodes with SLURM: one process per GPU, started by srun; JAX's distributed
# runtime reads the SLURM environment (coordinator = first node, process id, local GPU).
# See launch/README.md.
#
#   launch/gpu_slurm.sh [OPTIONS] -- MAIN_PY_FLAGS...
#
# Outside an allocation the script submits itself as a batch job (sbatch); inside one (salloc,
# or the batch job) it runs srun. bd3jax must be installed in --python's environment on a
# filesystem every node mounts.
#
# Options:
#   --workdir=DIR          checkpoints and TensorBoard events, on a shared filesystem (required)
#   --nodes=N              nodes (default 1)
#   --gpus-per-node=G      GPUs per node, one process each (default 8)
#   --partition=P          SLURM partition
#   --account=A            SLURM account
#   --time=T               time limit, e.g. 24:00:00
#   --python=PATH          Python with bd3jax installed (default: python3)
#   --dry-run              print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }

script_args=()   # this script's arguments for the batch job: the same, without --dry-run
for arg in "$@"; do [[ "$arg" == --dry-run ]] || script_args+=("$arg"); done
workdir="" nodes=1 gpus=8 partition="" account="" time_limit="" python=python3 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (flags for main.py go after --)" ;;
  esac
  shift
done
main_flags=("$@")
[[ -n "$workdir" ]] || die "--workdir is required (a directory every node can reach)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
repo="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$repo/main.py" ]] || repo="$PWD"   # a batch job runs a spool copy, from sbatch --chdir

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$repo/launch/common.sh"

if [[ -n "${SLURM_JOB_ID:-}" || $dry_run -eq 1 ]]; then
  [[ -n "${SLURM_JOB_ID:-}" ]] || echo "# inside the allocation the job runs:"
  # One task per GPU, every GPU visible to every task: JAX picks GPU SLURM_LOCALID. Each process
  # owns its GPU, so it may take 90% of the memory (JAX's default is 75%). Unless XLA_FLAGS is
  # set, XLA's matmuls go to cuBLAS instead of Triton GEMM fusions (launch/README.md).
  exports=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  [[ -n "${XLA_FLAGS:-}" ]] || exports+=,XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
  run srun --nodes="$nodes" --ntasks-per-node="$gpus" --kill-on-bad-exit=1 --chdir="$repo" \
    --export="$exports" "$python" main.py --distributed=on --workdir="$workdir" "${main_flags[@]}"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  [[ $dry_run -eq 0 ]] || echo "# submitted with:"
  sbatch_flags=(--job-name=bd3jax --nodes="$nodes" --ntasks-per-node="$gpus" --gpus-per-node="$gpus"
                --chdir="$repo" --output="bd3jax-%j.out")
  [[ -z "$partition" ]] || sbatch_flags+=(--partition="$partition")
  [[ -z "$account" ]] || sbatch_flags+=(--account="$account")
  [[ -z "$time_limit" ]] || sbatch_flags+=(--time="$time_limit")
  run sbatch "${sbatch_flags[@]}" "$0" "${script_args[@]}"
fi
