"""The data-driven clipped schedule: the masking interval whose NELBO estimator varies least.

BD3-LM trains with t ~ U[beta, omega] per block. Every `noise.search_every` steps the loop
measures, on held-out batches, the per-block NELBO of training's estimator (resampling on,
dropout off) under each interval of the reference's grid and under the current interval, and
moves training to the interval with the smallest variance: for each block position, the
variance across sequences, summed over blocks. The whole grid is one compiled program.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bd3jax import diffusion, schedules, train

WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
START_STEP = 0.05


def interval_grid(block_size: int, widths=WIDTHS) -> np.ndarray:
  """float32 [I, 2]: (1e-3, 1), then for each width w the intervals starting at 0, 0.05, ...,
  1 - w (a start of 0 is 1e-3), as in the reference; intervals no masked fraction k/L' of a
  block of `block_size` can meet are dropped."""
  rows = [(schedules.NO_LOWER_CLIP, 1.0)]
  for width in widths:
    if not 0.0 < width < 1.0:
      raise ValueError(f"noise.search_widths: width {width} must lie in (0, 1)")
    for k in range(int(round((1.0 - width) / START_STEP)) + 1):
      start = round(k * START_STEP, 6)
      rows.append((max(start, schedules.NO_LOWER_CLIP), round(start + width, 6)))
  rows = [r for r in dict.fromkeys(rows) if schedules.has_valid_masked_count(block_size, *r)]
  return np.array(rows, np.float32)


def jit_search_step(task: train.Task, chunk: int, params_sharding=None, batch_sharding=None):
  """`step(params, x0_BL, key, intervals_I2) -> block NELBO [I, B, n_blocks]`, float32.

  Row i is training's per-block NELBO estimate (`diffusion.nelbo` with resampling as
  configured, no dropout) with t drawn from intervals_I2[i]; every interval uses the same key
  (common random numbers). Compiled once per number of intervals; the intervals are mapped
  over `chunk` at a time, vmapped within a chunk (memory: `chunk` forward passes at once).
  """
  # Every token projected: a capacity sized for one interval would make the others' pairs
  # overflow, and their subsampled losses would add to the variance that the search measures.
  loss_cfg = dataclasses.replace(task.loss_cfg, logits_interval=None)

  def step(params, x0_BL, key, intervals_I2):
    apply_fn = task.apply_fn(params)
    def one(interval):
      _, aux = diffusion.nelbo(apply_fn, x0_BL, key, loss_cfg, train=False, interval=interval)
      return aux["block_nelbo"]
    return jax.lax.map(one, intervals_I2, batch_size=chunk)
  if params_sharding is None:
    return jax.jit(step)
  replicated = train.replicated_like(batch_sharding)
  return jax.jit(step, in_shardings=(params_sharding, batch_sharding, replicated, replicated),
                 out_shardings=replicated)


def block_nelbo_variance(search_step, params, batches, intervals_I2, *, seed: int) -> np.ndarray:
  """float64 [I]: for each interval, the variance across sequences of each block's NELBO,
  summed over blocks, over all `batches` (key of batch i: fold_in(key(seed), i))."""
  intervals_I2 = jnp.asarray(intervals_I2, jnp.float32)
  total_IN = total_sq_IN = None
  n = 0
  for i, x0_BL in enumerate(batches):
    key = jax.random.fold_in(jax.random.key(seed), i)
    nelbo_IBN = np.asarray(jax.device_get(search_step(params, x0_BL, key, intervals_I2)), np.float64)
    s1, s2 = nelbo_IBN.sum(1), np.square(nelbo_IBN).sum(1)
    total_IN, total_sq_IN = (s1, s2) if total_IN is None else (total_IN + s1, total_sq_IN + s2)
    n += nelbo_IBN.shape[1]
  if n < 2:
    raise ValueError(f"the interval search needs at least 2 held-out sequences, got {n}")
  mean_IN = total_IN / n
  return ((total_sq_IN / n - np.square(mean_IN)) * n / (n - 1)).sum(-1)
