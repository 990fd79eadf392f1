"""The network's adaLN-modulated LayerNorm (alone, or after a residual branch joins the stream:
`residual_layer_norm`, which can run as one Pallas kernel), tanh GELU and output projection,
with backward passes that read less.

Forward values are those of the plain formulas, op for op, except the LayerNorm's statistics
when it is given a center (below). The passes are written so that XLA's fused step moves fewer
bytes over [B, T, D] and [B, T, F] activations:
- `modulated_layer_norm` keeps the rows' mean and 1/std from the forward pass (two [B, T] arrays)
  and gets the weight's, shift's and scale's gradients from two sums over T of the incoming
  gradient (dy and dy * x̂); autodiff recomputed the statistics inside each of four fused
  products, wrote each [B, T, D] product in float32, then reduced it in another kernel. Given
  each row's `center` (a value near its mean: the network passes the mean of the same token's
  previous LayerNorm), the statistics are the first two moments of x - center, sums that XLA
  computes in one pass over x, in the kernel that writes x (the residual add); without, the
  mean and then the squared deviations from it, two passes.
- `gelu_tanh` keeps its input, which the MLP's first matmul wrote anyway, and recomputes tanh in
  the backward pass; autodiff kept a second [B, T, F] array, tanh of the input.
- `linear` gets the bias's gradient from the kernel's gradient matmul, as one more row of it
  (x with a column of ones); autodiff read the whole incoming gradient (the [B, L, V] logits'
  at the output layer) once more to sum it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bd3jax.kernels import layer_norm as layer_norm_kernel
from bd3jax.model.dropout import KeepBits, apply_keep_bits

LN_EPS = layer_norm_kernel.LN_EPS


def _row_stats(x_BTD, center_BT1):
  if center_BT1 is None:  # the mean, then the mean squared deviation from it
    mean_BT1 = x_BTD.mean(-1, keepdims=True)
    var_BT1 = jnp.square(x_BTD - mean_BT1).mean(-1, keepdims=True)
  else:  # one pass; the variance cancels only as far as (mean - center)^2 outgrows it
    xc_BTD = x_BTD - center_BT1
    m1_BT1 = xc_BTD.mean(-1, keepdims=True)
    mean_BT1 = center_BT1 + m1_BT1
    var_BT1 = jnp.maximum(jnp.square(xc_BTD).mean(-1, keepdims=True) - jnp.square(m1_BT1), 0.0)
  return mean_BT1, jax.lax.rsqrt(var_BT1 + LN_EPS)


def _normalize_modulate(x_BTD, mean_BT1, rstd_BT1, weight_D, shift_B1D, scale_B1D):
  return (x_BTD - mean_BT1) * rstd_BT1 * weight_D * (1 + scale_B1D) + shift_B1D


@jax.custom_vjp
def _layer_norm(x_BTD, weight_D, shift_B1D, scale_B1D, center_BT1):
  mean_BT1, rstd_BT1 = _row_stats(x_BTD, center_BT1)
  return _normalize_modulate(x_BTD, mean_BT1, rstd_BT1, weight_D, shift_B1D, scale_B1D), mean_BT1


def _layer_norm_fwd(x_BTD, weight_D, shift_B1D, scale_B1D, center_BT1):
  # The barrier keeps the statistics as arrays: without it XLA recomputes them in every
  # fused consumer of the backward pass, which then cannot be fused into the sums over T.
  mean_BT1, rstd_BT1 = jax.lax.optimization_barrier(_row_stats(x_BTD, center_BT1))
  y_BTD = _normalize_modulate(x_BTD, mean_BT1, rstd_BT1, weight_D, shift_B1D, scale_B1D)
  return (y_BTD, mean_BT1), (x_BTD, mean_BT1, rstd_BT1, weight_D, shift_B1D, scale_B1D,
                             center_BT1)


def _sum_to(a, shape):
  """`a` summed down to `shape`, over the axes that broadcasting `shape` to a.shape added or
  stretched."""
  a = a.sum(tuple(range(a.ndim - len(shape))))
  return a.sum(tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1), keepdims=True)


def _layer_norm_bwd(residuals, cotangents):
  x_BTD, mean_BT1, rstd_BT1, weight_D, shift, scale, center = residuals
  dy_BTD, dmean_BT1 = cotangents
  xhat_BTD = (x_BTD - mean_BT1) * rstd_BT1
  dshift_B1D = dy_BTD.sum(1, keepdims=True)
  dyxhat_B1D = (dy_BTD * xhat_BTD).sum(1, keepdims=True)   # scale and weight both need it
  gain_B1D = (1 + scale) * weight_D
  dxhat_BTD = dy_BTD * gain_B1D
  dx_BTD = rstd_BT1 * (dxhat_BTD - dxhat_BTD.mean(-1, keepdims=True)
                       - xhat_BTD * (dxhat_BTD * xhat_BTD).mean(-1, keepdims=True))
  dx_BTD = dx_BTD + dmean_BT1 / x_BTD.shape[-1]
  dweight_D = (dyxhat_B1D * (1 + scale)).reshape(-1, weight_D.shape[0]).sum(0)
  dcenter = None if center is None else jnp.zeros_like(center)  # mean and var do not vary with it
  return (dx_BTD, dweight_D, _sum_to(dshift_B1D, jnp.shape(shift)),
          _sum_to(dyxhat_B1D * weight_D, jnp.shape(scale)), dcenter)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _broadcasts_to(shape, target) -> bool:
  try:
    return jnp.broadcast_shapes(shape, target) == target
  except ValueError:
    return False


def modulated_layer_norm(x_BTD, weight_D, shift_B1D=None, scale_B1D=None, center_BT1=None):
  """(LayerNorm(x) * weight * (1 + scale) + shift, the rows' mean [B, T, 1]) in float32 (eps
  1e-5).

  Without `shift_B1D`/`scale_B1D`, the plain weight-only LayerNorm. Each of them must broadcast
  to [B, 1, D] (one modulation per sequence, as adaLN's), e.g. [B, 1, D], [1, 1, D] or [D].
  `center_BT1`, a value near each row's mean (e.g. the mean this function returned for the same
  rows before a residual branch was added), lets the statistics take one pass over x instead of
  two; its gradient is zero (the statistics do not vary with it). The mean is differentiable
  as usual.
  """
  if x_BTD.ndim != 3:
    raise ValueError(f"modulated_layer_norm takes [B, T, D] rows, got shape {x_BTD.shape}")
  x_BTD = x_BTD.astype(jnp.float32)
  zeros = jnp.zeros((1, 1, x_BTD.shape[-1]), jnp.float32)
  shift_B1D = zeros if shift_B1D is None else shift_B1D
  scale_B1D = zeros if scale_B1D is None else scale_B1D
  row = (x_BTD.shape[0], 1, x_BTD.shape[2])
  for name, a in (("shift", shift_B1D), ("scale", scale_B1D)):
    if not _broadcasts_to(jnp.shape(a), row):
      raise ValueError(f"{name} of shape {jnp.shape(a)} does not broadcast to one row per "
                       f"sequence, [B, 1, D] = {list(row)}")
  if center_BT1 is not None:
    if jnp.shape(center_BT1) != x_BTD.shape[:2] + (1,):
      raise ValueError(f"center of shape {jnp.shape(center_BT1)} is not one value per row, "
                       f"[B, T, 1] = {list(x_BTD.shape[:2] + (1,))}")
    center_BT1 = center_BT1.astype(jnp.float32)
  return _layer_norm(x_BTD, weight_D, shift_B1D, scale_B1D, center_BT1)


LAYER_NORMS = ("xla", "pallas")


def residual_layer_norm(x_BTD, branch_BTD, gate_B1D, dropout_mask: KeepBits | None, weight_D,
                        shift_B1D, scale_B1D, center_BT1, *, out_dtype,
                        implementation: str = "xla"):
  """(x' = x + gate * dropout(branch) in float32, `modulated_layer_norm(x')` in `out_dtype`,
  the rows' mean): a block's residual branch joining the stream, then the next LayerNorm.

  `dropout_mask`: `dropout.keep_bits`'s (None: no dropout); `gate` broadcasts to [B, 1, D].
  `implementation`: "xla" runs the formulas above (XLA fuses them into several kernels),
  "pallas" `kernels.layer_norm`'s kernels (one pass forward, one backward; GPU, or
  interpreted on CPU; the statistics in two passes over registers, so `center` goes unused).
  """
  if implementation == "pallas":
    zeros = jnp.zeros((1, 1, x_BTD.shape[-1]), jnp.float32)
    mask = dropout_mask
    dropout = {} if mask is None else dict(keep_BTM=mask.bits, lanes=mask.lanes,
                                           drop_scale=mask.scale)
    return layer_norm_kernel.residual_layer_norm(
        x_BTD, branch_BTD, gate_B1D, weight_D, zeros if shift_B1D is None else shift_B1D,
        zeros if scale_B1D is None else scale_B1D, out_dtype=out_dtype, **dropout)
  if implementation != "xla":
    raise ValueError(f"model.layer_norm {implementation!r} is not one of {LAYER_NORMS}")
  x_BTD = x_BTD + gate_B1D * apply_keep_bits(branch_BTD.astype(jnp.float32), dropout_mask)
  y_BTD, mean_BT1 = modulated_layer_norm(x_BTD, weight_D, shift_B1D, scale_B1D, center_BT1)
  return x_BTD, y_BTD.astype(out_dtype), mean_BT1


def _gelu(x):
  return nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu_tanh(x):
  """The tanh approximation of GELU (flax's `nn.gelu(x, approximate=True)`), same dtype."""
  return _gelu(x)


def _gelu_fwd(x):
  return _gelu(x), x


def _gelu_bwd(x, g):
  # The barrier keeps XLA from merging the recomputation with the forward pass's.
  return jax.vjp(_gelu, jax.lax.optimization_barrier(x))[1](g)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def _matmul(a, b, a_axes, b_axes):
  return jax.lax.dot_general(a, b, ((a_axes, b_axes), ((), ())))


def linear(x_BTD, kernel_DV, bias_V):
  """x @ kernel + bias over the last axis, as flax's `nn.Dense` computes it (matmul, then the
  bias added in the inputs' dtype); x [..., D], kernel [D, V] and bias [V] of one dtype."""
  dtypes = {jnp.dtype(a.dtype) for a in (x_BTD, kernel_DV, bias_V)}
  if len(dtypes) > 1:
    raise ValueError(f"linear takes x, kernel and bias of one dtype, got {x_BTD.dtype}, "
                     f"{kernel_DV.dtype} and {bias_V.dtype}")
  if kernel_DV.ndim != 2 or kernel_DV.shape[0] != x_BTD.shape[-1] or (
      bias_V.shape != kernel_DV.shape[1:]):
    raise ValueError(f"linear takes x [..., D], kernel [D, V] and bias [V], got shapes "
                     f"{x_BTD.shape}, {kernel_DV.shape} and {bias_V.shape}")
  return _linear(x_BTD, kernel_DV, bias_V)


def _affine(x_BTD, kernel_DV, bias_V):
  return _matmul(x_BTD, kernel_DV, (x_BTD.ndim - 1,), (0,)) + bias_V


@jax.custom_vjp
def _linear(x_BTD, kernel_DV, bias_V):
  return _affine(x_BTD, kernel_DV, bias_V)


def _linear_fwd(x_BTD, kernel_DV, bias_V):
  return _affine(x_BTD, kernel_DV, bias_V), (x_BTD, kernel_DV)


def _linear_bwd(residuals, dy_BTV):
  x_BTD, kernel_DV = residuals
  rows = tuple(range(x_BTD.ndim - 1))
  x1_BTE = jnp.concatenate([x_BTD, jnp.ones((*x_BTD.shape[:-1], 1), x_BTD.dtype)], axis=-1)
  dkernel_bias_EV = _matmul(x1_BTE, dy_BTV, rows, rows)
  dx_BTD = _matmul(dy_BTV, kernel_DV, (dy_BTV.ndim - 1,), (1,))
  return dx_BTD, dkernel_bias_EV[:-1], dkernel_bias_EV[-1]


_linear.defvjp(_linear_fwd, _linear_bwd)
