#!/usr/bin/env bash
# The GPU benchmark set in one run: a kernel check, attention, the train step and the sampler.
#
#   bash benchmarks/gpu.sh [OUT_DIR [PART ...]]   # PART: check, attention, train_step, sampler
#   bash benchmarks/gpu.sh out train_step:pallas sampler:pallas,dense   # PART:IMPLS
#
# Writes OUT_DIR/PART.jsonl (one JSON line per measurement) and OUT_DIR/PART.log (stderr),
# then prints a summary table. OUT_DIR defaults to bench_out, the parts to all four. Each
# command runs under `timeout $PART_TIMEOUT` (default 300 s) so that one slow compile cannot
# take the time of the rest; a failed command is reported and the script goes on.
# - check: benchmarks/kernel_check.py, the compiled kernels against float32 dense references
#   (48 s on an H200, 2026-11-27, before the LayerNorm cases);
# - attention: the reference shape (batch 16, 12 heads, 2L = 2048, head dim 64, L' = 16, bf16)
#   with pallas (the default tiles, then other tiles for the backward kernels: FORWARD/DQ/DKV),
#   cudnn and xla, in one process (an earlier sweep of eight pallas settings and cudnn took
#   37 s on an H200, 2026-11-27); then pallas and cudnn as the train step calls them (--packed:
#   the packed projection and the rotary embedding in, d qkv out);
# - train_step: the small model (configs/base.py), train step only (--noeval), with pallas
#   attention and the fused residual LayerNorm kernel (model.layer_norm=pallas), then pallas
#   attention and XLA's LayerNorm, then cudnn attention and XLA's LayerNorm. XLA compiles
#   slowly here: on an H200 (2026-11-27) the pallas attention command (XLA's LayerNorm) took
#   136 s in all (the train step's compile 106 s) with XLA's default flags, 89 s (53 s) with
#   XLA_FLAGS=--xla_gpu_enable_triton_gemm=false as launch/gpu_slurm.sh sets it;
# - sampler: batch 1 and 64 at one token per NFE, with the nucleus search settling 1 and then
#   4 bits per pass over the vocabulary (30 or 8 dependent passes per NFE), and two parallel
#   rules at batch 64, with the Pallas decode kernel (model.attention=pallas), then dense
#   KV-cache attention. Each compile takes 10-60 s on an H200: the pallas command had not
#   reached its parallel rules after 220 s (2026-11-27), so give it PART_TIMEOUT=600.
# XLA_FLAGS and other settings in the environment apply to every command.
# train_step:IMPLS and sampler:IMPLS run only the listed attention implementations (comma-
# separated), in that order; for train_step each may be ATTENTION/LAYER_NORM (e.g. pallas/xla;
# the LayerNorm defaults to xla).
# The train_step and sampler commands also trace a short run (two train steps; eight blocks
# of samples at each batch) into a scratch directory and print the GPU time per op and per
# stream, and how busy each stream was (benchmarks/trace_summary.py); for the train step also
# the time per part of the step (layers, dropout, loss, optimizer, ... forward and backward)
# and the busiest events of the two busiest host threads (dispatch, CUDA API calls).
# Parts run in the order given; every measurement is written as soon as it is made, so a run
# cut short keeps what it finished. Compiles dominate the train_step and sampler parts; the
# commands share a compilation cache, so compile_s after the first command may be a cache hit.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-bench_out}
shift $(($# > 0 ? 1 : 0))
parts=("$@")
((${#parts[@]})) || parts=(check attention train_step sampler)
python=${PYTHON:-python3}
mkdir -p "$out"
traces=$(mktemp -d)
trap 'rm -rf "$traces"' EXIT
# One compilation cache for all commands: with it JAX also keeps XLA's GEMM autotuning results
# (jax_persistent_cache_enable_xla_caches), so a later command does not autotune again the
# fusions an earlier command of this run tuned (e.g. cudnn's train step after pallas's).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$traces/compilation_cache}

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

for spec in "${parts[@]}"; do
  part=${spec%%:*}
  impls=()
  [[ $spec == *:* ]] && IFS=, read -ra impls <<<"${spec#*:}"
  case $part in
    check)
      run check benchmarks/kernel_check.py ;;
    attention)
      settings=default,64x64:4/128x32:4/32x128:8,64x64:4/128x32:8/32x128:8
      settings+=,64x64:4/64x64:4/32x128:8,64x64:4/128x32:4/64x64:4,64x64:4/64x32:4/32x64:4
      run attention benchmarks/attention.py --impls=pallas,cudnn,xla --pallas="$settings"
      run attention benchmarks/attention.py --packed --impls=pallas,cudnn ;;
    train_step)
      ((${#impls[@]})) || impls=(pallas/pallas pallas/xla cudnn/xla)
      for impl in "${impls[@]}"; do
        attention=${impl%%/*} layer_norm=xla
        [[ $impl == */* ]] && layer_norm=${impl#*/}
        run train_step benchmarks/train_step.py --noeval --steps=10 \
          --config.model.attention="$attention" --config.model.layer_norm="$layer_norm" \
          --profile_dir="$traces/train_step_${attention}_$layer_norm"
      done ;;
    sampler)
      ((${#impls[@]})) || impls=(pallas dense)
      for impl in "${impls[@]}"; do
        run sampler benchmarks/sampler.py --noflat_cost --nucleus_bits=1,4 \
          --parallel=threshold:0.9,topk:4 \
          --config.model.attention="$impl" --profile_dir="$traces/sampler_$impl"
      done ;;
    *)
      echo "unknown part '$part' (check, attention, train_step, sampler)" >&2
      exit 2 ;;
  esac
done

"$python" - "$out" <<'EOF'
import json, pathlib, sys

COLUMNS = ("impl", "pass", "packed", "attention", "layer_norm", "kind", "kernel", "mask", "length",
           "queries", "end", "dtype", "head_dim", "setting", "batch", "nucleus_bits", "block_q",
           "block_k", "num_warps", "num_stages", "ms", "step_ms", "tokens_per_s",
           "pipelined_step_ms", "pipelined_tokens_per_s", "dispatch_ms", "host_ms", "ms_per_nfe",
           "nfes_per_token", "max_abs_err", "grad_rel_err", "ok", "failed", "mfu", "error")


def cells(record, keys):
  """'key=value' for each of `keys` the record holds (floats to 4 significant digits)."""
  return [f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
          for k in keys if record.get(k) is not None]


def print_profile(name, record):
  """The busiest GPU streams of a traced run (else device or host timelines): time by kind of
  op and by source (where recorded), then the top ops."""
  device = [t for t in record["timelines"] if t["plane"].startswith("/device:")]
  timelines = ([t for t in device if t["line"].startswith("Stream")] or device or
               record["timelines"])
  what = " ".join(cells(record, ("attention", "layer_norm", "batch", "nucleus_bits",
                                 "ms_per_nfe", "wall_ms_per_step")))
  for t in sorted(timelines, key=lambda t: -t["busy_ms"])[:2]:
    print(f"{name} profile {what} {t['line']}: busy {t['busy_ms']:.1f} of {t['span_ms']:.1f} ms")
    print("  by kind:", ", ".join(f"{k['kind']} {k['total_ms']:.2f} ms ({k['count']}x)"
                                  for k in t["kinds"][:14]))
    if "sources" in t:
      print("  by source:", ", ".join(f"{k['source']} {k['total_ms']:.2f} ms ({k['count']}x)"
                                      for k in t["sources"][:24]))
    for op in t["top"][:8]:
      print(f"    {op['total_ms']:9.2f} ms {op['count']:6d}x {op['mean_us']:9.1f} us  {op['op']}"
            f"{' (' + op['kernel'] + ')' if 'kernel' in op else ''}")
  for t in record.get("host_threads", [])[:2]:
    print(f"{name} host {t['line']}: busy {t['busy_ms']:.1f} of {t['span_ms']:.1f} ms")
    for e in t["top"][:10]:
      print(f"    {e['total_ms']:9.2f} ms {e['count']:6d}x {e['mean_us']:9.1f} us"
            f"  {e['name'][:80]}")

for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
  for line in path.read_text().splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      if "timelines" in record:
        print_profile(path.stem, record)
        continue
      device = record.get("device_kind") or record.get("device", {}).get("device_kind", "")
      print(path.stem, device, *cells(record, COLUMNS))
EOF
