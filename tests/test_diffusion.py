import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import jax_helpers
from conftest import (MASK_ID, VOCAB, apply_fn, network, random_params, random_tokens,
                      tiny_model)

from bd3jax import diffusion, flops
from bd3jax.diffusion import LossConfig
from bd3jax.masks import AttentionMask, MaskKind


def test_subs_log_prob():
  logits = jnp.array([[[0.0, 1.0, 2.0, 50.0]]] * 2).reshape(1, 2, 4)
  x0 = jnp.array([[1, 2]])
  masked = jnp.array([[True, False]])
  out = diffusion.subs_log_prob(logits, x0, masked, mask_id=3)
  expected = 1.0 - np.log(np.exp(0) + np.exp(1) + np.exp(2))
  np.testing.assert_allclose(out, [[expected, 0.0]], rtol=1e-6)


def dense_target_log_prob(logits_BLV, target_BL, excluded_id):
  """The obvious float32 version: -inf at the excluded token, log_softmax, then a gather."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  if excluded_id is not None:
    logits_BLV = logits_BLV.at[..., excluded_id].set(-jnp.inf)
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), target_BL[..., None], -1)[..., 0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("excluded_id", [None, 0, 7])
def test_target_log_prob_matches_log_softmax_and_a_gather(rng, dtype, excluded_id):
  """Values and the logits' gradient (in the logits' dtype) against the float32 reference on
  fresh random logits, targets never the excluded token."""
  k_logits, k_target, k_g = jax.random.split(rng, 3)
  logits = (4.0 * jax.random.normal(k_logits, (3, 6, 50))).astype(dtype)
  target = jax.random.randint(k_target, (3, 6), 1, 50)
  if excluded_id is not None:
    target = jnp.where(target == excluded_id, 8, target)
  g = jax.random.normal(k_g, (3, 6))
  out = diffusion.target_log_prob(logits, target, excluded_id)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, dense_target_log_prob(logits, target, excluded_id),
                             rtol=1e-6, atol=1e-5)
  grad = jax.grad(lambda x: (diffusion.target_log_prob(x, target, excluded_id) * g).sum())(logits)
  expected = jax.grad(lambda x: (dense_target_log_prob(x, target, excluded_id) * g).sum())(
      logits.astype(jnp.float32))
  assert grad.dtype == dtype
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=tolerance)
  if excluded_id is not None:
    assert not grad[..., excluded_id].any()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_target_log_prob_over_wide_ranges_of_logits(rng, scale):
  """Rows of near-equal, ordinary and far-apart logits, rows whose largest logit comes first
  or last, and a row equal everywhere, with and without an excluded token."""
  logits = scale * jax.random.normal(rng, (4, 5, 97))
  logits = logits.at[0, 0].set(jnp.arange(97.0)).at[0, 1].set(-jnp.arange(97.0))
  logits = logits.at[0, 2].set(2.5)
  target = jnp.full((4, 5), 3)
  for excluded_id in (None, 0):
    np.testing.assert_allclose(diffusion.target_log_prob(logits, target, excluded_id),
                               dense_target_log_prob(logits, target, excluded_id),
                               rtol=1e-6, atol=1e-5)


def test_full_masking_block_size_one_is_the_ar_nll(rng):
  """L' = 1, t = 1: the NELBO is the NLL of the network run left to right, token by token."""
  L = 8
  cfg = LossConfig("bd3lm", L, 1, MASK_ID, clip_min=1.0, clip_max=1.0)
  model = tiny_model()
  x0 = random_tokens(rng, 2, L)
  params = random_params(model, jnp.concatenate([x0, x0], 1), AttentionMask(MaskKind.TRAINING, L, 1))
  fn = apply_fn(model, params)
  loss, aux = diffusion.nelbo(fn, x0, jax.random.key(0), cfg, train=False)
  nll = []
  for i in range(L):
    seq = jnp.concatenate([x0[:, :i], jnp.full((2, 1), MASK_ID)], 1)
    logits = fn(seq, None, AttentionMask(MaskKind.BLOCK_CAUSAL, i + 1, 1))[:, -1]
    logits = logits.at[:, MASK_ID].set(-jnp.inf)
    nll.append(-jax.nn.log_softmax(logits)[jnp.arange(2), x0[:, i]])
  ar_nll = jnp.stack(nll, 1)
  np.testing.assert_allclose(loss, ar_nll.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["token_loss"], ar_nll, rtol=1e-5, atol=1e-5)


def test_block_nelbo_is_the_loss_averaged_per_block(rng):
  L, Lb = 16, 4
  cfg = LossConfig("bd3lm", L, Lb, MASK_ID)
  model = tiny_model()
  x0 = random_tokens(rng, 3, L)
  params = random_params(model, jnp.concatenate([x0, x0], 1), AttentionMask(MaskKind.TRAINING, L, Lb))
  loss, aux = diffusion.nelbo(apply_fn(model, params), x0, jax.random.key(1), cfg, train=False)
  assert aux["block_nelbo"].shape == (3, 4)
  np.testing.assert_allclose(aux["block_nelbo"].mean(), loss, rtol=1e-6)
  np.testing.assert_allclose(aux["block_nelbo"], aux["token_loss"].reshape(3, 4, 4).mean(-1), rtol=1e-6)


def test_mdlm_is_one_block_of_full_attention(rng):
  """block_size == length runs x_t alone with bidirectional attention."""
  L = 8
  cfg = LossConfig("bd3lm", L, L, MASK_ID)
  seen = []
  def fake_apply(tokens, sigma, mask, train):
    seen.append(mask)
    return jnp.zeros(tokens.shape + (VOCAB,))
  diffusion.nelbo(fake_apply, random_tokens(rng, 2, L), jax.random.key(0), cfg)
  assert seen == [AttentionMask(MaskKind.FULL, L, L)]


def test_ar_algo_is_next_token_prediction(rng):
  L = 8
  cfg = LossConfig("ar", L, 1, MASK_ID)
  model = tiny_model(adaln=False)
  x0 = random_tokens(rng, 2, L)
  params = random_params(model, x0[:, :-1], AttentionMask(MaskKind.BLOCK_CAUSAL, L - 1, 1))
  fn = apply_fn(model, params)
  loss, aux = diffusion.nelbo(fn, x0, jax.random.key(0), cfg, train=False)
  logits = fn(x0[:, :-1], None, AttentionMask(MaskKind.BLOCK_CAUSAL, L - 1, 1))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), x0[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-6)
  assert float(aux["token_loss"][:, 0].max()) == 0.0


def test_loss_compiles_once_and_decreases(rng):
  L, Lb = 16, 4
  cfg = LossConfig("bd3lm", L, Lb, MASK_ID, clip_min=0.3, clip_max=0.8)
  model = tiny_model(dropout=0.1)
  mask = AttentionMask(MaskKind.TRAINING, L, Lb)
  x0 = random_tokens(rng, 8, L) % 5  # a learnable corpus: 5 symbols
  params = random_params(model, jnp.concatenate([x0, x0], 1), mask)
  opt = optax.adamw(3e-3)
  opt_state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, opt_state, key):
    traces.append(1)
    k_loss, k_drop = jax.random.split(key)
    def loss_fn(p):
      fn = lambda t, s, m, train: model.apply({"params": p}, t, s, m, train=train, rngs={"dropout": k_drop})
      return diffusion.nelbo(fn, x0, k_loss, cfg)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(40):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert len(traces) == 1
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def _nelbo_and_grads(cfg, model, weighted=False):
  """Jitted `fn(params, x0, interval[, weight_BL]) -> ((loss, aux), grads)`: one compile for
  every interval. `weighted`: the loss is the mean of the per-token losses times weight_BL."""
  def loss_fn(p, x0, interval, weight_BL=None):
    loss, aux = diffusion.nelbo(network(model, p), x0, jax.random.key(7), cfg, train=False,
                                interval=interval)
    if weight_BL is None:
      return loss, aux
    token_loss_BL = aux["token_loss"] * weight_BL
    return token_loss_BL.mean(), {**aux, "token_loss": token_loss_BL}
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _assert_losses_close(got, want, dtype):
  (loss, aux), grads = got
  (loss_ref, aux_ref), grads_ref = want
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(loss, loss_ref, rtol=tol)
  np.testing.assert_allclose(aux["token_loss"], aux_ref["token_loss"], rtol=tol, atol=tol)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=tol, atol=tol * 1e-1)


@pytest.mark.parametrize("length,block_size,dtype", [
    (32, 1, "float32"), (32, 4, "float32"), (64, 16, "float32"), (32, 32, "float32"),
    (32, 4, "bfloat16")])
def test_logits_at_masked_tokens_only_give_the_full_losses(rng, length, block_size, dtype):
  """The head that projects only masked tokens: the same loss, per-token losses and gradients as
  the logits of every token, for block sizes 1, 4, 16 and L. Where pairs mask more tokens than
  the capacity (t drawn above the interval it is sized for), the full logits' losses of the
  `capacity` tokens it keeps, scaled by masked / capacity, and 0 elsewhere."""
  model = tiny_model(dtype=dtype)
  resample = block_size > 1  # a block of one token has no masked fraction inside [0.001, 0.5]
  full = LossConfig("bd3lm", length, block_size, MASK_ID, resample=resample)
  masked = dataclasses.replace(full, logits_interval=(1e-3, 0.5))
  x0 = random_tokens(rng, 6, length)
  tokens = x0 if block_size == length else jnp.concatenate([x0, x0], 1)
  params = random_params(model, tokens, flops.training_mask_spec(full))
  capacity = diffusion.masked_capacity(masked, 6, interval_given=True)
  run, run_ref = _nelbo_and_grads(masked, model), _nelbo_and_grads(full, model, weighted=True)
  for interval, overflows in ((jnp.array([1e-3, 0.5]), False), (jnp.array([0.7, 1.0]), True)):
    masked_BL = diffusion.forward_process(jax.random.key(7), x0, masked, interval)[1]
    count_G1 = masked_BL.reshape(3, -1).sum(1, keepdims=True)
    assert (count_G1.max() > capacity) == overflows
    got = run(params, x0, interval)
    kept_GN = (got[0][1]["token_loss"] != 0).reshape(3, -1)
    np.testing.assert_array_equal(kept_GN.sum(1), np.minimum(count_G1[:, 0], capacity))
    assert not (kept_GN & ~masked_BL.reshape(3, -1)).any()
    weight_BL = (kept_GN * np.maximum(count_G1 / capacity, 1.0)).reshape(6, length)
    _assert_losses_close(got, run_ref(params, x0, interval, weight_BL), dtype)


def test_masked_head_keeps_a_uniform_subset_of_an_overflowing_pair(rng):
  """Over order keys, each masked token of a pair with more than `capacity` of them is kept with
  probability capacity / masked, so the scaled log-probs are unbiased; pairs within capacity
  keep every masked token, unscaled."""
  batch, length, dim, capacity, draws = 4, 16, 8, 8, 4000
  masked_BL = np.zeros((batch, length), bool)
  masked_BL[0:2].reshape(-1)[:20] = True  # pair 0: 20 of its 32 tokens masked
  masked_BL[2:4].reshape(-1)[3:8] = True  # pair 1: 5
  k1, k2, k3 = jax.random.split(rng, 3)
  x0_BL = random_tokens(k1, batch, length)
  x_BLD = jax.random.normal(k2, (batch, length, dim))
  kernel_DV = jax.random.normal(k3, (dim, VOCAB))
  bias_V = jnp.zeros(VOCAB)
  full_BL = diffusion.subs_log_prob(x_BLD @ kernel_DV, x0_BL, masked_BL, MASK_ID)

  def head_output(key):
    head = diffusion.masked_log_prob_head(x0_BL, masked_BL, MASK_ID, capacity, key)
    return head(x_BLD, kernel_DV, bias_V)
  out_KBL = jax.jit(jax.vmap(head_output))(jax.random.split(jax.random.key(3), draws))
  kept_KBL = out_KBL != 0
  np.testing.assert_array_equal(kept_KBL[:, 0:2].sum((1, 2)), capacity)
  scale_B1 = np.array([[20 / capacity]] * 2 + [[1.0]] * 2)
  np.testing.assert_allclose(out_KBL, jnp.where(kept_KBL, scale_B1 * full_BL, 0.0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(kept_KBL[:, 2:4], np.broadcast_to(masked_BL[2:4], (draws, 2,
                                                                                   length)))
  assert not kept_KBL[:, 0:2][:, ~masked_BL[0:2]].any()
  np.testing.assert_allclose(kept_KBL.mean(0)[0:2][masked_BL[0:2]], capacity / 20, atol=0.04)


def test_masked_head_projects_capacity_rows_per_pair(rng):
  """The network's output matmul runs on [B / 2, capacity, D] rows, in no branch; the [B, L, V]
  logits are never formed, and the loss has no conditional."""
  length, block_size, batch = 32, 4, 4
  cfg = LossConfig("bd3lm", length, block_size, MASK_ID, logits_interval=(1e-3, 1.0))
  model = tiny_model()
  x0 = random_tokens(rng, batch, length)
  params = random_params(model, jnp.concatenate([x0, x0], 1),
                        flops.training_mask_spec(cfg))
  fn = network(model, params)
  jaxpr = jax.make_jaxpr(lambda x: diffusion.nelbo(fn, x, jax.random.key(0), cfg, False))(x0)
  capacity = diffusion.masked_capacity(cfg, batch, interval_given=False)
  equations = list(jax_helpers.equations(jaxpr.jaxpr))
  vocab_outputs = [e.outvars[0].aval.shape for e in equations
                   if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == VOCAB]
  assert vocab_outputs == [(batch // 2, capacity, VOCAB)]
  assert "cond" not in {e.primitive.name for e in equations}


def test_nelbo_keeps_another_subset_of_an_overflowing_pair_for_each_key(rng):
  """With t = 1 every token is masked whatever the key, so every pair overflows a capacity
  sized for t in [0.001, 0.5]: each key keeps `capacity` tokens of each pair, not the same."""
  length, batch = 32, 4
  cfg = LossConfig("bd3lm", length, 4, MASK_ID, logits_interval=(1e-3, 0.5))
  model = tiny_model()
  x0 = random_tokens(rng, batch, length)
  params = random_params(model, jnp.concatenate([x0, x0], 1), flops.training_mask_spec(cfg))
  fn = network(model, params)
  capacity = diffusion.masked_capacity(cfg, batch, interval_given=True)
  token_loss = jax.jit(lambda key: diffusion.nelbo(fn, x0, key, cfg, train=False,
                                                   interval=jnp.array([1.0, 1.0]))[1]["token_loss"])
  kept = [token_loss(jax.random.key(seed)) != 0 for seed in (0, 1)]
  for kept_BL in kept:
    np.testing.assert_array_equal(kept_BL.reshape(batch // 2, -1).sum(1), capacity)
  assert (kept[0] != kept[1]).any()


@pytest.mark.parametrize("change,applies", [
    (dict(logits_interval=None), False), (dict(clip_min=1.0, clip_max=1.0), False),
    (dict(antithetic=False), False), (dict(), True)])
def test_masked_capacity_applies_only_where_pairs_balance(change, applies):
  cfg = LossConfig("bd3lm", 64, 4, MASK_ID, **{"logits_interval": (1e-3, 1.0), **change})
  capacity = diffusion.masked_capacity(cfg, 8, interval_given=False)
  assert (capacity is not None) == applies
  assert diffusion.masked_capacity(cfg, 7, interval_given=False) is None  # odd batch: no pairs
