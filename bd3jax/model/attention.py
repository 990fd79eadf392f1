"""Masked multi-head attention behind one function, with several implementations.

`dense` is the obviously-correct reference: an einsum with the boolean mask and a
float32 softmax. `xla` and `cudnn` go through `jax.nn.dot_product_attention`. `pallas` is
bd3jax's block-sparse kernel (GPU via Triton; interpreted on CPU), `splash` JAX's TPU splash
attention with the BD3 mask (interpreted on CPU); both skip the empty tiles of the mask.
`auto` picks per backend: `splash` on TPU, `dense` on CPU, and on GPU `cudnn` (bfloat16 /
float16) or `xla`; `pallas` is not auto's GPU choice because its Triton build has not yet been
timed against cuDNN (benchmarks/attention.py) — select it explicitly.
KV-cache decoding writes into a heads-major ring buffer of S slots and attends densely over it.
"""

import jax
import jax.numpy as jnp

from bd3jax.kernels import block_sparse_attention, platform, splash_attention
from bd3jax.masks import AttentionMask

IMPLEMENTATIONS = ("dense", "xla", "cudnn", "pallas", "splash", "auto")


def _auto(dtype) -> str:
  backend = platform.backend()
  if backend == "gpu":
    return "cudnn" if dtype in (jnp.bfloat16, jnp.float16) else "xla"
  return "splash" if backend == "tpu" else "dense"


def dense_attention(q_BTHK, k_BSHK, v_BSHK, mask_TS):
  """Reference attention: softmax(q k^T / sqrt(K) + mask) v, softmax in float32."""
  scale = q_BTHK.shape[-1] ** -0.5
  logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                           preferred_element_type=jnp.float32) * scale
  logits_BHTS = jnp.where(mask_TS, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BSHK.dtype)
  return jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)


def attention(q_BTHK, k_BTHK, v_BTHK, mask: AttentionMask, implementation: str = "dense"):
  """Attention of T = mask.num_tokens queries over the same T keys under a BD3 mask."""
  if implementation == "auto":
    implementation = _auto(q_BTHK.dtype)
  if implementation == "pallas":
    return block_sparse_attention(q_BTHK, k_BTHK, v_BTHK, mask)
  if implementation == "splash":
    return splash_attention(q_BTHK, k_BTHK, v_BTHK, mask)
  mask_TT = jnp.asarray(mask.dense())
  if implementation == "dense":
    return dense_attention(q_BTHK, k_BTHK, v_BTHK, mask_TT)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(
        q_BTHK, k_BTHK, v_BTHK, mask=mask_TT[None, None], implementation=implementation)
  raise ValueError(f"model.attention {implementation!r} is not one of {IMPLEMENTATIONS}")


def update_kv_cache(cache_BHSK, new_BTHK, start):
  """Writes T rows at the ring slots (start + i) mod S; needs (start mod S) + T <= S.

  The cache is heads-major, [B, H, S, K], the layout both attention matmuls read without a
  transpose.
  """
  slot = start % cache_BHSK.shape[2]
  new_BHTK = jnp.swapaxes(new_BTHK, 1, 2).astype(cache_BHSK.dtype)
  return jax.lax.dynamic_update_slice_in_dim(cache_BHSK, new_BHTK, slot, axis=2)


def cache_attention(q_BTHK, k_BHSK, v_BHSK, end):
  """Attention of T queries over the ring-buffer slots that hold positions < `end`.

  After writing positions up to end - 1, the first min(end, S) slots are exactly the last
  min(end, S) positions; all of them are visible to every query (a block sees itself fully).
  Computed as `dense_attention`: float32 logits and softmax.
  """
  s = k_BHSK.shape[2]
  logits_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, k_BHSK,
                           preferred_element_type=jnp.float32) * q_BTHK.shape[-1] ** -0.5
  valid_S = jnp.arange(s) < jnp.minimum(end, s)
  logits_BHTS = jnp.where(valid_S, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BHSK.dtype)
  return jnp.einsum("bhts,bhsk->bthk", probs_BHTS, v_BHSK)
