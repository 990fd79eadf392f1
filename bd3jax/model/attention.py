"""Masked multi-head attention behind one function, with several implementations.

`dense` is the obviously-correct reference: an einsum with the boolean mask and a
float32 softmax. `xla` and `cudnn` go through `jax.nn.dot_product_attention`.
"""

import jax
import jax.numpy as jnp

from bd3jax.masks import AttentionMask

IMPLEMENTATIONS = ("dense", "xla", "cudnn")


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
  mask_TT = jnp.asarray(mask.dense())
  if implementation == "dense":
    return dense_attention(q_BTHK, k_BTHK, v_BTHK, mask_TT)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(
        q_BTHK, k_BTHK, v_BTHK, mask=mask_TT[None, None], implementation=implementation)
  raise ValueError(f"model.attention {implementation!r} is not one of {IMPLEMENTATIONS}")
