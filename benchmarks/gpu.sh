#!/usr/bin/env bash
# The GPU benchmark set in one run: a kernel check, attention, the train step and the sampler.
#
#   bash benchmarks/gpu.sh [OUT_DIR [PART ...]]   # PART: check, attention, train_step, sampler
#
# Writes OUT_DIR/PART.jsonl (one JSON line per measurement) and OUT_DIR/PART.log (stderr),
# then prints a summary table. OUT_DIR defaults to bench_out, the parts to all four. Each
# command runs under `timeout $PART_TIMEOUT` (default 300 s) so that one slow compile cannot
# take the time of the rest; a failed command is reported and the script goes on.
# - check: benchmarks/kernel_check.py, the compiled kernels against float32 dense references
#   (48 s on an H200, 2026-11-27);
# - attention: the reference shape (batch 16, 12 heads, 2L = 2048, head dim 64, L' = 16, bf16)
#   with pallas (the default tiles and a sweep of tiles, warps and stages), cudnn and xla, in
#   one process (37 s on an H200 for eight pallas settings and cudnn, 2026-11-27);
# - train_step: the small model (configs/base.py) with pallas and cudnn attention, train step
#   only (--noeval). XLA compiles slowly here: on an H200 (2026-11-27) the parameter init took
#   23 s and the train step 45 s with XLA's GEMM autotuning off, and with it on (the default)
#   init plus train step did not finish within 130 s, so allow minutes per command;
# - sampler: batch 1 and 64 at one token per NFE, and two parallel rules at batch 64, with
#   dense KV-cache attention and with the Pallas decode kernel (model.attention=pallas).
# With 15 minutes of device time, run `check attention train_step` and `sampler` as two calls.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-bench_out}
shift $(($# > 0 ? 1 : 0))
parts=("$@")
((${#parts[@]})) || parts=(check attention train_step sampler)
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
    check)
      run check benchmarks/kernel_check.py ;;
    attention)
      run attention benchmarks/attention.py --impls=pallas,cudnn,xla \
        --pallas=default,64x64:4:3,64x64:8,128x64:8,128x64:8:3,128x128:8,64x128:4,64x32:4 ;;
    train_step)
      for impl in pallas cudnn; do
        run train_step benchmarks/train_step.py --noeval --steps=10 --config.model.attention="$impl"
      done ;;
    sampler)
      for impl in dense pallas; do
        run sampler benchmarks/sampler.py --noflat_cost --parallel=threshold:0.9,topk:4 \
          --config.model.attention="$impl"
      done ;;
    *)
      echo "unknown part '$part' (check, attention, train_step, sampler)" >&2
      exit 2 ;;
  esac
done

"$python" - "$out" <<'EOF'
import json, pathlib, sys

COLUMNS = ("impl", "pass", "attention", "kind", "kernel", "mask", "length", "queries", "end",
           "dtype", "head_dim", "setting", "batch", "block_q", "block_k", "num_warps", "num_stages",
           "ms", "step_ms", "tokens_per_s", "ms_per_nfe", "nfes_per_token", "max_abs_err",
           "grad_rel_err", "ok", "failed", "mfu", "error")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
  for line in path.read_text().splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      cells = [f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
               for k in COLUMNS if record.get(k) is not None]
      device = record.get("device_kind") or record.get("device", {}).get("device_kind", "")
      print(path.stem, device, *cells)
EOF
