"""The fused residual + dropout + LayerNorm kernel against its XLA reference (interpreted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config
from jax_helpers import lowered_for
from conftest import (assert_same_model_loss_and_gradients, random_params, random_tokens,
                      tiny_model)

from bd3jax import config as config_lib
from bd3jax import train
from bd3jax.kernels import layer_norm, platform
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import DiT, layer_ops
from bd3jax.model.dropout import keep_bits
from bd3jax.model.transformer import init_cache


def inputs(seed, b, t, d, dtype, rate, adaln=True, key_impl="threefry2x32"):
  ks = jax.random.split(jax.random.key(seed), 8)
  x = jax.random.normal(ks[0], (b, t, d)) * 2 + 1
  branch = jax.random.normal(ks[1], (b, t, d)).astype(dtype)
  if adaln:
    gate, shift, scale = (jax.random.normal(k, (b, 1, d)) for k in ks[2:5])
  else:
    gate, shift, scale = 1.0, None, None
  weight = 1 + 0.1 * jax.random.normal(ks[5], (d,))
  key = jax.random.key(seed, impl=key_impl)
  keep = keep_bits(key, (b, t, d), rate) if rate else None
  cotangents = [jax.random.normal(k, shape) for k, shape in
                zip(jax.random.split(ks[6], 3), [(b, t, d), (b, t, d), (b, t, 1)])]
  return (x, branch, gate, weight, shift, scale), keep, cotangents


def outputs_and_grads(implementation, args, dropout_mask, cotangents, dtype, center=None):
  def fused(x, branch, gate, weight, shift, scale):
    return layer_ops.residual_layer_norm(x, branch, gate, dropout_mask, weight, shift, scale,
                                         center,
                                         out_dtype=dtype, implementation=implementation)
  out, vjp = jax.vjp(fused, *args)
  cts = tuple(ct.astype(o.dtype) for ct, o in zip(cotangents, out))
  return out, vjp(cts)


def relative_error(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)


@pytest.mark.parametrize("b,t,d,dtype,rate,adaln,key_impl", [
    (2, 16, 64, jnp.float32, 0.1, True, "threefry2x32"),
    (2, 24, 96, jnp.bfloat16, 0.3, True, "rbg"),  # 64 does not divide T; 2 lanes a byte
    (1, 64, 768, jnp.bfloat16, 0.0, True, "threefry2x32"),  # three chunks of 256, no dropout
    (3, 8, 32, jnp.float32, 0.1, False, "threefry2x32"),  # no adaLN: gate 1, no modulation
])
def test_kernel_matches_the_xla_formulas(b, t, d, dtype, rate, adaln, key_impl):
  args, keep, cotangents = inputs(t + d, b, t, d, dtype, rate, adaln, key_impl)
  assert (keep is None) == (rate == 0) and (keep is None or keep.lanes == (
      4 if key_impl == "threefry2x32" else 2))
  center = args[0].mean(-1, keepdims=True) + 0.5   # the reference's one-pass statistics
  ref_out, ref_grads = outputs_and_grads("xla", args, keep, cotangents, dtype, center)
  out, grads = outputs_and_grads("pallas", args, keep, cotangents, dtype)
  x_new, y, mean = out
  assert x_new.dtype == jnp.float32 and y.dtype == dtype and mean.shape == (b, t, 1)
  y_tolerance = 1e-5 if dtype == jnp.float32 else 1e-2   # a bf16 rounding may flip
  for got, want, tolerance in zip(out, ref_out, (1e-6, y_tolerance, 1e-6)):
    assert relative_error(got, want) < tolerance
  grad_tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, got, want in zip(("x", "branch", "gate", "weight", "shift", "scale"), grads,
                             ref_grads):
    if want is None:
      assert got is None, name
      continue
    assert jnp.shape(got) == jnp.shape(want), name
    assert relative_error(got, want) < grad_tolerance, name
  if rate:   # dropout really drops: the branch's gradient is zero at the dropped elements
    assert 0.5 * rate < float(jnp.mean(grads[1] == 0)) < 2 * rate


def test_every_output_element_is_written():
  """The interpreter fills outputs with NaN before the kernels run; none may survive."""
  (x, branch, gate, weight, shift, scale), keep, (dxn, dy, dmean) = inputs(
      0, 2, 24, 96, jnp.float32, 0.1)
  cfg = layer_norm._Config(24, 96, forward_rows=8, rows=8, tile=4, lanes=4, drop_scale=1.1,
                           out_dtype=jnp.dtype(jnp.float32), interpret=True)
  xn, y, mean, rstd = layer_norm._forward(x, branch, gate, keep.bits, weight, shift, scale, cfg)
  grads = layer_norm._backward(xn, mean, rstd, dy, dxn, dmean[..., 0], branch, gate, keep.bits,
                               weight, scale, cfg)
  assert grads[2].shape == (2, 3, 96)   # a sum per program of 8 rows
  for out in (xn, y, mean, rstd, *grads):
    assert np.isfinite(out).all()


def test_model_loss_and_gradients_identical_with_xla_and_pallas(rng):
  """A training pass with dropout: the kernel sees the same masks as the XLA formulas."""
  model = dict(n_layers=2, n_heads=2, dropout=0.1)
  assert_same_model_loss_and_gradients(rng, 16, 4, dict(model, layer_norm="xla"),
                                       dict(model, layer_norm="pallas"), jax.random.key(3))


def test_unknown_implementation_mismatched_mask_and_other_backends_are_refused(monkeypatch):
  args, keep, _ = inputs(0, 1, 8, 64, jnp.float32, 0.1)
  x, branch, gate, weight, shift, scale = args
  with pytest.raises(ValueError, match="model.layer_norm 'triton' is not one of"):
    layer_ops.residual_layer_norm(x, branch, gate, keep, weight, shift, scale, None,
                                  out_dtype=jnp.float32, implementation="triton")
  with pytest.raises(ValueError, match="does not pack 4 elements"):
    layer_norm.residual_layer_norm(x, branch, gate, weight, shift, scale, out_dtype=jnp.float32,
                                   keep_BTM=keep.bits[..., :8])
  config = tiny_config.get_config()
  config.model.layer_norm = "triton"
  with pytest.raises(ValueError, match="model.layer_norm 'triton'"):
    config_lib.validate(config)
  monkeypatch.setattr(platform, "backend", lambda: "tpu")
  with pytest.raises(ValueError, match="compiles for GPU only .*'tpu'.*use 'xla'"):
    layer_ops.residual_layer_norm(x, branch, gate, keep, weight, shift, scale, None,
                                  out_dtype=jnp.float32, implementation="pallas")


def test_train_step_lowers_with_the_kernel(monkeypatch):
  """Each LayerNorm after a residual branch (both of a block's but the first block's first,
  and the final one) is one forward and one backward kernel."""
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  config = tiny_config.get_config()
  config.model.layer_norm = "pallas"
  task = train.Task.from_config(config, 64, 63)
  state = jax.eval_shape(lambda: train.init_state(task, task.init_params(jax.random.key(0))))
  batch = {"tokens": jax.ShapeDtypeStruct((4, config.length), jnp.int32)}
  module = lowered_for("cuda", train.jit_train_step(task), state, batch)
  for kernel in ("residual_layer_norm_fwd", "residual_layer_norm_bwd"):
    assert module.count(f'name = "{kernel}"') == 2 * config.model.n_layers


def test_kernel_resources_captures_both_kernels():
  """benchmarks/kernel_resources.py's Triton IR: the forward kernel has no loop (one tile of
  rows a program), the backward one loop over its rows; three chunks of 256 for D = 768."""
  from benchmarks import kernel_resources
  forward, backward = kernel_resources.layer_norm_modules(128, 768, jnp.dtype(jnp.bfloat16))
  assert "tt.func public @residual_layer_norm_fwd(" in forward and "scf.for" not in forward
  assert "tt.func public @residual_layer_norm_bwd(" in backward
  assert backward.count("scf.for") == 1
  assert forward.count("tt.store") == 2 * 3 + 2   # x' and y per chunk, mean and rstd


def test_decoding_gives_the_same_logits_with_xla_and_pallas(rng):
  """The sampler's path: a few tokens against the KV cache, no dropout."""
  mask = AttentionMask(MaskKind.TRAINING, 16, 4)
  tokens = random_tokens(rng, 2, 32)
  params = random_params(tiny_model(), tokens, mask)

  def decode(implementation):
    model = tiny_model(layer_norm=implementation)
    cache = init_cache(model.cfg, 2, 16)
    logits, _ = model.apply({"params": params, "cache": cache}, tokens[:, :4], None, 0,
                            method=DiT.decode, mutable=["cache"])
    return logits

  np.testing.assert_allclose(decode("pallas"), decode("xla"), rtol=1e-5, atol=1e-6)
