import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MASK_ID, VOCAB, apply_fn, random_params, tiny_model

from bd3jax import sampling
from bd3jax.masks import AttentionMask, MaskKind

BOS = 0


def one_hot_logits(targets_BL):
  return jnp.where(jax.nn.one_hot(targets_BL, VOCAB) > 0, 10.0, -10.0)


def test_nucleus_filter_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
  kept = np.isfinite(np.asarray(sampling.nucleus_filter(logits, 0.8)))
  np.testing.assert_array_equal(kept[0, 0], [True, True, False, False])
  kept = np.isfinite(np.asarray(sampling.nucleus_filter(logits, 0.81)))
  np.testing.assert_array_equal(kept[0, 0], [True, True, True, False])
  assert np.isfinite(np.asarray(sampling.nucleus_filter(logits, 1.0))).all()


def test_denoise_step_reveals_at_the_rate_and_never_remasks():
  x = jnp.full((2000, 4), MASK_ID).at[:, 0].set(7)
  logits = jnp.zeros((2000, 4, VOCAB))
  out = sampling.denoise_step(jax.random.key(0), x, logits, 1.0, 0.75, MASK_ID, 1.0)
  assert (out[:, 0] == 7).all()
  revealed = np.asarray(out[:, 1:] != MASK_ID)
  assert abs(revealed.mean() - 0.25) < 0.02
  final = sampling.denoise_step(jax.random.key(1), x, logits, 0.25, 0.0, MASK_ID, 1.0)
  assert not (final == MASK_ID).any()


@pytest.mark.parametrize("block_size,steps", [(1, 1), (4, 2), (16, 4)])
def test_sampler_follows_the_model(block_size, steps):
  """With a model certain of 'position mod 5 + 1', every sample is exactly that sequence."""
  L = 16
  def fake_apply(tokens, sigma, mask, train):
    assert mask == AttentionMask(MaskKind.BLOCK_CAUSAL, L, block_size)
    return one_hot_logits(jnp.broadcast_to(jnp.arange(L) % 5 + 1, tokens.shape))
  cfg = sampling.SamplerConfig(length=L, block_size=block_size, steps=steps)
  out = sampling.sample(fake_apply, jax.random.key(0), 3, cfg, bos_id=BOS, mask_id=MASK_ID)
  expected = np.concatenate([[BOS], np.arange(1, L) % 5 + 1])
  np.testing.assert_array_equal(out, np.broadcast_to(expected, (3, L)))


def test_autoregressive_sampling_reads_the_previous_position():
  L = 12
  fake_apply = lambda tokens, sigma, mask, train: one_hot_logits((tokens + 1) % MASK_ID)
  cfg = sampling.SamplerConfig(length=L, block_size=1, steps=1, autoregressive=True)
  out = sampling.sample(fake_apply, jax.random.key(0), 2, cfg, bos_id=BOS, mask_id=MASK_ID)
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(L), (2, L)))


def test_sampling_a_real_model_is_deterministic_per_key():
  L, Lb = 16, 4
  model = tiny_model()
  params = random_params(model, jnp.zeros((1, L), jnp.int32), AttentionMask(MaskKind.BLOCK_CAUSAL, L, Lb))
  cfg = sampling.SamplerConfig(length=L, block_size=Lb, steps=2)
  run = jax.jit(lambda key: sampling.sample(apply_fn(model, params), key, 2, cfg, bos_id=BOS,
                                            mask_id=MASK_ID))
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert (a[:, 0] == BOS).all() and not (a == MASK_ID).any() and int(a.max()) < VOCAB


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=16, block_size=4, steps=0), "steps 0"),
    (dict(length=16, block_size=4, steps=2, nucleus_p=0.0), "nucleus_p 0.0"),
    (dict(length=18, block_size=4, steps=2), "not a multiple of block_size"),
])
def test_bad_sampler_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplerConfig(**kwargs)
