"""bd3jax.model.dropout: drop rates, scaling and the 16-bit draws, for Threefry and rbg keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bd3jax.model.dropout import DRAW_BITS, dropout, random_uint16

IMPLS = ["threefry2x32", "rbg"]


def five_sigma(p, n):
  return 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(8, 64, 96), (3, 37, 13), (20_000,)])
def test_drop_rate_and_scale(impl, rate, shape):
  x = jnp.ones(shape, jnp.float32)
  out = np.asarray(dropout(x, rate, jax.random.key(1, impl=impl)))
  threshold = round(rate * 2 ** DRAW_BITS)
  p = threshold / 2 ** DRAW_BITS
  np.testing.assert_array_equal(np.unique(out), [0.0, np.float32(1 / (1 - p))])
  dropped = out == 0
  assert abs(dropped.mean() - p) < five_sigma(p, dropped.size)
  for lane in range(4):  # the draws sharing one Threefry evaluation (or one rbg word)
    part = dropped[..., lane::4]
    assert abs(part.mean() - p) < five_sigma(p, part.size), lane
  assert abs(out.mean() - 1.0) < five_sigma(p, out.size) / (1 - p)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(4, 16, 96), (3, 5, 13), (2, 9), (7,), (3, 1), ()])
def test_kept_elements_are_the_draws_at_or_above_the_threshold(impl, shape):
  """The keep bits packed per evaluation and unpacked by the select are the draws' order."""
  key = jax.random.key(11, impl=impl)
  rate = 0.3
  kept = np.asarray(dropout(jnp.ones(shape, jnp.float32), rate, key)) != 0
  draws = np.asarray(random_uint16(key, shape))
  np.testing.assert_array_equal(kept, draws >= round(rate * 2 ** DRAW_BITS))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_is_the_scaled_mask(impl):
  key = jax.random.key(5, impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, 8, 37))
  w = jax.random.normal(jax.random.key(1), x.shape)
  out, grad = jax.value_and_grad(lambda x: jnp.sum(dropout(x, 0.25, key) * w))(x)
  keep = np.asarray(random_uint16(key, x.shape)) >= round(0.25 * 2 ** DRAW_BITS)
  np.testing.assert_allclose(grad, np.where(keep, np.asarray(w) / 0.75, 0.0), rtol=1e-6)
  np.testing.assert_allclose(out, np.sum(np.where(keep, np.asarray(x) / 0.75, 0) * w),
                             atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_draws_are_uniform_and_independent(impl):
  u = np.asarray(random_uint16(jax.random.key(7, impl=impl), (16, 64, 256)))
  assert u.dtype == np.uint32 and u.min() >= 0 and u.max() < 2 ** DRAW_BITS
  for byte in (u >> 8, u & 0xFF):  # chi-square over 256 cells, 255 degrees of freedom
    counts = np.bincount(byte.ravel(), minlength=256)
    expected = u.size / 256
    assert ((counts - expected) ** 2 / expected).sum() < 255 + 6 * np.sqrt(2 * 255)
  centred = u.reshape(-1, 4).astype(np.float64) - (2 ** DRAW_BITS - 1) / 2
  corr = np.corrcoef(centred, rowvar=False)
  assert np.abs(corr - np.eye(4)).max() < 5 / np.sqrt(centred.shape[0])
  rows = u.reshape(16 * 64, 256)
  assert len({r.tobytes() for r in rows}) == len(rows)


def test_keys_decide_the_draws():
  shape = (4, 8, 12)
  draw = lambda key: np.asarray(random_uint16(key, shape))
  np.testing.assert_array_equal(draw(jax.random.key(3)), draw(jax.random.key(3)))
  np.testing.assert_array_equal(draw(jax.random.key(3)), draw(jax.random.PRNGKey(3)))
  assert (draw(jax.random.key(3)) != draw(jax.random.key(4))).mean() > 0.99
  assert (draw(jax.random.key(3)) != draw(jax.random.key(3, impl="rbg"))).mean() > 0.99
  jitted = jax.jit(lambda key: random_uint16(key, shape))
  np.testing.assert_array_equal(jitted(jax.random.key(3)), draw(jax.random.key(3)))


def test_dtype_scalar_and_no_op():
  key = jax.random.key(0)
  x = jnp.arange(1, 65, dtype=jnp.bfloat16).reshape(8, 8)
  out = dropout(x, 0.5, key)
  assert out.dtype == jnp.bfloat16
  kept = np.asarray(out, np.float32) != 0
  np.testing.assert_array_equal(np.asarray(out, np.float32)[kept],
                                2 * np.asarray(x, np.float32)[kept])
  assert dropout(jnp.float32(3.0), 0.5, key).shape == ()
  assert random_uint16(key, ()).shape == ()
  assert dropout(x, 0.0, key) is x
  assert dropout(x, 1e-6, key) is x  # rounds to 0 at 16-bit resolution


@pytest.mark.parametrize("rate", [1.0, -0.1, 1 - 1e-6])
def test_rate_errors(rate):
  with pytest.raises(ValueError, match="dropout rate"):
    dropout(jnp.ones(4), rate, jax.random.key(0))


@pytest.mark.parametrize("shape", [(2 ** 34,), (2, 2 ** 17, 2 ** 17)])
def test_rows_of_2_to_the_32_draws_raise(shape):
  with pytest.raises(ValueError, match="rows of 2\\^32"):
    jax.eval_shape(lambda: random_uint16(jax.random.key(0), shape))
