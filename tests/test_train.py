import jax
import jax.numpy as jnp
import numpy as np
import tiny_config

from bd3jax import train


def tiny_task(**train_overrides):
  config = tiny_config.get_config()
  config.model.dropout = 0.0
  config.noise.clip_min = config.noise.clip_max = 1.0  # full masking: a deterministic loss
  config.block_size = 1
  config.train.update(**train_overrides)
  return train.Task.from_config(config, vocab_size=64, mask_id=63)


def test_gradient_accumulation_matches_the_full_batch():
  one, two = tiny_task(grad_accum=1), tiny_task(grad_accum=2)
  params = jax.jit(one.init_params)(jax.random.key(0))
  batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 32), 0, 63)}
  fresh = lambda task: train.init_state(task, jax.tree.map(jnp.copy, params))  # steps donate
  s1, m1 = train.jit_train_step(one)(fresh(one), batch)
  s2, m2 = train.jit_train_step(two)(fresh(two), batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s2.params)


def test_ema_follows_the_reference_warmup_rule():
  assert float(train.ema_decay_at(0.9999, jnp.asarray(1))) == np.float32(2 / 11)
  assert float(train.ema_decay_at(0.9999, jnp.asarray(10**7))) == np.float32(0.9999)
  task = tiny_task(ema=0.9999)
  params = jax.jit(task.init_params)(jax.random.key(0))
  state = train.init_state(task, jax.tree.map(jnp.copy, params))  # the step donates it
  batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 32), 0, 63)}
  new, _ = train.jit_train_step(task)(state, batch)
  d = 2 / 11
  jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-5, atol=1e-7),
               new.ema_params, params, new.params)
  assert int(new.step) == 1


def test_warmup_then_constant_learning_rate():
  config = tiny_config.get_config()
  config.train.update(lr=1e-3, warmup_steps=10)
  lr = train.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(10_000)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_step_keys_depend_only_on_seed_and_step():
  a = jax.random.key_data(train.step_key(3, 7))
  np.testing.assert_array_equal(a, jax.random.key_data(train.step_key(3, 7)))
  assert not np.array_equal(a, jax.random.key_data(train.step_key(3, 8)))


def test_param_axes_cover_every_parameter():
  task = tiny_task()
  axes = task.param_axes()
  shapes = jax.eval_shape(task.init_params, jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=lambda x: x is None or
                                                          isinstance(x, jax.sharding.PartitionSpec))
