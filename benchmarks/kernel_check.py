"""The Pallas kernels against float32 dense references, on this backend, on fresh random inputs.

  python benchmarks/kernel_check.py            # on GPU: the Triton builds (48 s on an H200)
  python benchmarks/kernel_check.py --small    # at most 256 tokens (2-core CPU, interpreted: 27 s)

The tests check the kernels interpreted on CPU; this checks the compiled builds where they run.
Cases: `block_sparse_attention` (output and dq, dk, dv of sum(o * dO)) under the training and
the block-causal masks, L' = 1, 4, 16 and L, float32 and bfloat16, head dim 64 and 128; the
decode kernel `cache_attention` with the cache partly filled, exactly full and wrapped around, T
= 1 to 64 queries; `block_sparse.packed_attention` (output and d qkv) of a packed [B, T, 3, H,
K] projection, all queries or the first L; the fused residual LayerNorm
`kernels.residual_layer_norm` (its three outputs and the gradients of x, branch, gate, weight,
shift and scale) with and without dropout, D = 768 and 1024, up to 2048 rows. References:
`dense_attention` (after `rotary.rotary_qkv` for the packed cases), `dense_cache_attention`
and `layer_ops.residual_layer_norm`'s XLA formulas on the same values in float32. Tolerances:
outputs max |error| 5e-3 (float32, which Triton may run as TF32) or 5e-2 (bfloat16); gradients
max |error| / max |reference| 2e-3 or 2e-2. Prints one JSON line per case (the seed first) and
exits with status 1 if any case fails or raises.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bd3jax.kernels import block_sparse, block_sparse_attention, decode  # noqa: E402
from bd3jax.masks import AttentionMask, MaskKind  # noqa: E402
from bd3jax.model import layer_ops  # noqa: E402
from bd3jax.model.attention import dense_attention, dense_cache_attention  # noqa: E402
from bd3jax.model.dropout import keep_bits  # noqa: E402
from bd3jax.model.transformer import positions_for  # noqa: E402
from bd3jax.rotary import rotary_cos_sin, rotary_qkv  # noqa: E402

_SEED = flags.DEFINE_integer("seed", None, "Seed of the inputs (default: from the clock).")
_SMALL = flags.DEFINE_bool("small", False, "Only the cases with at most 256 tokens.")

F32, BF16 = jnp.float32, jnp.bfloat16
# mask kind, L, L', dtype, head dim, batch, heads
ATTENTION_CASES = (
    (MaskKind.TRAINING, 64, 1, F32, 64, 2, 2),
    (MaskKind.TRAINING, 128, 4, BF16, 64, 2, 3),
    (MaskKind.TRAINING, 256, 16, BF16, 128, 1, 2),
    (MaskKind.TRAINING, 128, 128, F32, 128, 1, 2),
    (MaskKind.TRAINING, 1024, 16, BF16, 64, 2, 2),
    (MaskKind.BLOCK_CAUSAL, 256, 16, BF16, 64, 2, 2),
    (MaskKind.BLOCK_CAUSAL, 128, 1, F32, 64, 1, 2),
)
# queries T, cache slots S, end, dtype, head dim, batch, heads
DECODE_CASES = (
    (16, 1024, 500, BF16, 64, 4, 3),
    (1, 96, 50, F32, 128, 2, 2),
    (64, 64, 64, F32, 64, 2, 2),
    (4, 1024, 2000, BF16, 128, 2, 2),
    (24, 48, 7, BF16, 64, 1, 2),
)
# L, L', queries Q (None: all 2L), dtype, head dim, batch, heads: the packed projection's path
PACKED_CASES = (
    (1024, 16, None, BF16, 64, 2, 2),
    (1024, 16, 1024, BF16, 64, 2, 2),
    (128, 4, None, F32, 128, 1, 2),
    (64, 1, 64, F32, 64, 2, 2),
)
# batch, rows T, D, branch and output dtype, dropout rate
LAYER_NORM_CASES = (
    (2, 2048, 768, BF16, 0.1),
    (2, 1024, 1024, BF16, 0.0),
    (3, 24, 96, F32, 0.1),
    (2, 64, 768, F32, 0.1),
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  seed = time.time_ns() % 2**31 if _SEED.value is None else _SEED.value
  common.emit({"benchmark": "kernel_check", "seed": seed, **common.device_summary()})
  keys = iter(jax.random.split(jax.random.key(seed), 100))
  normal = lambda shape, dtype: jax.random.normal(next(keys), shape, F32).astype(dtype)
  records = []
  for kind, length, block_size, dtype, head_dim, batch, heads in ATTENTION_CASES:
    mask = AttentionMask(kind, length, block_size)
    if _SMALL.value and mask.num_tokens > 256:
      continue
    shape = (batch, mask.num_tokens, heads, head_dim)
    inputs = [normal(shape, dtype) for _ in range(4)]
    record = {"kernel": "block_sparse", "mask": kind.value, "length": length,
              "block_size": block_size, "dtype": jnp.dtype(dtype).name, "head_dim": head_dim}
    records.append(_check(record, dtype, lambda: _attention_errors(mask, inputs)))
  for t, slots, end, dtype, head_dim, batch, heads in DECODE_CASES:
    if _SMALL.value and slots > 256:
      continue
    q = normal((batch, t, heads, head_dim), dtype)
    cache = [normal((batch, heads, slots, head_dim), dtype) for _ in range(2)]
    record = {"kernel": "decode", "queries": t, "slots": slots, "end": end,
              "dtype": jnp.dtype(dtype).name, "head_dim": head_dim}
    records.append(_check(record, dtype, lambda: _decode_errors(q, *cache, end)))
  for length, block_size, queries, dtype, head_dim, batch, heads in PACKED_CASES:
    mask = AttentionMask(MaskKind.TRAINING, length, block_size)
    if _SMALL.value and mask.num_tokens > 256:
      continue
    qkv = normal((batch, mask.num_tokens, 3, heads, head_dim), dtype)
    do = normal((batch, queries or mask.num_tokens, heads, head_dim), dtype)
    record = {"kernel": "packed", "mask": mask.kind.value, "length": length,
              "block_size": block_size, "queries": queries, "dtype": jnp.dtype(dtype).name,
              "head_dim": head_dim}
    records.append(_check(record, dtype, lambda: _packed_errors(mask, queries, qkv, do)))
  for batch, t, d, dtype, rate in LAYER_NORM_CASES:
    if _SMALL.value and t > 256:
      continue
    x = normal((batch, t, d), F32)
    branch = normal((batch, t, d), dtype)
    gate, shift, scale = (0.2 * normal((batch, 1, d), F32) for _ in range(3))  # |y| < 16
    weight = 1 + 0.1 * normal((d,), F32)
    mask = keep_bits(next(keys), (batch, t, d), rate) if rate else None
    cotangents = [normal(shape, F32) for shape in ((batch, t, d), (batch, t, d), (batch, t, 1))]
    record = {"kernel": "layer_norm", "length": t, "d_model": d, "dtype": jnp.dtype(dtype).name,
              "dropout": rate}
    records.append(_check(record, dtype, lambda: _layer_norm_errors(
        [x, branch, gate, weight, shift, scale], mask, cotangents, dtype)))
  failed = [r for r in records if not r["ok"]]
  common.emit({"benchmark": "kernel_check", "cases": len(records), "failed": len(failed)})
  if failed:
    sys.exit(1)


def _check(record, dtype, errors):
  try:
    record.update(errors())
    out_tol, grad_tol = (5e-2, 2e-2) if dtype == BF16 else (5e-3, 2e-3)
    record["ok"] = (record["max_abs_err"] <= out_tol and
                    record.get("grad_rel_err", 0.0) <= grad_tol)
  except Exception as e:  # report and go on with the next case
    record.update(ok=False, error=common.error_text(e))
  common.emit(record)
  return record


def _attention_errors(mask, inputs):
  dense = lambda q, k, v: dense_attention(q, k, v, mask.dense())
  kernel = lambda q, k, v: block_sparse_attention(q, k, v, mask)
  o_ref, grads_ref = jax.jit(lambda *a: common.value_and_grads(dense, *a))(
      *(x.astype(F32) for x in inputs))
  o, grads = jax.jit(lambda *a: common.value_and_grads(kernel, *a))(*inputs)
  return {"max_abs_err": _max_err(o, o_ref),
          "grad_rel_err": max(_max_err(g, g_ref) / float(jnp.abs(g_ref).max())
                              for g, g_ref in zip(grads, grads_ref))}


def _decode_errors(q, k, v, end):
  o_ref = dense_cache_attention(q.astype(F32), k.astype(F32), v.astype(F32), end)
  return {"max_abs_err": _max_err(jax.jit(decode.cache_attention)(q, k, v, end), o_ref)}


def _packed_errors(mask, queries, qkv, do):
  q = queries or mask.num_tokens
  cos, sin = rotary_cos_sin(positions_for(mask), qkv.shape[-1])

  def dense(qkv):
    return dense_attention(*rotary_qkv(qkv, cos, sin, q), mask.dense()[:q])
  kernel = lambda qkv: block_sparse.packed_attention(qkv, cos, sin, mask, queries)
  o_ref, (dqkv_ref,) = jax.jit(lambda *a: common.value_and_grads(dense, *a))(qkv.astype(F32),
                                                                            do.astype(F32))
  o, (dqkv,) = jax.jit(lambda *a: common.value_and_grads(kernel, *a))(qkv, do)
  return {"max_abs_err": _max_err(o, o_ref),
          "grad_rel_err": max(_max_err(dqkv[:, :, i], dqkv_ref[:, :, i]) /
                              float(jnp.abs(dqkv_ref[:, :, i]).max()) for i in range(3))}


def _layer_norm_errors(inputs, mask, cotangents, dtype):
  def value_and_grads(implementation, out_dtype, x, branch, gate, weight, shift, scale):
    fused = lambda *args: layer_ops.residual_layer_norm(
        *args[:3], mask, *args[3:], None, out_dtype=out_dtype, implementation=implementation)
    out, vjp = jax.vjp(fused, x, branch, gate, weight, shift, scale)
    return out, vjp(tuple(ct.astype(o.dtype) for ct, o in zip(cotangents, out)))
  out_ref, grads_ref = jax.jit(lambda *a: value_and_grads("xla", F32, *a))(
      *(a.astype(F32) for a in inputs))
  out, grads = jax.jit(lambda *a: value_and_grads("pallas", dtype, *a))(*inputs)
  return {"max_abs_err": max(_max_err(o, o_ref) for o, o_ref in zip(out, out_ref)),
          "grad_rel_err": max(_max_err(g, g_ref) / float(jnp.abs(g_ref).max())
                              for g, g_ref in zip(grads, grads_ref))}


def _max_err(x, ref):
  return float(jnp.abs(x.astype(F32) - ref).max())


if __name__ == "__main__":
  app.run(main)
