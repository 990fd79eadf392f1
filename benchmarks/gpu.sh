#!/usr/bin/env bash
# The GPU benchmark set in one run: attention, the train step and the sampler.
#
#   bash benchmarks/gpu.sh [OUT_DIR [PART ...]]   # PART: attention, train_step, sampler
#
# Writes OUT_DIR/PART.jsonl (one JSON line per measurement) and OUT_DIR/PART.log (stderr),
# then prints a summary table. OUT_DIR defaults to bench_out, the parts to all three. Each
# command runs under `timeout $PART_TIMEOUT` (default 300 s) so that one slow compile cannot
# take the time of the rest; a failed command is reported and the script goes on.
# - attention: the reference shape (batch 16, 12 heads, 2L = 2048, head dim 64, L' = 16, bf16)
#   with pallas, cudnn and xla, then pallas at 8 warps with 64 x 64 and 128 x 64 tiles (4 warps
#   spill there: benchmarks/kernel_resources.py) and with 64 x 32 tiles;
# - train_step: the small model (configs/base.py) with dense, cudnn and pallas attention;
# - sampler: batch 1 and 64 at one token per NFE, and two parallel rules at batch 64, with
#   dense KV-cache attention and with the Pallas decode kernel (model.attention=pallas).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-bench_out}
shift $(($# > 0 ? 1 : 0))
parts=("$@")
((${#parts[@]})) || parts=(attention train_step sampler)
python=${PYTHON:-python3}
mkdir -p "$out"

run() {  # PART COMMAND...: appends COMMAND's JSON lines to OUT_DIR/PART.jsonl
  local part=$1 rc
  shift
  echo "== $part: $*" | tee -a "$out/$part.log" >&2
  timeout "${PART_TIMEOUT:-300}" "$python" "$@" >>"$out/$part.jsonl" 2>>"$out/$part.log"
  rc=$?
  if ((rc)); then
    echo "   failed (exit $rc); the end of $out/$part.log:" >&2
    tail -n 5 "$out/$part.log" >&2
  fi
}

for part in "${parts[@]}"; do
  case $part in
    attention)
      run attention benchmarks/attention.py --impls=pallas,cudnn,xla
      run attention benchmarks/attention.py --impls=pallas --num_warps=8
      run attention benchmarks/attention.py --impls=pallas --block_q=128 --block_k=64 --num_warps=8
      run attention benchmarks/attention.py --impls=pallas --block_q=64 --block_k=32 ;;
    train_step)
      for impl in dense cudnn pallas; do
        run train_step benchmarks/train_step.py --config.model.attention="$impl"
      done ;;
    sampler)
      for impl in dense pallas; do
        run sampler benchmarks/sampler.py --noflat_cost --parallel=threshold:0.9,topk:4 \
          --config.model.attention="$impl"
      done ;;
    *)
      echo "unknown part '$part' (attention, train_step, sampler)" >&2
      exit 2 ;;
  esac
done

"$python" - "$out" <<'EOF'
import json, pathlib, sys

COLUMNS = ("impl", "pass", "attention", "kind", "setting", "batch", "block_q", "block_k",
           "ms", "step_ms", "tokens_per_s", "ms_per_nfe", "nfes_per_token", "max_abs_err",
           "grad_rel_err", "mfu", "error")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
  for line in path.read_text().splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      cells = [f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
               for k in COLUMNS if record.get(k) is not None]
      device = record.get("device_kind") or record.get("device", {}).get("device_kind", "")
      print(path.stem, device, *cells)
EOF
