"""Block-by-block ancestral sampling, recomputing the whole sequence at every step.

This is the dense, obviously-correct sampler: each denoising step runs the network over the
full fixed-length sequence under the block-causal mask (so the current block sees the clean
prefix and itself, and never the still-masked blocks after it) and updates only the current
block. An AR model (block size 1, one step) samples through the same loop, reading each
token's logits from the position before it. One jit-compiled program: `lax.fori_loop` over blocks and over denoising steps.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from bd3jax.masks import AttentionMask, MaskKind


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  length: int          # tokens per sample, a multiple of block_size
  block_size: int
  steps: int           # denoising steps T per block, on the grid t = 1, 1 - 1/T, ..., 0
  nucleus_p: float = 0.9
  autoregressive: bool = False  # a causal model: the logits at position i predict token i + 1

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"sample.steps {self.steps} must be at least 1")
    if not 0.0 < self.nucleus_p <= 1.0:
      raise ValueError(f"sample.nucleus_p {self.nucleus_p} must be in (0, 1]")
    if self.length % self.block_size:
      raise ValueError(f"sample length {self.length} is not a multiple of block_size "
                       f"{self.block_size}")


def nucleus_filter(logits_BKV, p: float):
  """Keeps the smallest set of most probable tokens whose probability reaches p."""
  if p >= 1.0:
    return logits_BKV
  probs = jax.nn.softmax(logits_BKV, axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  cumulative = jnp.cumsum(sorted_probs, axis=-1)
  # The probability of the least likely token still kept: the first one reaching p.
  cutoff_index = jnp.sum(cumulative < p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_probs, cutoff_index, axis=-1)
  return jnp.where(probs >= cutoff, logits_BKV, -jnp.inf)


def denoise_step(key, x_block_BK, logits_BKV, t, s, mask_id: int, nucleus_p: float):
  """One DDPM-style step from t to s < t: each masked token is revealed with probability
  (t - s) / t, drawing its value from SUBS p(x_0) (never [MASK]); revealed tokens stay."""
  logits_BKV = logits_BKV.at[..., mask_id].set(-jnp.inf)
  logits_BKV = nucleus_filter(logits_BKV, nucleus_p)
  key_token, key_reveal = jax.random.split(key)
  proposal_BK = jax.random.categorical(key_token, logits_BKV, axis=-1)
  reveal_BK = jax.random.uniform(key_reveal, x_block_BK.shape) < (t - s) / t
  return jnp.where((x_block_BK == mask_id) & reveal_BK, proposal_BK, x_block_BK)


def sample(apply_fn: Callable, key, num_samples: int, cfg: SamplerConfig, *, bos_id: int,
           mask_id: int):
  """[num_samples, length] token ids; each sequence starts with BOS.

  `apply_fn(tokens, sigma, mask, train) -> logits` runs the network over all positions.
  """
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, cfg.length, cfg.block_size)
  x_BL = jnp.full((num_samples, cfg.length), mask_id, jnp.int32).at[:, 0].set(bos_id)
  n_blocks, k = cfg.length // cfg.block_size, cfg.block_size
  shift = 1 if cfg.autoregressive else 0

  def block_body(b, carry):
    x_BL, key = carry
    start = b * k

    def step_body(i, carry):
      x_BL, key = carry
      key, step_key = jax.random.split(key)
      t = 1.0 - i / cfg.steps
      s = 1.0 - (i + 1) / cfg.steps
      logits_BLV = apply_fn(x_BL, None, mask, False)
      logits_BKV = jax.lax.dynamic_slice_in_dim(logits_BLV, start - shift, k, axis=1)
      block_BK = jax.lax.dynamic_slice_in_dim(x_BL, start, k, axis=1)
      block_BK = denoise_step(step_key, block_BK, logits_BKV, t, s, mask_id, cfg.nucleus_p)
      return jax.lax.dynamic_update_slice_in_dim(x_BL, block_BK, start, axis=1), key

    return jax.lax.fori_loop(0, cfg.steps, step_body, (x_BL, key))

  x_BL, _ = jax.lax.fori_loop(0, n_blocks, block_body, (x_BL, key))
  return x_BL
