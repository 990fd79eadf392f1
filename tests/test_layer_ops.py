"""bd3jax.model.layer_ops: the plain formulas' values, and autodiff's gradients of them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bd3jax.model.layer_ops import gelu_tanh, linear, modulated_layer_norm


def plain_layer_norm(x, weight, shift=None, scale=None):
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * weight
  return y if shift is None else y * (1 + scale) + shift


def inputs(seed, shape, modulation):
  """x with a large mean (as a residual stream may have), weight, and shift/scale or None."""
  b, _, d = shape
  kx, kw, ks, kc = jax.random.split(jax.random.key(seed), 4)
  x = 3.0 + 2.0 * jax.random.normal(kx, shape)
  weight = 1.0 + 0.3 * jax.random.normal(kw, (d,))
  if modulation is None:
    return x, weight, None, None
  rows = b if modulation == "per_row" else 1
  return (x, weight, 0.5 * jax.random.normal(ks, (rows, 1, d)),
          0.5 * jax.random.normal(kc, (rows, 1, d)))


MODULATIONS = [None, "per_row", "shared"]


def normed(*args, **kwargs):
  """modulated_layer_norm's rows, without the mean it also returns."""
  return modulated_layer_norm(*args, **kwargs)[0]


@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("shape", [(2, 7, 16), (3, 1, 64)])
def test_layer_norm_values_are_the_plain_formulas(modulation, shape):
  x, weight, shift, scale = inputs(0, shape, modulation)
  got, mean = jax.jit(modulated_layer_norm)(x, weight, shift, scale)
  want = jax.jit(plain_layer_norm)(x, weight, shift, scale)
  assert got.dtype == jnp.float32 and got.shape == shape
  np.testing.assert_array_equal(got, want)   # the same ops in the same order
  np.testing.assert_array_equal(mean, jax.jit(lambda x: x.mean(-1, keepdims=True))(x))


def test_layer_norm_takes_bfloat16_rows():
  x, weight, shift, scale = inputs(1, (2, 5, 32), "per_row")
  x = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(normed(x, weight, shift, scale),
                                plain_layer_norm(x, weight, shift, scale))


@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("shape", [(2, 7, 16), (4, 33, 48)])
def test_layer_norm_gradients_are_autodiffs(modulation, shape):
  x, weight, shift, scale = inputs(2, shape, modulation)
  dy = jax.random.normal(jax.random.key(3), shape)
  args = (x, weight) if modulation is None else (x, weight, shift, scale)

  def grads(fn):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * dy), argnums=tuple(range(len(args)))))(
        *args)

  got, want = grads(normed), grads(plain_layer_norm)
  for g, w, a in zip(got, want, args):
    assert g.shape == a.shape
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("shift_shape", [(16,), (1, 16), (2, 1, 16)])
def test_layer_norm_gradients_reach_every_shift_shape(shift_shape):
  x, weight, _, _ = inputs(6, (2, 5, 16), None)
  shift = jax.random.normal(jax.random.key(7), shift_shape)
  loss = lambda fn, s: jnp.sum(jnp.sin(fn(x, weight, s, 0.5 * s)))
  got = jax.grad(lambda s: loss(normed, s))(shift)
  want = jax.grad(lambda s: loss(plain_layer_norm, s))(shift)
  assert got.shape == shift_shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shift_shape", [(2, 5, 16), (5, 16), (3, 1, 16)])
def test_layer_norm_refuses_a_modulation_that_varies_along_t(shift_shape):
  x, weight, _, _ = inputs(8, (2, 5, 16), None)
  with pytest.raises(ValueError, match="broadcast to one row per sequence"):
    modulated_layer_norm(x, weight, jnp.zeros(shift_shape), jnp.zeros(shift_shape))
  with pytest.raises(ValueError, match=r"\[B, T, D\] rows"):
    modulated_layer_norm(x[0], weight)


def test_layer_norm_gradient_of_a_constant_row_is_finite():
  x = jnp.ones((1, 3, 8)).at[0, 1].set(jnp.arange(8.0))
  for center in (None, jnp.full((1, 3, 1), 0.5)):
    g = jax.grad(lambda x: jnp.sum(normed(x, jnp.ones(8), center_BT1=center) ** 3))(x)
    assert bool(jnp.all(jnp.isfinite(g)))


def near_means(x, seed):
  """Per-row values within about one standard deviation of each row's mean."""
  noise = jax.random.normal(jax.random.key(seed), x.shape[:2] + (1,))
  return x.mean(-1, keepdims=True) + noise * x.std(-1, keepdims=True)


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_layer_norm_centered_statistics_are_the_plain_formulas(modulation):
  """With a center, one pass of moments of x - center: the plain formulas' values to float32
  rounding, on rows of mean 3 and std 2."""
  x, weight, shift, scale = inputs(9, (3, 11, 48), modulation)
  got, mean = jax.jit(modulated_layer_norm)(x, weight, shift, scale, near_means(x, 10))
  np.testing.assert_allclose(got, plain_layer_norm(x, weight, shift, scale), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(mean, x.mean(-1, keepdims=True), rtol=1e-6)


def test_layer_norm_centered_statistics_keep_precision_far_from_zero():
  """Rows of mean 1000 and std 1: centered near the mean, the one-pass variance does not
  cancel (uncentered, E[x^2] - mean^2 would lose about 1e6 x float32's epsilon)."""
  x = 1000.0 + jax.random.normal(jax.random.key(11), (2, 9, 256))
  weight = jnp.ones(256)
  x64 = np.asarray(x, np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  got = normed(x, weight, center_BT1=near_means(x, 12))
  np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize("modulation", [None, "per_row"])
def test_layer_norm_centered_gradients_are_autodiffs(modulation):
  """Gradients through the rows and the returned mean; the center gets none."""
  x, weight, shift, scale = inputs(13, (2, 7, 32), modulation)
  dy = jax.random.normal(jax.random.key(14), x.shape)
  dmean = jax.random.normal(jax.random.key(15), x.shape[:2] + (1,))
  center = near_means(x, 16)

  def loss(x, weight, shift, scale, center):
    y, mean = modulated_layer_norm(x, weight, shift, scale, center)
    return jnp.sum(y * dy) + jnp.sum(mean * dmean)

  def plain_loss(x, weight, shift, scale, center):
    return (jnp.sum(plain_layer_norm(x, weight, shift, scale) * dy)
            + jnp.sum(x.mean(-1, keepdims=True) * dmean))

  argnums = (0, 1, 4) if modulation is None else (0, 1, 2, 3, 4)
  got = jax.grad(loss, argnums)(x, weight, shift, scale, center)
  want = jax.grad(plain_loss, argnums)(x, weight, shift, scale, center)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(jnp.abs(w).max()) + 1e-7)
  assert not np.asarray(got[-1]).any()


@pytest.mark.parametrize("center_shape", [(2, 5), (2, 1, 1), (2, 5, 16)])
def test_layer_norm_refuses_a_center_that_is_not_one_per_row(center_shape):
  x, weight, _, _ = inputs(17, (2, 5, 16), None)
  with pytest.raises(ValueError, match="one value per row"):
    modulated_layer_norm(x, weight, center_BT1=jnp.zeros(center_shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_tanh_is_flax_gelu_and_its_gradient(dtype):
  x = (4.0 * jax.random.normal(jax.random.key(4), (3, 5, 40))).astype(dtype)
  g = jax.random.normal(jax.random.key(5), x.shape).astype(dtype)
  flax_gelu = lambda x: nn.gelu(x, approximate=True)
  got = jax.jit(gelu_tanh)(x)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, jax.jit(flax_gelu)(x))

  def grad(fn):
    return jax.jit(lambda x, g: jax.vjp(fn, x)[1](g)[0])(x, g)

  got, want = grad(gelu_tanh), grad(flax_gelu)   # recomputed by the same ops
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("x_shape", [(2, 7, 24), (5, 24), (1, 1, 24)])
def test_linear_is_flax_dense_and_its_gradients_autodiffs(dtype, x_shape):
  kx, kk, kb, kg = jax.random.split(jax.random.key(6), 4)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  kernel = (0.2 * jax.random.normal(kk, (24, 40))).astype(dtype)
  bias = jax.random.normal(kb, (40,)).astype(dtype)
  dense = nn.Dense(40, dtype=dtype, param_dtype=dtype)
  flax_dense = lambda x, kernel, bias: dense.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  got = jax.jit(linear)(x, kernel, bias)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, jax.jit(flax_dense)(x, kernel, bias))

  g = jax.random.normal(kg, got.shape).astype(dtype)
  grads = lambda fn: jax.jit(lambda *a: jax.vjp(fn, *a)[1](g))(x, kernel, bias)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, want in zip(grads(linear), grads(flax_dense)):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * np.abs(np.asarray(want, np.float32)).max())


@pytest.mark.parametrize("shapes,dtypes", [
    (((2, 24), (24, 40), (40,)), (jnp.bfloat16, jnp.float32, jnp.float32)),
    (((2, 24), (24, 40), (40,)), (jnp.float32, jnp.float32, jnp.bfloat16)),
    (((2, 24), (20, 40), (40,)), (jnp.float32,) * 3),
    (((2, 24), (24, 40), (1, 40)), (jnp.float32,) * 3),
    (((2, 24), (24, 40, 1), (40, 1)), (jnp.float32,) * 3)])
def test_linear_refuses_mixed_dtypes_and_mismatched_shapes(shapes, dtypes):
  args = [jnp.zeros(shape, dtype) for shape, dtype in zip(shapes, dtypes)]
  with pytest.raises(ValueError, match="linear takes"):
    linear(*args)
