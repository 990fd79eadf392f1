"""Noise schedules and per-block masking: t sampling, the forward process, clipped resampling.

A schedule maps t in [0, 1] to the move chance m(t) = 1 - alpha_t (the probability that a
token is masked) and to the NELBO weight w(t) = -alpha'_t / (1 - alpha_t) = m'(t) / m(t).
"""

import jax
import jax.numpy as jnp
import numpy as np

MIN_MOVE_CHANCE = 1e-3  # floor on m(t) for schedules that reach 0 faster than t (square)
NO_LOWER_CLIP = 1e-3    # the reference's default beta: below or at it, no lower bound is enforced


def _loglinear(t):
  return t, 1.0 / t


def _square(t):
  return jnp.maximum(t * t, MIN_MOVE_CHANCE), 2.0 * t / jnp.maximum(t * t, MIN_MOVE_CHANCE)


def _square_root(t):
  return jnp.sqrt(t), 0.5 / t


def _log(t):
  m = jnp.log1p(t) / jnp.log(2.0)
  return m, 1.0 / ((1.0 + t) * jnp.log1p(t))


def _cosine(t):
  m = 1.0 - jnp.cos(0.5 * jnp.pi * t)
  return m, 0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t) / m


# "linear" is the paper's name for 1 - alpha_t ~ U[0, 1], i.e. the loglinear schedule.
SCHEDULES = {
    "loglinear": _loglinear,
    "linear": _loglinear,
    "square": _square,
    "square_root": _square_root,
    "log": _log,
    "cosine": _cosine,
}


def move_chance_and_weight(t, schedule: str):
  """(m(t), w(t)) for a named schedule; t must be in (0, 1]."""
  if schedule not in SCHEDULES:
    raise ValueError(f"noise.schedule {schedule!r} is not one of {sorted(SCHEDULES)}")
  return SCHEDULES[schedule](t)


def folded_rows(batch: int) -> np.ndarray:
  """int [batch]: the stratum group of each row, 0, B-1, 1, B-2, ...: row 2i takes the i-th
  lowest group of t, row 2i+1 the i-th highest, so each pair of rows (2i, 2i+1) masks about as
  many tokens as any other pair (what `diffusion` sizes its logits for)."""
  rows = np.arange(batch)
  return np.where(rows % 2 == 0, rows // 2, batch - 1 - rows // 2)


def _strata(batch: int, n_blocks: int) -> np.ndarray:
  """int [batch, n_blocks]: the stratum of t each (row, block) draws from under antithetic t."""
  return folded_rows(batch)[:, None] * n_blocks + np.arange(n_blocks)


def sample_t(key, batch: int, n_blocks: int, clip_min: float, clip_max: float,
             antithetic: bool = True):
  """One t per (sequence, block), [batch, n_blocks], in [clip_min, clip_max].

  Low-discrepancy (antithetic) draws as in the reference: with N = batch * n_blocks,
  t_k = (u_k / N + k / N) mod 1, one point in each of the N strata, each row's n_blocks
  consecutive strata a group, then rescaled to the clipped range. The reference gives row b
  group b; here the groups go to the rows in `folded_rows` order, which leaves the loss's
  expectation as it is (and its law, where the rows are exchangeable, e.g. shuffled).
  clip_min = clip_max = 1 is full masking (t = 1 everywhere).
  """
  u_BN = jax.random.uniform(key, (batch, n_blocks))
  if antithetic:
    n = batch * n_blocks
    u_BN = (u_BN / n + jnp.asarray(_strata(batch, n_blocks), jnp.float32) / n) % 1.0
  return clip_min + (clip_max - clip_min) * u_BN


def valid_masked_counts(block_size: int, clip_min, clip_max):
  """Boolean [block_size + 1]: which numbers of masked tokens per block resampling accepts.

  As in the reference, the lower bound is enforced only when clip_min > 1e-3 and the upper
  bound only when clip_max < 1. All True means resampling never redraws anything. NumPy
  (static) for Python floats, a jax array for array bounds (e.g. traced, or vmapped over a grid);
  both compare in float32.
  """
  xp = jnp if isinstance(clip_min, jax.Array) or isinstance(clip_max, jax.Array) else np
  f32 = lambda x: xp.asarray(x, xp.float32)  # both paths compare in float32, so they agree
  lo, hi = f32(clip_min), f32(clip_max)
  frac = f32(xp.arange(block_size + 1)) / f32(block_size)
  return (xp.where(lo > f32(NO_LOWER_CLIP), frac >= lo, True) &
          xp.where(hi < f32(1.0), frac <= hi, True))


def has_valid_masked_count(block_size: int, clip_min: float, clip_max: float) -> bool:
  return bool(valid_masked_counts(block_size, clip_min, clip_max).any())


def _binomial_log_pmf(n: int, p_BN):
  k = jnp.arange(n + 1, dtype=jnp.float32)
  log_choose = (jax.lax.lgamma(n + 1.0) - jax.lax.lgamma(k + 1.0) - jax.lax.lgamma(n - k + 1.0))
  p = p_BN[..., None]
  return log_choose + jax.scipy.special.xlogy(k, p) + jax.scipy.special.xlog1py(n - k, -p)


def sample_masked(key, p_BN, block_size: int, clip_min=0.0, clip_max=1.0, resample: bool = False):
  """Which tokens to mask, [B, N * block_size] bool; token i of block b masked w.p. p_BN[:, b].

  Without resampling each token is an independent Bernoulli(p). With resampling, the
  reference redraws a whole block until its masked fraction lies in [clip_min, clip_max];
  the accepted draw is distributed as Bernoulli(p)^L' conditioned on its count K being
  valid, i.e. K ~ Binomial(L', p) truncated to the valid counts, then a uniformly random
  subset of K positions (the i.i.d. draw is exchangeable). We sample exactly that: K from
  the truncated binomial pmf, positions from the ranks of uniform noise; no loop, so it jits.
  The bounds may be arrays (traced): the result equals the one for the same Python floats.
  """
  batch, n_blocks = p_BN.shape
  ok_K = valid_masked_counts(block_size, clip_min, clip_max)
  key_count, key_pos = jax.random.split(key)
  u_BNL = jax.random.uniform(key_pos, (batch, n_blocks, block_size))
  iid_BL = (u_BNL < p_BN[..., None]).reshape(batch, -1)
  static = isinstance(ok_K, np.ndarray)
  if not resample or (static and ok_K.all()):
    return iid_BL
  log_pmf_BNK = jnp.where(ok_K, _binomial_log_pmf(block_size, p_BN), -jnp.inf)
  count_BN = jax.random.categorical(key_count, log_pmf_BNK)
  rank_BNL = jnp.argsort(jnp.argsort(u_BNL, axis=-1), axis=-1)
  resampled_BL = (rank_BNL < count_BN[..., None]).reshape(batch, -1)
  return resampled_BL if static else jnp.where(ok_K.all(), iid_BL, resampled_BL)


CAPACITY_STDS = 5.0  # the tightest pair exceeds its capacity with chance ~3e-7


def pair_capacity(batch: int, n_blocks: int, block_size: int, schedule: str, clip_min: float,
                  clip_max: float, resample: bool) -> int:
  """A bound that the masked count of a pair of rows (2i, 2i+1) exceeds only rarely: over the
  pairs, the largest expected count plus CAPACITY_STDS standard deviations, under antithetic t (in
  `folded_rows` order, masked as `sample_masked` masks). Each block's t is taken at the top of
  its stratum, where the move chance and so the count are largest. `batch` must be even."""
  if batch % 2:
    raise ValueError(f"pairs of rows need an even batch, got {batch}")
  top_BN = (_strata(batch, n_blocks) + 1) / (batch * n_blocks)
  with jax.ensure_compile_time_eval():
    t_BN = jnp.asarray(clip_min + (clip_max - clip_min) * top_BN, jnp.float32)
    log_pmf_BNK = np.asarray(_binomial_log_pmf(block_size, move_chance_and_weight(
        t_BN, schedule)[0]), np.float64)
  if resample:
    log_pmf_BNK = np.where(valid_masked_counts(block_size, clip_min, clip_max), log_pmf_BNK,
                           -np.inf)
  pmf_BNK = np.exp(log_pmf_BNK - log_pmf_BNK.max(-1, keepdims=True))
  pmf_BNK /= pmf_BNK.sum(-1, keepdims=True)
  k = np.arange(block_size + 1)
  mean_BN = pmf_BNK @ k
  var_BN = pmf_BNK @ np.square(k) - np.square(mean_BN)
  pair = lambda a_BN: a_BN.reshape(batch // 2, -1).sum(1)
  bound = pair(mean_BN) + CAPACITY_STDS * np.sqrt(np.maximum(pair(var_BN), 0.0))
  return int(min(np.ceil(bound.max()), 2 * n_blocks * block_size))
