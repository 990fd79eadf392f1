"""Speed of the attention implementations under the BD3 training mask, forward and backward.

  python benchmarks/attention.py     # batch 16, 12 heads, 2L = 2048, head dim 64, L' 16, bf16
  python benchmarks/attention.py --impls=pallas,cudnn --pallas=default,128x64:8,128x64:8:3
  python benchmarks/attention.py --impls=pallas --pallas=64x64:4/128x32:4/32x128:8
  python benchmarks/attention.py --batch=1 --heads=2 --length=64 --impls=dense,xla,pallas \
      --steps=3 --warmup=1 --calls=1          # a CPU smoke run (pallas interpreted)
  python benchmarks/attention.py --packed --impls=pallas,cudnn  # as the train step calls them

Prints one JSON line per (implementation, pass). Conventions:
- inputs: q, k, v, dO ~ N(0, 1) in `--dtype`, shape [batch, 2L, heads, head_dim], one fixed
  draw already on device; the mask is `AttentionMask(TRAINING, L, L')`, i.e. the 2L x 2L
  training mask of x_t ⊕ x_0; every implementation goes through `bd3jax.model.attention`
  (`cudnn` and `xla` are `jax.nn.dot_product_attention` with the dense [2L, 2L] mask), except
  that `pallas` calls `block_sparse_attention` itself, once per entry of `--pallas`:
  `default` (the kernel's defaults) or BLOCK_QxBLOCK_K[:WARPS[:STAGES]], e.g. 128x64:8:3, for
  all three kernels, or three such settings FORWARD/DQ/DKV for the forward, dq and dk/dv
  kernels (`block_sparse.Launch`; for dk/dv, BLOCK_K is the program's key tile).
- "fwd" times `attention(q, k, v)`; "fwd_bwd" times the output and (dq, dk, dv) of
  sum(attention(q, k, v) * dO) through `jax.vjp`; both jitted, nothing donated.
- `--packed`: the train step's entry instead, `qkv_attention(qkv, cos, sin, mask, impl)` of
  one projection qkv [batch, 2L, 3, heads, head_dim] ~ N(0, 1), the rotary embedding of
  positions 0..L-1 twice (as the model's layers call it): "fwd" its output, "fwd_bwd" the output
  and d qkv. `pallas` then runs `block_sparse.packed_attention` (v read in place, d qkv written
  by the backward kernels), which takes the default launches only (`--pallas=default`); the
  others apply the rotary in XLA, then attend to q, k and v.
- timing (`benchmarks/common.time_calls`): the first call compiles (`compile_s`), `--warmup`
  calls in all before timing, then `--steps` samples of `--calls` back-to-back calls, each
  sample ended by `jax.block_until_ready`; `ms` is the median sample over `--calls` (so the
  host's dispatch overlaps the device's work, as in a training step), `min_ms` the fastest.
- max_abs_err: of the fwd output against `dense` run in float32 on the same values, checked
  after the fwd timing (bf16 rounding alone gives about 1e-2); grad_rel_err (fwd_bwd): the
  largest max|g - g_ref| / max|g_ref| over dq, dk and dv (d qkv with --packed) against the
  same float32 `dense`.
- tflops_per_s: FLOPs of the visible (query, key) pairs only, 4 * B * H * nnz * K for fwd
  (two matmuls), 3.5 times that for fwd_bwd (the backward's five matmuls), over `ms`.
- pallas records: the forward's block_q, block_k, num_warps, num_stages and tile_fraction (the
  share of its [2L/block_q, 2L/block_k] tiles that are computed); dq and dkv as Q x K:W:S.
- an implementation that fails (e.g. cudnn on CPU, splash off TPU) prints its error instead.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bd3jax.kernels import block_sparse, tiles  # noqa: E402
from bd3jax.masks import AttentionMask, MaskKind  # noqa: E402
from bd3jax.model.attention import IMPLEMENTATIONS, attention, qkv_attention  # noqa: E402
from bd3jax.model.transformer import positions_for  # noqa: E402
from bd3jax.rotary import rotary_cos_sin  # noqa: E402

_IMPLS = flags.DEFINE_list("impls", ["pallas", "cudnn", "xla"],
                           f"Implementations to time, among {IMPLEMENTATIONS}.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads.")
_LENGTH = flags.DEFINE_integer("length", 1024, "L; attention runs over 2L tokens.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 16, "L', the diffusion block size.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension K.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q, k, v dtype.")
_PALLAS = flags.DEFINE_list(
    "pallas", ["default"], "pallas settings to time: 'default', BLOCK_QxBLOCK_K[:WARPS[:STAGES]] "
    "for the three kernels, or FORWARD/DQ/DKV, each such a setting (warps default to "
    "default_num_warps, stages to NUM_STAGES).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed samples per measurement.")
_CALLS = flags.DEFINE_integer("calls", 10, "Back-to-back calls per timed sample.")
_WARMUP = flags.DEFINE_integer("warmup", 5,
                               "Untimed calls before timing, the compiling one included.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")
_PACKED = flags.DEFINE_bool("packed", False, "Time qkv_attention of one packed projection with "
                            "the rotary embedding, as the train step calls it.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_IMPLS.value) - set(IMPLEMENTATIONS))
  if unknown:
    raise app.UsageError(f"--impls {unknown} not among {IMPLEMENTATIONS}")
  settings = {text: pallas_setting(text) for text in _PALLAS.value}
  if _PACKED.value and "pallas" in _IMPLS.value and set(settings) != {"default"}:
    raise app.UsageError("--packed times pallas with its default launches only: "
                         "give --pallas=default")
  mask = AttentionMask(MaskKind.TRAINING, _LENGTH.value, _BLOCK_SIZE.value)
  t, heads, head_dim = mask.num_tokens, _HEADS.value, _HEAD_DIM.value
  qkv_shape = (_BATCH.value, t, heads, head_dim)
  keys = jax.random.split(jax.random.key(_SEED.value), 4)
  if _PACKED.value:
    inputs = [jax.random.normal(keys[0], (_BATCH.value, t, 3, heads, head_dim))]
    rope = rotary_cos_sin(positions_for(mask), head_dim)
  else:
    inputs, rope = [jax.random.normal(key, qkv_shape) for key in keys[:3]], None
  inputs = [x.astype(_DTYPE.value) for x in inputs]
  do = jax.random.normal(keys[3], qkv_shape).astype(_DTYPE.value)
  reference = jax.jit(functools.partial(common.value_and_grads, _entry("dense", {}, mask, rope)))(
      *(x.astype(jnp.float32) for x in (*inputs, do)))
  fwd_flops = 4 * _BATCH.value * heads * int(mask.dense().sum()) * head_dim
  shared = {"benchmark": "attention", "batch": _BATCH.value, "heads": heads,
            "tokens": t, "head_dim": head_dim, "block_size": _BLOCK_SIZE.value,
            "packed": _PACKED.value,
            "dtype": _DTYPE.value, "mask_density": float(mask.dense().mean()),
            **common.device_summary(), "steps": _STEPS.value, "warmup": _WARMUP.value}

  runs = [(impl, text) for impl in _IMPLS.value
          for text in (settings if impl == "pallas" else [None])]
  for impl, text in runs:
    record = {**shared, "impl": impl, **({"setting": text} if text else {})}
    try:
      setting = settings.get(text, {})
      if impl == "pallas":
        shapes = [jax.ShapeDtypeStruct(qkv_shape, _DTYPE.value)] * 3
        record.update(_pallas_record(block_sparse.kernel_config(*shapes, mask, **setting)))
      _measure(_entry(impl, setting, mask, rope), inputs, do, reference, fwd_flops, record)
    except Exception as e:  # report and go on with the next implementation
      common.emit({**record, "error": common.error_text(e)})


def pallas_setting(text: str) -> dict:
  """`block_sparse_attention` keyword arguments from a --pallas entry: {} for 'default', else
  the forward's block_q, block_k, num_warps, num_stages and, for FORWARD/DQ/DKV, dq and dkv."""
  if text == "default":
    return {}
  launches = [launch(part, text) for part in text.split("/")]
  if len(launches) not in (1, 3):
    raise app.UsageError(f"--pallas entry {text!r} has {len(launches)} settings, not 1 or 3")
  forward = launches[0]
  setting = {"block_q": forward.block_q, "block_k": forward.block_k,
             "num_warps": forward.num_warps, "num_stages": forward.num_stages}
  if len(launches) == 3:
    setting.update(dq=launches[1], dkv=launches[2])
  return setting


def launch(part: str, text: str) -> block_sparse.Launch:
  """A `Launch` from 'QxK[:W[:S]]' (`text`: the whole --pallas entry, for errors)."""
  try:
    tile, *rest = part.split(":")
    block_q, block_k = (int(n) for n in tile.split("x"))
    numbers = [int(n) for n in rest]
  except ValueError:
    raise app.UsageError(f"--pallas entry {text!r}: {part!r} is not "
                         "BLOCK_QxBLOCK_K[:WARPS[:STAGES]]") from None
  if len(numbers) > 2:
    raise app.UsageError(f"--pallas entry {text!r}: {part!r} has more than warps and stages")
  return block_sparse.Launch(block_q, block_k, *numbers)


def _entry(impl: str, setting: dict, mask: AttentionMask, rope):
  """The function timed: attention of (q, k, v) (`pallas`: `block_sparse_attention` with
  `setting`), or with `rope` = (cos, sin), `qkv_attention` of the packed projection."""
  if rope is not None:
    return lambda qkv: qkv_attention(qkv, *rope, mask, impl)
  if impl == "pallas":
    return lambda q, k, v: block_sparse.block_sparse_attention(q, k, v, mask, **setting)
  return lambda q, k, v: attention(q, k, v, mask, impl)


def _pallas_record(cfg: block_sparse.KernelConfig) -> dict:
  """The launches of `cfg` and the share of the forward's tiles that it computes."""
  f = cfg.forward
  rows, _ = tiles.kernel_tiles(cfg.mask, cfg.num_tokens, f.block_q, f.block_k)
  n_tiles = (cfg.num_tokens // f.block_q) * (cfg.num_tokens // f.block_k)
  return {"block_q": f.block_q, "block_k": f.block_k, "num_warps": f.num_warps,
          "num_stages": f.num_stages, "tile_fraction": float(rows.counts_N2.sum() / n_tiles),
          **{name: f"{b.block_q}x{b.block_k}:{b.num_warps}:{b.num_stages}"
             for name, b in (("dq", cfg.dq), ("dkv", cfg.dkv))}}


def _measure(attend, inputs, do, reference, fwd_flops, record):
  fwd, fwd_bwd = jax.jit(attend), jax.jit(functools.partial(common.value_and_grads, attend))
  o_ref, grads_ref = reference
  errors = {}
  for name, fn, args, flops in (("fwd", fwd, inputs, fwd_flops),
                                ("fwd_bwd", fwd_bwd, (*inputs, do), 3.5 * fwd_flops)):
    compile_s, times = common.time_calls(fn, *args, warmup=_WARMUP.value, steps=_STEPS.value,
                                         calls=_CALLS.value)
    if name == "fwd":
      errors["max_abs_err"] = float(jnp.abs(fwd(*inputs).astype(jnp.float32) - o_ref).max())
    else:
      errors["grad_rel_err"] = max(
          float(jnp.abs(g.astype(jnp.float32) - g_ref).max() / jnp.abs(g_ref).max())
          for g, g_ref in zip(fwd_bwd(*inputs, do)[1], grads_ref))
    seconds = common.median(times)
    common.emit({**record, "pass": name, "ms": 1e3 * seconds, "min_ms": 1e3 * min(times),
                 "compile_s": compile_s, "tflops_per_s": flops / seconds / 1e12, **errors})


if __name__ == "__main__":
  app.run(main)
