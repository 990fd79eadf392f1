import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MASK_ID, apply_fn, random_params, random_tokens, tiny_model

from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import DiT, ModelConfig, dense_attention
from bd3jax.model.attention import attention
from bd3jax.model.transformer import DecodeAt, timestep_embedding


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_small_model_has_the_reference_parameter_count():
  cfg = ModelConfig(vocab_size=50258, n_layers=12, d_model=768, n_heads=12, cond_dim=128)
  mask = AttentionMask(MaskKind.TRAINING, 16, 4)
  shapes = jax.eval_shape(lambda: DiT(cfg).init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32), None, mask))
  params = nn.unbox(shapes["params"])
  total = count(params)
  without_io = total - count(params["vocab_embed"]) - count(params["output_layer"]["linear"])
  assert round(total / 1e6, 1) == 169.6
  assert round(without_io / 1e6, 1) == 92.4


def test_every_parameter_has_logical_axes():
  model = tiny_model()
  mask = AttentionMask(MaskKind.TRAINING, 8, 4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), None, mask)
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == b.value.ndim
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["vocab_embed"]) == ("vocab", "embed")
  assert tuple(specs["blocks_0"]["mlp_0"]["kernel"]) == ("embed", "mlp")


def test_ar_variant_has_no_adaln_and_zero_init_output():
  model = tiny_model(adaln=False)
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, 8, 1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), None, mask)["params"])
  assert "sigma_map" not in params and "adaLN_modulation" not in params["blocks_0"]
  assert "adaLN_modulation" not in params["output_layer"]
  bd3 = nn.unbox(tiny_model().init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), None, mask)["params"])
  assert "sigma_map" in bd3
  assert not np.any(bd3["output_layer"]["linear"]["kernel"])
  assert not np.any(bd3["blocks_0"]["adaLN_modulation"]["kernel"])


def test_time_conditioning_changes_the_output(rng):
  model = tiny_model(time_conditioning=True)
  mask = AttentionMask(MaskKind.FULL, 8, 8)
  x = random_tokens(rng, 2, 8)
  params = random_params(model, x, mask)
  a = model.apply({"params": params}, x, jnp.array([0.1, 0.1]), mask)
  b = model.apply({"params": params}, x, jnp.array([2.0, 2.0]), mask)
  assert not np.allclose(a, b)
  off = tiny_model(time_conditioning=False)
  c = off.apply({"params": params}, x, jnp.array([0.1, 0.1]), mask)
  d = off.apply({"params": params}, x, jnp.array([2.0, 2.0]), mask)
  np.testing.assert_array_equal(c, d)


def test_timestep_embedding_is_cos_then_sin():
  emb = timestep_embedding(jnp.array([0.0, 1.5]))
  assert emb.shape == (2, 256)
  np.testing.assert_allclose(emb[0, :128], 1.0)
  np.testing.assert_allclose(emb[0, 128:], 0.0)
  f = np.exp(-np.log(10000) * np.arange(128) / 128)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(1.5 * f), np.sin(1.5 * f)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,Lb", [(8, 1), (16, 4), (16, 16), (12, 3)])
def test_vectorised_training_forward_is_exact(rng, L, Lb):
  """x_t-half logits of the 2L pass equal, block by block, a pass over [x_0 blocks < b, x_t block b]."""
  model = tiny_model()
  k1, k2, k3 = jax.random.split(rng, 3)
  x0 = random_tokens(k1, 2, L)
  xt = jnp.where(jax.random.bernoulli(k2, 0.5, x0.shape), MASK_ID, x0)
  train_mask = AttentionMask(MaskKind.TRAINING, L, Lb)
  params = random_params(model, jnp.concatenate([xt, x0], 1), train_mask)
  fn = apply_fn(model, params)
  logits = fn(jnp.concatenate([xt, x0], 1), None, train_mask)
  assert logits.shape == (2, L, model.cfg.vocab_size)
  for b in range(L // Lb):
    n = (b + 1) * Lb
    seq = jnp.concatenate([x0[:, :b * Lb], xt[:, b * Lb:n]], 1)
    ref = fn(seq, None, AttentionMask(MaskKind.BLOCK_CAUSAL, n, Lb))[:, b * Lb:]
    np.testing.assert_allclose(logits[:, b * Lb:n], ref, rtol=1e-4, atol=1e-4)


def test_single_block_training_pass_equals_full_attention_on_xt(rng):
  L = 8
  model = tiny_model()
  x0 = random_tokens(rng, 2, L)
  xt = x0.at[:, ::2].set(MASK_ID)
  mask = AttentionMask(MaskKind.TRAINING, L, L)
  params = random_params(model, jnp.concatenate([xt, x0], 1), mask)
  fn = apply_fn(model, params)
  np.testing.assert_allclose(fn(jnp.concatenate([xt, x0], 1), None, mask),
                             fn(xt, None, AttentionMask(MaskKind.FULL, L, L)), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_logits(rng):
  L = 8
  mask = AttentionMask(MaskKind.TRAINING, L, 4)
  x = random_tokens(rng, 2, 2 * L)
  params = random_params(tiny_model(), x, mask)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  f32 = tiny_model().apply({"params": params}, x, None, mask)
  bf16 = tiny_model(dtype="bfloat16").apply({"params": params}, x, None, mask)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.15 * float(jnp.abs(f32).max()))


def test_dropout_only_in_training(rng):
  model = tiny_model(dropout=0.5)
  mask = AttentionMask(MaskKind.FULL, 8, 8)
  x = random_tokens(rng, 2, 8)
  params = random_params(model, x, mask)
  run = lambda train, k: model.apply({"params": params}, x, None, mask, train=train, rngs={"dropout": k})
  np.testing.assert_array_equal(run(False, jax.random.key(0)), run(False, jax.random.key(1)))
  assert not np.allclose(run(True, jax.random.key(0)), run(True, jax.random.key(1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_implementations_agree(rng, dtype):
  mask = AttentionMask(MaskKind.TRAINING, 16, 4)
  q, k, v = (jax.random.normal(key, (2, 32, 4, 8), dtype) for key in jax.random.split(rng, 3))
  dense = attention(q, k, v, mask, "dense").astype(jnp.float32)
  xla = attention(q, k, v, mask, "xla").astype(jnp.float32)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(dense, xla, atol=tol, rtol=tol)
  # Obviously-correct loop over queries.
  m = mask.dense()
  qf, kf, vf = (np.asarray(a, np.float32) for a in (q, k, v))
  for t in (0, 5, 17, 31):
    s = np.einsum("bhk,bshk->bhs", qf[:, t], kf) / np.sqrt(8)
    s = np.where(m[t], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(dense[:, t], np.einsum("bhs,bshk->bhk", p, vf), atol=tol, rtol=tol)


def test_unknown_attention_implementation(rng):
  mask = AttentionMask(MaskKind.FULL, 4, 4)
  q = jnp.zeros((1, 4, 2, 4))
  with pytest.raises(ValueError, match="model.attention"):
    attention(q, q, q, mask, "flash")
  assert dense_attention(q, q, q, mask.dense()).shape == q.shape


def test_a_head_replaces_the_output_projection(rng):
  """`head` gets the final LayerNorm's rows and the projection's kernel and bias in the compute
  dtype, and its result is returned; with a decode `select`, a second head is refused."""
  L = 8
  model = tiny_model(dtype="bfloat16")
  mask = AttentionMask(MaskKind.TRAINING, L, 4)
  x = random_tokens(rng, 2, 2 * L)
  params = random_params(model, x, mask)
  logits = model.apply({"params": params}, x, None, mask)
  seen = []

  def head(x_BTD, kernel_DV, bias_V):
    seen.append((x_BTD.shape, x_BTD.dtype, kernel_DV.dtype, bias_V.shape))
    return (x_BTD @ kernel_DV + bias_V)[:, ::2]
  picked = model.apply({"params": params}, x, None, mask, head=head)
  assert seen == [((2, L, 32), jnp.bfloat16, jnp.bfloat16, (MASK_ID + 1,))]
  np.testing.assert_array_equal(picked, logits[:, ::2])
  with pytest.raises(ValueError, match="pass one"):
    model.apply({"params": params}, x[:, :4], None, DecodeAt(0, jnp.zeros(2, jnp.int32)),
                head=head)
