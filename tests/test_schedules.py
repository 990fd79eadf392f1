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


@pytest.mark.parametrize("batch", [1, 2, 7, 16])
def test_folded_rows_pair_low_and_high_strata(batch):
  rows = schedules.folded_rows(batch)
  np.testing.assert_array_equal(np.sort(rows), np.arange(batch))  # a permutation
  pairs = rows[: batch // 2 * 2].reshape(-1, 2).sum(1)
  np.testing.assert_array_equal(pairs, batch - 1)  # each pair: group i and group B - 1 - i


def test_antithetic_t_balances_pairs_of_rows():
  t = np.asarray(schedules.sample_t(jax.random.key(6), 16, 64, 0.0, 1.0))
  pair_means = t.reshape(8, 2 * 64).mean(1)
  np.testing.assert_allclose(pair_means, 0.5, atol=1.0 / 16)
  row_means = t.mean(1)
  assert row_means.max() - row_means.min() > 0.9  # rows alone keep the reference's spread


@pytest.mark.parametrize("batch,n_blocks,block_size,schedule,lo,hi,resample", [
    (16, 64, 16, "loglinear", 1e-3, 1.0, True), (16, 32, 16, "loglinear", 0.3, 0.8, True),
    (8, 16, 4, "cosine", 0.45, 0.95, True), (4, 1, 64, "loglinear", 1e-3, 1.0, False),
    (6, 8, 8, "square", 1e-3, 1.0, False)])
def test_pair_capacity_sits_five_stds_above_the_pairs_counts(batch, n_blocks, block_size,
                                                            schedule, lo, hi, resample):
  """Against masks drawn as training draws them: no pair over the capacity in 400 draws, and
  the capacity between 4 and 6.5 empirical standard deviations above the mean of the pair it
  is closest to."""
  capacity = schedules.pair_capacity(batch, n_blocks, block_size, schedule, lo, hi, resample)

  @jax.jit
  @jax.vmap
  def pair_counts(key):
    key_t, key_mask = jax.random.split(key)
    t = schedules.sample_t(key_t, batch, n_blocks, lo, hi)
    p, _ = schedules.move_chance_and_weight(t, schedule)
    masked = schedules.sample_masked(key_mask, p, block_size, lo, hi, resample=resample)
    return masked.reshape(batch // 2, -1).sum(1)
  counts = np.asarray(pair_counts(jax.random.split(jax.random.key(8), 400)))
  assert counts.max() <= capacity < 2 * n_blocks * block_size
  stds = (capacity - counts.mean(0)) / counts.std(0)  # per pair; the tightest sets the capacity
  assert 4.0 < stds.min() < 6.5


def test_pair_capacity_needs_an_even_batch():
  with pytest.raises(ValueError, match="even batch"):
    schedules.pair_capacity(3, 4, 4, "loglinear", 1e-3, 1.0, True)
