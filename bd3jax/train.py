"""The train state, the optimiser, EMA and the jit-compiled train and eval steps."""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from bd3jax import config as config_lib
from bd3jax import diffusion
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import DiT


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, as one pytree: checkpointed and donated whole."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  noise_interval: jax.Array   # float32 [2]: the (clip_min, clip_max) training draws t from


@dataclasses.dataclass(frozen=True)
class Task:
  """The static parts of training: the network and the loss."""
  model: DiT
  loss_cfg: diffusion.LossConfig
  optimizer: optax.GradientTransformation
  ema_decay: float
  grad_accum: int
  seed: int
  # On a mesh (bd3jax.parallel.shard_task): the NamedShardings the parameters and gradients are
  # stored in, and those the parameters are gathered into for the forward and backward passes
  # (FSDP: without the fsdp axis). None: wherever XLA puts them.
  param_sharding: Any = dataclasses.field(default=None, compare=False)
  compute_sharding: Any = dataclasses.field(default=None, compare=False)

  @classmethod
  def from_config(cls, config, vocab_size: int, mask_id: int) -> "Task":
    config_lib.validate(config)
    t = config.train
    return cls(model=DiT(config_lib.model_config(config, vocab_size)),
               loss_cfg=config_lib.loss_config(config, mask_id),
               optimizer=make_optimizer(config), ema_decay=t.ema, grad_accum=t.grad_accum,
               seed=config.seed)

  def init_params(self, key):
    """Fresh float32 parameters (unboxed; logical names via `param_axes`)."""
    return nn.unbox(self._init_variables(key)["params"])

  def param_axes(self):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    abstract = jax.eval_shape(self._init_variables, jax.random.key(0))
    return nn.get_partition_spec(abstract)["params"]

  def _init_variables(self, key):
    cfg = self.loss_cfg
    if cfg.algo == "ar":
      mask = AttentionMask(MaskKind.BLOCK_CAUSAL, cfg.length - 1, 1)
    else:
      mask = AttentionMask(MaskKind.TRAINING, cfg.length, cfg.block_size)
    return self.model.init(key, jnp.zeros((1, mask.num_tokens), jnp.int32), None, mask)

  def apply_fn(self, params, dropout_key=None):
    """`fn(tokens, sigma, mask, train, head=None) -> logits` over the given parameters."""
    if self.compute_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, self.compute_sharding)
    def fn(tokens, sigma, mask, train, head=None):
      rngs = {"dropout": dropout_key} if train else {}
      return self.model.apply({"params": params}, tokens, sigma, mask, train=train, head=head,
                              rngs=rngs)
    return fn


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant learning rate, after global-norm clipping."""
  t = config.train
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay))


def learning_rate_schedule(config):
  t = config.train
  return optax.warmup_constant_schedule(0.0, t.lr, max(t.warmup_steps, 1))


def init_state(task: Task, params) -> TrainState:
  cfg = task.loss_cfg
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=task.optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params),
                    noise_interval=jnp.array([cfg.clip_min, cfg.clip_max], jnp.float32))


def ema_decay_at(decay: float, num_updates):
  """The reference's warm-up rule: min(decay, (1 + n) / (10 + n)) after n updates."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def step_key(seed: int, step):
  """The randomness of one step, a function of (seed, step) only: resumes replay it exactly."""
  return jax.random.fold_in(jax.random.key(seed), step)


def _loss_and_grads(task: Task, params, x0_BL, key, interval):
  k_noise, k_dropout = jax.random.split(key)
  def loss_fn(p):
    return diffusion.nelbo(task.apply_fn(p, k_dropout), x0_BL, k_noise, task.loss_cfg, train=True,
                           interval=interval)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if task.param_sharding is not None:   # FSDP: reduce-scatter, not all-reduce
    grads = jax.lax.with_sharding_constraint(grads, task.param_sharding)
  return loss, aux["block_nelbo"].mean(0), grads


def train_step(task: Task, state: TrainState, batch):
  """One optimiser step over `batch["tokens"]` [B, L], split into `grad_accum` micro-batches.

  Micro-batch m holds rows m, m + M, m + 2M, ... (M = grad_accum), so that a batch sharded
  by rows keeps each device's rows on that device.
  """
  x0_BL = batch["tokens"]
  key = step_key(task.seed, state.step)
  if task.grad_accum == 1:
    loss, block_nelbo_N, grads = _loss_and_grads(task, state.params, x0_BL, key,
                                                 state.noise_interval)
  else:
    micro_MBL = x0_BL.reshape(-1, task.grad_accum, x0_BL.shape[-1]).swapaxes(0, 1)
    keys = jax.random.split(key, task.grad_accum)
    def accumulate(carry, xs):
      out = _loss_and_grads(task, state.params, *xs, state.noise_interval)
      return jax.tree.map(jnp.add, carry, out), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: _loss_and_grads(task, state.params, micro_MBL[0], keys[0], state.noise_interval)))
    total, _ = jax.lax.scan(accumulate, zeros, (micro_MBL, keys))
    loss, block_nelbo_N, grads = jax.tree.map(lambda a: a / task.grad_accum, total)
  with jax.named_scope("optimizer"):
    updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  num_updates = state.step + 1
  if task.ema_decay > 0:
    with jax.named_scope("ema"):
      d = ema_decay_at(task.ema_decay, num_updates)
      ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  else:
    ema_params = params
  metrics = {"loss": loss, "block_nelbo": block_nelbo_N, "grad_norm": optax.tree.norm(grads)}
  return TrainState(num_updates, params, opt_state, ema_params, state.noise_interval), metrics


def eval_step(task: Task, params, x0_BL, key):
  """Per-token [B, L] and per-block [B, n_blocks] NELBO of one batch, without dropout."""
  _, aux = diffusion.nelbo(task.apply_fn(params), x0_BL, key, task.loss_cfg, train=False)
  return aux["token_loss"], aux["block_nelbo"]


def replicated_like(sharding):
  """A replicated NamedSharding on `sharding`'s mesh (None for None)."""
  return None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())


def jit_train_step(task: Task, state_sharding=None, batch_sharding=None):
  """`step(state, batch) -> (state, metrics)`, compiled once, the state's buffers donated.

  With shardings (see `bd3jax.parallel`), the state keeps `state_sharding` (a TrainState of
  NamedShardings), the batch arrives in `batch_sharding` and the metrics come back replicated.
  """
  fn = lambda state, batch: train_step(task, state, batch)
  if state_sharding is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_like(batch_sharding)),
                 donate_argnums=(0,))


def jit_eval_step(task: Task, params_sharding=None, batch_sharding=None):
  """`eval(params, x0, key)`; with shardings, x0 in `batch_sharding`, the results replicated."""
  fn = lambda params, x0, key: eval_step(task, params, x0, key)
  if params_sharding is None:
    return jax.jit(fn)
  replicated = replicated_like(batch_sharding)
  return jax.jit(fn, in_shardings=(params_sharding, batch_sharding, replicated),
                 out_shardings=replicated)
