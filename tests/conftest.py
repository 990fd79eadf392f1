import atexit
import os
import shutil
import tempfile

# Faster XLA:CPU compiles for the many tiny programs the tests build (numerics unchanged).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Many tests (and the main.py runs they start) compile the same programs: one persistent
# compilation cache for the whole run, shared by the workers and subprocesses through the
# environment and removed at exit. Set JAX_COMPILATION_CACHE_DIR to choose another.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="bd3jax-tests-xla-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bd3jax.masks import AttentionMask, MaskKind
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


def network(model, params):
  """`fn(tokens, sigma, mask, train, head=None) -> logits` over `params`, as `diffusion.nelbo`
  calls its network."""
  return lambda t, s, m, train, head=None: model.apply({"params": params}, t, s, m, train=train,
                                                      head=head)


def apply_fn(model, params):
  """A jitted `fn(tokens, sigma, mask, train=False) -> logits` over fixed parameters."""
  run = jax.jit(lambda params, *args: network(model, params)(*args), static_argnums=(3, 4))
  return lambda tokens, sigma, mask, train=False: run(params, tokens, sigma, mask, train)


@pytest.fixture
def rng():
  return jax.random.key(1234)


def random_tokens(key, batch, length):
  return jax.random.randint(key, (batch, length), 0, MASK_ID, dtype=jnp.int32)


def assert_same_model_loss_and_gradients(key, length, block_size, reference: dict, other: dict,
                                         dropout_key=None):
  """A training pass's masked cross-entropy and its parameter gradients under
  `tiny_model(**other)` equal those under `tiny_model(**reference)` (same random parameters; a
  training pass with dropout when `dropout_key` is given)."""
  mask = AttentionMask(MaskKind.TRAINING, length, block_size)
  k_x0, k_xt = jax.random.split(key)
  x0 = random_tokens(k_x0, 2, length)
  xt = jnp.where(jax.random.bernoulli(k_xt, 0.5, x0.shape), MASK_ID, x0)
  tokens = jnp.concatenate([xt, x0], axis=1)
  params = random_params(tiny_model(**reference), tokens, mask)

  def loss_and_grads(overrides):
    model = tiny_model(**overrides)
    train = dropout_key is not None
    rngs = {"dropout": dropout_key} if train else None

    def loss(params):
      logits_BLV = model.apply({"params": params}, tokens, None, mask, train=train, rngs=rngs)
      log_p_BL = jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), x0[..., None], -1)[..., 0]
      return -jnp.mean(jnp.where(xt == MASK_ID, log_p_BL, 0.0))
    return jax.jit(jax.value_and_grad(loss))(params)

  loss_ref, grads_ref = loss_and_grads(reference)
  loss, grads = loss_and_grads(other)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, grads_ref)
