import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bd3jax import schedules


def test_low_discrepancy_t_is_stratified():
  t = schedules.sample_t(jax.random.key(0), 8, 16, 0.0, 1.0, antithetic=True)
  strata = np.sort(np.floor(np.asarray(t).ravel() * t.size).astype(int))
  np.testing.assert_array_equal(strata, np.arange(t.size))


def test_clipped_t_stays_in_range():
  t = schedules.sample_t(jax.random.key(1), 64, 8, 0.3, 0.8)
  assert float(t.min()) >= 0.3 and float(t.max()) <= 0.8
  assert float(t.max() - t.min()) > 0.45  # it covers the interval


@pytest.mark.parametrize("schedule", sorted(schedules.SCHEDULES))
def test_weight_is_the_log_derivative_of_the_move_chance(schedule):
  t = jnp.linspace(0.05, 1.0, 50)
  m, w = schedules.move_chance_and_weight(t, schedule)
  dm = jax.vmap(jax.grad(lambda s: schedules.move_chance_and_weight(s, schedule)[0]))(t)
  np.testing.assert_allclose(w, dm / m, rtol=1e-4)
  assert float(m.max()) <= 1.0 + 1e-6 and float(m.min()) > 0
  np.testing.assert_allclose(schedules.move_chance_and_weight(jnp.ones(()), schedule)[0], 1.0, atol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="noise.schedule"):
    schedules.move_chance_and_weight(jnp.ones(()), "quartic")


def test_unclipped_masking_is_bernoulli():
  p = jnp.full((4000, 2), 0.3)
  masked = schedules.sample_masked(jax.random.key(2), p, 4)
  assert masked.shape == (4000, 8)
  assert abs(float(masked.mean()) - 0.3) < 0.01


@pytest.mark.parametrize("block_size,lo,hi", [(4, 0.45, 0.95), (16, 0.3, 0.8), (16, 1e-3, 0.5), (8, 0.5, 1.0)])
def test_resampled_blocks_have_in_range_fractions(block_size, lo, hi):
  t = schedules.sample_t(jax.random.key(3), 256, 4, lo, hi)
  masked = schedules.sample_masked(jax.random.key(4), t, block_size, lo, hi, resample=True)
  frac = np.asarray(masked).reshape(256, 4, block_size).mean(-1)
  if lo > schedules.NO_LOWER_CLIP:
    assert frac.min() >= lo
  if hi < 1:
    assert frac.max() <= hi


def test_resampling_matches_the_reference_rejection_loop():
  """Counts per block follow the distribution of the reference's redraw-until-valid loop."""
  block, lo, hi, p, n = 4, 0.45, 0.95, 0.6, 40_000
  masked = schedules.sample_masked(jax.random.key(5), jnp.full((n, 1), p), block, lo, hi, resample=True)
  ours = np.bincount(np.asarray(masked).sum(-1), minlength=block + 1) / n
  rng = np.random.default_rng(0)
  draws = []
  while len(draws) < n:
    row = rng.random(block) < p
    if lo <= row.mean() <= hi:
      draws.append(row)
  draws = np.array(draws)
  ref = np.bincount(draws.sum(-1), minlength=block + 1) / n
  np.testing.assert_allclose(ours, ref, atol=0.01)
  # Given the count, every position is equally likely to be masked.
  np.testing.assert_allclose(np.asarray(masked).mean(0), masked.mean(), atol=0.01)


def test_no_valid_count_is_detected():
  assert not schedules.has_valid_masked_count(1, 0.3, 0.8)
  assert schedules.has_valid_masked_count(4, 0.45, 0.95)
