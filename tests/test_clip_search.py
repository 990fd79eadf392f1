"""The data-driven clipped schedule: the grid, the one-compile search step, the choice, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config
from conftest import MASK_ID, random_params, random_tokens, tiny_model

from bd3jax import checkpoint, clip_search, diffusion, metrics, run, train
from bd3jax.masks import AttentionMask, MaskKind


def test_grid_is_the_references():
  grid = clip_search.interval_grid(16)
  assert len(grid) == 1 + 11 + 9 + 7 + 5 + 3
  rows = {tuple(round(float(x), 4) for x in r) for r in grid}
  assert {(0.001, 1.0), (0.3, 0.8), (0.45, 0.95), (0.001, 0.5), (0.1, 1.0)} <= rows
  assert all(hi - lo <= 0.9 + 1e-6 or (lo, hi) == (0.001, 1.0) for lo, hi in rows)
  # L' = 1: only intervals that accept 0 or 1 masked token (lower bound off, or upper bound 1).
  assert all(lo <= 1e-3 or hi >= 1.0 for lo, hi in clip_search.interval_grid(1))
  with pytest.raises(ValueError, match="width 1.2"):
    clip_search.interval_grid(4, (0.5, 1.2))


def _task(block_size):
  L = 16
  model = tiny_model()
  cfg = diffusion.LossConfig("bd3lm", L, block_size, MASK_ID, clip_min=0.3, clip_max=0.8)
  return train.Task(model, cfg, optimizer=None, ema_decay=0.0, grad_accum=1, seed=0), L


@pytest.mark.parametrize("block_size", [4, 16])
def test_search_step_matches_the_loss_at_each_interval_and_compiles_once(rng, block_size):
  task, L = _task(block_size)
  x0 = random_tokens(rng, 3, L)
  mask = AttentionMask(MaskKind.TRAINING, L, block_size)
  params = random_params(task.model, jnp.concatenate([x0, x0], 1), mask)
  grid = clip_search.interval_grid(block_size)[::5]
  step = clip_search.jit_search_step(task, chunk=3)
  key = jax.random.key(7)
  out_IBN = step(params, x0, key, jnp.asarray(grid))
  step(params, x0, jax.random.key(8), jnp.asarray(grid[::-1]))  # new key and intervals
  assert step._cache_size() == 1 and out_IBN.shape == (len(grid), 3, L // block_size)
  for i, (lo, hi) in enumerate(grid):
    cfg = dataclasses.replace(task.loss_cfg, clip_min=float(lo), clip_max=float(hi))
    _, aux = diffusion.nelbo(task.apply_fn(params), x0, key, cfg, train=False)
    np.testing.assert_allclose(out_IBN[i], aux["block_nelbo"], rtol=2e-5, atol=1e-5)


def test_variance_search_finds_the_known_minimum():
  grid = clip_search.interval_grid(16)
  best = (0.3, 0.8)
  def synthetic_step(params, x0_BL, key, intervals_I2):
    # per-block NELBO whose spread grows with the distance from `best`
    scale_I = 1.0 + 5.0 * jnp.abs(intervals_I2 - jnp.asarray(best)).sum(-1)
    noise_IBN = jax.random.normal(key, (len(intervals_I2), x0_BL.shape[0], 4))
    return 3.0 + scale_I[:, None, None] * noise_IBN
  batches = [np.zeros((64, 8), np.int32)] * 4
  var_I = clip_search.block_nelbo_variance(synthetic_step, None, batches, grid, seed=0)
  lo, hi = grid[int(np.argmin(var_I))]
  assert (round(float(lo), 3), round(float(hi), 3)) == best
  np.testing.assert_allclose(var_I.min(), 4.0, rtol=0.15)  # 4 blocks of unit variance


def test_search_runs_in_training_and_the_interval_survives_a_checkpoint(tmp_path):
  config = tiny_config.get_config()
  config.noise.update(clip_min=1e-3, clip_max=1.0, search_every=2, search_batches=2)
  config.train.update(num_steps=4, checkpoint_every=2)
  run.train_and_evaluate(config, str(tmp_path))
  lo = metrics.read_scalars(str(tmp_path), "noise/clip_min")
  hi = metrics.read_scalars(str(tmp_path), "noise/clip_max")
  assert sorted(lo) == [2, 4]
  before = metrics.read_scalars(str(tmp_path), "noise/block_nelbo_var_before")
  after = metrics.read_scalars(str(tmp_path), "noise/block_nelbo_var")
  assert all(after[s] <= before[s] for s in (2, 4))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=10)
  try:
    s = run.setup(config, str(tmp_path), ckpt)
  finally:
    ckpt.close()
  np.testing.assert_allclose(np.asarray(s.state.noise_interval), [lo[4], hi[4]], rtol=1e-6)
