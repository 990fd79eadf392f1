"""Rotary position embedding in the NeoX rotate-half form, as the reference applies it to q, k."""

import jax.numpy as jnp

ROPE_BASE = 10_000.0


def rotary_cos_sin(positions_T, head_dim: int):
  """cos, sin of shape [T, head_dim] for the rotate-half form (frequencies repeated)."""
  inv_freq = 1.0 / ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  freqs_TF = positions_T.astype(jnp.float32)[:, None] * inv_freq[None]
  emb_TK = jnp.concatenate([freqs_TF, freqs_TF], axis=-1)
  return jnp.cos(emb_TK), jnp.sin(emb_TK)


def apply_rotary(x_BTHK, cos_TK, sin_TK):
  """NeoX rotate-half rotary embedding, computed in float32."""
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * cos_TK[None, :, None] + rotated * sin_TK[None, :, None]
  return out.astype(x_BTHK.dtype)


def rotary_qkv(qkv_BT3HK, cos_TK, sin_TK, queries: int | None = None):
  """(q of the first `queries` rows (default all T), k, v) of a packed projection [B, T, 3, H, K],
  the rotary applied to q and k."""
  q_BQHK = apply_rotary(qkv_BT3HK[:, :queries, 0], cos_TK[:queries], sin_TK[:queries])
  return q_BQHK, apply_rotary(qkv_BT3HK[:, :, 1], cos_TK, sin_TK), qkv_BT3HK[:, :, 2]


def rotary_backward(dy_TK, cos_TK, sin_TK):
  """The gradient of `apply_rotary` at its input, for rows [T, K] of float32 gradients:
  dy * cos + [y2, -y1] with y = dy * sin (the rotation's transpose). Written with a split of
  the last axis into halves and a stack along it, which Pallas lowers to Triton."""
  y1, y2 = jnp.split(dy_TK * sin_TK, 2, axis=-1)
  halves_TH2 = jnp.stack([y2, -y1], axis=-1)
  return dy_TK * cos_TK + jnp.swapaxes(halves_TH2, -1, -2).reshape(dy_TK.shape)
