"""Masked multi-head attention behind one function, with several implementations.

`dense` is the obviously-correct reference: an einsum with the boolean mask and a
float32 softmax. `xla` and `cudnn` go through `jax.nn.dot_product_attention`. `pallas` is
bd3jax's block-sparse kernel (GPU via Triton; interpreted on CPU), `splash` JAX's TPU splash
attention with the BD3 mask (interpreted on CPU); both skip the empty tiles of the mask.
`auto` picks per backend: `splash` on TPU, `dense` on CPU, and on GPU `pallas` (float32 or
bfloat16 with a power-of-two head dim in [16, 256]), else `cudnn` (float16) or `xla`. On an
H200 the Pallas kernel ran the training attention 3.3x (forward) and 2.9x (forward and
backward) faster than cuDNN with the dense mask (README, "Attention").
Under a device mesh (`jax.set_mesh`) `pallas` and `splash` run on each device's shard of batch
and heads (`shard_map`, axes from `logical_axes`): a kernel is opaque to XLA's partitioner,
which would otherwise gather q, k and v onto every device and repeat the whole attention there.
KV-cache decoding writes into a heads-major ring buffer of S slots and attends over its filled
slots: with `pallas` through bd3jax's decode kernel (`kernels/decode.py`, which reads only the
key tiles that hold filled slots), with every other implementation densely over all S
(`dense_cache_attention`). The sampler runs on one device, so decoding calls the kernel
directly, without the per-shard wrapping.
"""

import functools

import jax
import jax.numpy as jnp

from bd3jax.kernels import (block_sparse, block_sparse_attention, decode, platform, sharding,
                            splash_attention)
from bd3jax.masks import AttentionMask
from bd3jax.rotary import rotary_qkv

IMPLEMENTATIONS = ("dense", "xla", "cudnn", "pallas", "splash", "auto")


def _auto(dtype, head_dim: int) -> str:
  backend = platform.backend()
  if backend == "gpu":
    if jnp.dtype(dtype) in block_sparse.DTYPES and block_sparse.buildable_head_dim(head_dim):
      return "pallas"
    return "cudnn" if dtype == jnp.float16 else "xla"
  return "splash" if backend == "tpu" else "dense"


def dense_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS):
  """Reference attention: softmax(q k^T / sqrt(K) + mask) v, softmax in float32."""
  scale = q_BTHK.shape[-1] ** -0.5
  logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                           preferred_element_type=jnp.float32) * scale
  logits_BHTS = jnp.where(mask_TS, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BSHK.dtype)
  return jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)


def qkv_attention(qkv_BT3HK, cos_TK, sin_TK, mask: AttentionMask, implementation: str = "dense",
                  queries: int | None = None):
  """`attention` of the rotary q (first `queries` rows; default all T), rotary k and v of one
  packed projection [B, T, 3, H, K] (`rotary.apply_rotary` with cos and sin [T, K]). `pallas`
  takes the packed array itself (`block_sparse.packed_attention`: v read in place, d qkv
  written by its backward kernels); the others get q, k and v."""
  if implementation == "auto":
    implementation = _auto(qkv_BT3HK.dtype, qkv_BT3HK.shape[-1])
  if implementation == "pallas":
    kernel = functools.partial(block_sparse.packed_attention, mask=mask, queries=queries)
    return sharding.per_shard(kernel, [qkv_BT3HK, cos_TK, sin_TK],
                              [_PACKED_NAMES, None, None], [_QKV_NAMES])
  return attention(*rotary_qkv(qkv_BT3HK, cos_TK, sin_TK, queries), mask, implementation)


def attention(q_BQHK, k_BTHK, v_BTHK, mask: AttentionMask, implementation: str = "dense"):
  """Attention over the T = mask.num_tokens tokens under a BD3 mask, for the first Q <= T of
  them (q's rows: all T, or e.g. the x_t half when only its outputs are needed)."""
  if implementation == "auto":
    implementation = _auto(q_BQHK.dtype, q_BQHK.shape[-1])
  if implementation in ("pallas", "splash"):
    kernel = block_sparse_attention if implementation == "pallas" else splash_attention
    return _per_shard(functools.partial(kernel, mask=mask), q_BQHK, k_BTHK, v_BTHK)
  mask_QT = jnp.asarray(mask.dense()[:q_BQHK.shape[1]])
  if implementation == "dense":
    return dense_attention(q_BQHK, k_BTHK, v_BTHK, mask_QT)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(
        q_BQHK, k_BTHK, v_BTHK, mask=mask_QT[None, None], implementation=implementation)
  raise ValueError(f"model.attention {implementation!r} is not one of {IMPLEMENTATIONS}")


_QKV_NAMES = ("batch", None, "heads", None)
_PACKED_NAMES = ("batch", None, None, "heads", None)


def _per_shard(kernel, q_BQHK, k_BTHK, v_BTHK):
  """`kernel(q, k, v)` on each device's shard of batch and heads under the current mesh."""
  return sharding.per_shard(kernel, [q_BQHK, k_BTHK, v_BTHK], [_QKV_NAMES] * 3, [_QKV_NAMES])


def update_kv_cache(cache_BHSK, new_BTHK, start):
  """Writes T rows at the ring slots (start + i) mod S; needs (start mod S) + T <= S.

  The cache is heads-major, [B, H, S, K], the layout both attention matmuls read without a
  transpose.
  """
  slot = start % cache_BHSK.shape[2]
  new_BHTK = jnp.swapaxes(new_BTHK, 1, 2).astype(cache_BHSK.dtype)
  return jax.lax.dynamic_update_slice_in_dim(cache_BHSK, new_BHTK, slot, axis=2)


def cache_attention(q_BTHK, k_BHSK, v_BHSK, end, implementation: str = "dense"):
  """Attention of T queries over the ring-buffer slots that hold positions < `end`.

  After writing positions up to end - 1, the first min(end, S) slots are exactly the last
  min(end, S) positions; all of them are visible to every query (a block sees itself fully).
  `pallas` runs the decode kernel; any other implementation `dense_cache_attention`.
  """
  if implementation == "pallas":
    return decode.cache_attention(q_BTHK, k_BHSK, v_BHSK, end)
  return dense_cache_attention(q_BTHK, k_BHSK, v_BHSK, end)


def dense_cache_attention(q_BTHK, k_BHSK, v_BHSK, end):
  """`cache_attention` as `dense_attention` computes it: float32 logits over all S slots, the
  unfilled ones masked, and a float32 softmax."""
  s = k_BHSK.shape[2]
  logits_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, k_BHSK,
                           preferred_element_type=jnp.float32) * q_BTHK.shape[-1] ** -0.5
  valid_S = jnp.arange(s) < jnp.minimum(end, s)
  logits_BHTS = jnp.where(valid_S, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BHSK.dtype)
  return jnp.einsum("bhts,bhsk->bthk", probs_BHTS, v_BHSK)
