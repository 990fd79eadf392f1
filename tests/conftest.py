import os

# Faster XLA:CPU compiles for the many tiny programs the tests build (numerics unchanged).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bd3jax.model import DiT, ModelConfig

VOCAB = 37
MASK_ID = VOCAB - 1


def tiny_model(**overrides) -> DiT:
  kwargs = dict(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, cond_dim=16, dropout=0.0)
  kwargs.update(overrides)
  return DiT(ModelConfig(**kwargs))


def random_params(model, tokens_BT, mask, seed=0):
  """Initialise, then perturb every parameter so zero-initialised layers carry signal."""
  @jax.jit
  def init(key):
    init_key, noise_key = jax.random.split(key)
    params = nn.unbox(model.init(init_key, tokens_BT, None, mask)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return init(jax.random.key(seed))


def apply_fn(model, params):
  """A jitted `fn(tokens, sigma, mask, train=False) -> logits` over fixed parameters."""
  def run(params, tokens, sigma, mask, train):
    return model.apply({"params": params}, tokens, sigma, mask, train=train)
  run = jax.jit(run, static_argnums=(3, 4))
  return lambda tokens, sigma, mask, train=False: run(params, tokens, sigma, mask, train)


@pytest.fixture
def rng():
  return jax.random.key(1234)


def random_tokens(key, batch, length):
  return jax.random.randint(key, (batch, length), 0, MASK_ID, dtype=jnp.int32)
