"""Model FLOPs (`bd3jax.flops`) against the matmuls the network runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax_helpers
from conftest import network, tiny_model

from bd3jax import diffusion, flops
from bd3jax.diffusion import LossConfig


def dot_flops(fn, *args) -> int:
  """2 x the multiply-adds of every dot_general that `fn` runs (outside cond branches)."""
  total = 0
  for eqn in jax_helpers.equations(jax.make_jaxpr(fn)(*args).jaxpr, branches=False):
    if eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs_shape[i] for i in lhs_contracting]))
  return total


@pytest.mark.parametrize("algo,length,block_size,queries_last", [
    ("bd3lm", 16, 4, 16),   # 2L tokens; the last layer's queries and MLP on the x_t half only
    ("bd3lm", 16, 1, 16),
    ("bd3lm", 16, 16, 16),  # MDLM: one block, L tokens, a full mask
    ("ar", 16, 1, 15)])     # L - 1 causal tokens
def test_train_flops_count_the_networks_matmuls(algo, length, block_size, queries_last):
  """The dense reference attention computes every (query, key) pair and the formula counts
  the visible ones: the difference is exactly the hidden pairs' scores and values."""
  model = tiny_model(n_layers=3, adaln=False)
  loss_cfg = LossConfig(algo, length, block_size, mask_id=0)
  mask = flops.training_mask_spec(loss_cfg)
  tokens = jnp.zeros((1, mask.num_tokens), jnp.int32)
  params = model.init(jax.random.key(0), tokens, None, mask)["params"]
  counted = dot_flops(lambda p: model.apply({"params": p}, tokens, None, mask), params)

  hidden_TT = ~mask.dense()
  d, layers = model.cfg.d_model, model.cfg.n_layers
  hidden_pairs = (layers - 1) * hidden_TT.sum() + hidden_TT[:queries_last].sum()
  expected = flops.train_flops_per_sequence(model.cfg, loss_cfg) / 3 + 4 * d * hidden_pairs
  assert counted == expected


def test_train_flops_count_the_tokens_the_loss_projects():
  """Given the batch, the output projection counts `masked_capacity` tokens per pair of rows:
  the loss's forward matmuls equal the formula."""
  model = tiny_model(n_layers=3, adaln=False)
  batch, loss_cfg = 4, LossConfig("bd3lm", 32, 4, mask_id=0, logits_interval=(1e-3, 1.0))
  mask = flops.training_mask_spec(loss_cfg)
  x0 = jnp.ones((batch, loss_cfg.length), jnp.int32)
  params = model.init(jax.random.key(0), jnp.zeros((1, mask.num_tokens), jnp.int32), None,
                      mask)["params"]

  def loss(p):
    return diffusion.nelbo(network(model, p), x0, jax.random.key(0), loss_cfg, False,
                           jnp.array([1e-3, 1.0]))[0]
  counted = dot_flops(loss, params)

  hidden_TT = ~mask.dense()
  hidden_pairs = (model.cfg.n_layers - 1) * hidden_TT.sum() + hidden_TT[:loss_cfg.length].sum()
  per_sequence = flops.train_flops_per_sequence(model.cfg, loss_cfg, batch)
  assert per_sequence < flops.train_flops_per_sequence(model.cfg, loss_cfg)
  assert counted == batch * (per_sequence / 3 + 4 * model.cfg.d_model * hidden_pairs)
