"""The training loop: data, state, resume, metrics, evaluation, checkpoints, preemption."""

import contextlib
import dataclasses
import itertools
import signal
import time

import jax
import numpy as np
from absl import logging

from bd3jax import checkpoint, clip_search, diffusion, evaluate, flops, metrics, parallel, train
from bd3jax import config as config_lib
from bd3jax.data import build_data, eval_batches, make_train_iterator


def _valid_batch_size(config, data) -> int:
  return min(config.train.batch_size, len(data.valid_tokens_NL))


def valid_batches(config, data, n_batches: int | None = None):
  """The first `n_batches` (default `train.eval_batches`) held-out batches, in order."""
  n_batches = config.train.eval_batches if n_batches is None else n_batches
  return itertools.islice(eval_batches(data.valid_tokens_NL, _valid_batch_size(config, data)),
                          n_batches)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or Inf."""


@dataclasses.dataclass
class Setup:
  """Everything a run is built from, before its first step."""
  task: train.Task
  data: object
  train_iter: object
  state: train.TrainState
  start_step: int
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding   # of the global [B, L] training batch


def _log0(msg, *args):
  if jax.process_index() == 0:
    logging.info(msg, *args)


def setup(config, workdir: str, ckpt: checkpoint.Checkpointer) -> Setup:
  """Builds data and state, restoring the latest checkpoint in `workdir` if there is one."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch(config, mesh)
  step = ckpt.latest_step
  meta = ckpt.restore_meta(step) if step is not None else None
  if meta is None and config.init_from:
    meta_source = checkpoint.read_meta(config.init_from)
  else:
    meta_source = meta
  tokenizer = checkpoint.tokenizer_from_meta(meta_source) if meta_source else None
  data = build_data(config, tokenizer)
  tok = data.tokenizer
  if data.n_replaced_chars:
    logging.warning("replaced %d invalid UTF-8 sequences in the corpus", data.n_replaced_chars)
  # build_data vouches for streams and prepared shards (tokenizer, manifest); arrays are checked.
  for tokens in (data.train_tokens_NL, data.valid_tokens_NL):
    if isinstance(tokens, np.ndarray):
      config_lib.validate_tokens(tokens, tok.vocab_size, tok.mask_id)
  task = train.Task.from_config(config, tok.vocab_size, tok.mask_id)
  if meta is not None:
    checkpoint.check_architecture(meta, config, tok.vocab_size, where=str(workdir))
  batch_size = config.train.batch_size
  batch_sharding = parallel.batch_sharding(mesh, (batch_size, config.length))
  shard, n_shards = parallel.process_batch_shard(batch_sharding, batch_size)
  train_iter = make_train_iterator(
      data.train_tokens_NL, batch_size=batch_size, seed=config.seed, shuffle=config.data.shuffle,
      process_index=shard, process_count=n_shards, num_workers=config.data.num_workers)
  abstract_state = parallel.abstract_state(task, mesh)
  task = parallel.shard_task(task, abstract_state)
  if step is not None:
    state = ckpt.restore(step, abstract_state, train_iter)
    _log0("resumed from the checkpoint of step %d in %s", step, workdir)
  elif config.init_from:
    params = checkpoint.load_params(config.init_from, abstract_state, config, tok.vocab_size)
    state = jax.jit(lambda p: train.init_state(task, p),
                    out_shardings=parallel.shardings(abstract_state))(params)
    _log0("initialised the parameters from %s", config.init_from)
  else:
    state = parallel.init_state(task, abstract_state, jax.random.key(config.seed))
  _log0("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())
  return Setup(task, data, train_iter, state, int(step or 0), mesh, batch_sharding)


def _valid_batch_sharding(s: Setup, config):
  return parallel.batch_sharding(s.mesh, (_valid_batch_size(config, s.data), config.length))


def pairs_stay_on_devices(sharding, batch_size: int, micro_batches: int = 1) -> bool:
  """Whether every device holds an even number of each micro-batch's rows, so that the loss's
  pairs of rows (`diffusion.masked_log_prob_head`) do not straddle devices."""
  return (sharding.shard_shape((batch_size, 1))[0] // micro_batches) % 2 == 0


def _with_logits_interval(task: train.Task, interval) -> train.Task:
  return dataclasses.replace(task, loss_cfg=dataclasses.replace(task.loss_cfg,
                                                                logits_interval=interval))


def _eval_step_fn(s: Setup, config):
  """`eval(params, x0_BL, key)` over the mesh, for the host batches of `valid_batches`."""
  sharding = _valid_batch_sharding(s, config)
  task = s.task
  if not pairs_stay_on_devices(sharding, _valid_batch_size(config, s.data)):
    task = _with_logits_interval(task, None)
  step = train.jit_eval_step(evaluate.eval_task(task),
                             parallel.shardings(s.state.ema_params), sharding)
  return lambda params, x0_BL, key: step(params, parallel.host_to_global(x0_BL, sharding), key)


def _search_step_fn(s: Setup, config):
  """`clip_search.jit_search_step` over the mesh, for the host batches of `valid_batches`."""
  sharding = _valid_batch_sharding(s, config)
  step = clip_search.jit_search_step(s.task, config.noise.search_chunk,
                                     parallel.shardings(s.state.ema_params), sharding)
  return lambda params, x0_BL, key, intervals: step(
      params, parallel.host_to_global(x0_BL, sharding), key, intervals)


@contextlib.contextmanager
def _preemption_flag():
  """Yields a one-element list set to True when SIGTERM arrives (e.g. a TPU preemption)."""
  flag = [False]
  def handler(signum, frame):
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    flag[0] = True
  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not in the main thread: no handler, no flag
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


class _Window:
  """Metrics of the steps since the last flush, kept on device until flushed."""

  def __init__(self):
    self.pending, self.start_time = [], time.perf_counter()

  def flush(self, first_step: int) -> dict | None:
    """Fetches pending metrics; raises on a non-finite loss or gradient norm."""
    if not self.pending:
      return None
    fetched = jax.device_get(self.pending)
    for i, m in enumerate(fetched):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise NonFiniteLossError(
            f"loss {m['loss']} / gradient norm {m['grad_norm']} at step {first_step + i + 1}")
    elapsed = time.perf_counter() - self.start_time
    out = {"steps": len(fetched), "seconds": elapsed,
           "loss": float(np.mean([m["loss"] for m in fetched])),
           "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
           "block_nelbo": np.mean([m["block_nelbo"] for m in fetched], axis=0),
           "last_loss": float(fetched[-1]["loss"])}
    self.pending, self.start_time = [], time.perf_counter()
    return out


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns final metrics."""
  t = config.train
  ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
  s = setup(config, workdir, ckpt)
  task, state, tok = s.task, s.state, s.data.tokenizer
  micro_batch = t.batch_size // t.grad_accum
  pairs_fit = pairs_stay_on_devices(s.batch_sharding, t.batch_size, t.grad_accum)
  step_fns = {}

  def step_fn_for(interval_2):
    """(train step, model FLOPs per step) with the loss's logits sized for t drawn from
    `interval_2`, the state's noise interval (which the search moves); compiled once for each
    number of tokens per pair of rows it projects (all of them where pairs would straddle
    devices)."""
    interval = tuple(float(v) for v in np.asarray(jax.device_get(interval_2), np.float32))
    sized = _with_logits_interval(task, interval if pairs_fit else None)
    capacity = diffusion.masked_capacity(sized.loss_cfg, micro_batch, interval_given=True)
    if capacity not in step_fns:
      step_fns[capacity] = (
          train.jit_train_step(sized, parallel.shardings(state), s.batch_sharding),
          flops.train_flops_per_sequence(sized.model.cfg, sized.loss_cfg, micro_batch)
          * t.batch_size)
    return step_fns[capacity]

  step_fn, flops_per_step = step_fn_for(state.noise_interval)
  eval_step = _eval_step_fn(s, config)
  n = config.noise
  if n.search_every:
    search_step = _search_step_fn(s, config)
    grid_I2 = clip_search.interval_grid(config.block_size, n.search_widths)
  lr_at = train.learning_rate_schedule(config)
  tokens_per_step = t.batch_size * config.length
  peak = flops.peak_flops_per_device()
  is_main = jax.process_index() == 0
  writer = metrics.MetricWriter(workdir, enabled=is_main)
  last_good = ckpt.latest_step
  last_eval = {}

  def run_eval(step):
    result = evaluate.evaluate(eval_step, state.ema_params, valid_batches(config, s.data),
                               seed=config.seed, draws=config.train.eval_draws)
    writer.write(step, {f"eval/{k}": v for k, v in result.items()})
    _log0("step %d: held-out NELBO %.4f, perplexity %.2f", step, result["nelbo"], result["ppl"])
    last_eval.update(result, step=step)
    return result

  def tune_noise(step):
    """Moves training to the interval whose block NELBO varies least (clip_search)."""
    nonlocal state, step_fn, flops_per_step
    current = np.asarray(jax.device_get(state.noise_interval), np.float32)
    intervals_I2 = np.concatenate([current[None], grid_I2])
    var_I = clip_search.block_nelbo_variance(
        search_step, state.ema_params, valid_batches(config, s.data, n.search_batches),
        intervals_I2, seed=config.seed)
    best = 1 + int(np.argmin(var_I[1:]))
    if var_I[best] < var_I[0]:
      state = state.replace(noise_interval=jax.device_put(intervals_I2[best],
                                                          state.noise_interval.sharding))
      step_fn, flops_per_step = step_fn_for(state.noise_interval)
    else:
      best = 0
    lo, hi = (float(v) for v in intervals_I2[best])
    writer.write(step, {"noise/clip_min": lo, "noise/clip_max": hi,
                        "noise/block_nelbo_var": float(var_I[best]),
                        "noise/block_nelbo_var_before": float(var_I[0])})
    _log0("step %d: noise interval U[%.3g, %.3g] (block NELBO variance %.4g; was %.4g under "
          "U[%.3g, %.3g])", step, lo, hi, var_I[best], var_I[0], *current)

  def save(step):
    nonlocal last_good
    window_check = window.flush(step - len(window.pending))
    if window_check:
      write_window(step, window_check)
    ckpt.save(step, state, s.train_iter, config, tok)
    last_good = step

  def write_window(step, w):
    scalars = {"train/loss": w["loss"], "train/grad_norm": w["grad_norm"],
               "train/lr": float(lr_at(step)),
               "train/tokens_per_s": w["steps"] * tokens_per_step / w["seconds"],
               "train/steps_per_s": w["steps"] / w["seconds"]}
    if peak:
      scalars["train/mfu"] = w["steps"] * flops_per_step / w["seconds"] / (peak * jax.device_count())
    scalars.update(metrics.block_scalars("train/nelbo_block", w["block_nelbo"]))
    writer.write(step, scalars)
    if bar is not None:
      bar.set_postfix(loss=f"{w['last_loss']:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}")

  bar = None
  if is_main:
    from tqdm import tqdm
    bar = tqdm(total=t.num_steps, initial=s.start_step, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)
  window = _Window()
  step = s.start_step
  with jax.set_mesh(s.mesh):  # the mesh of every array the loop creates
    try:
      with _preemption_flag() as preempted:
        while step < t.num_steps and not preempted[0]:
          batch = parallel.global_batch(next(s.train_iter), s.batch_sharding, t.batch_size)
          state, m = step_fn(state, batch)
          window.pending.append(m)
          step += 1
          if bar is not None:
            bar.update(1)
          if step % t.log_every == 0:
            write_window(step, window.flush(step - len(window.pending)))
          if n.search_every and step % n.search_every == 0:
            tune_noise(step)
          if step % t.eval_every == 0:
            run_eval(step)
          if step % t.checkpoint_every == 0 or step == t.num_steps or preempted[0]:
            save(step)
      ckpt.wait()
      if preempted[0]:
        _log0("preempted: stopped at step %d with its checkpoint saved", step)
        return {"step": step, "preempted": True}
      result = last_eval if last_eval.get("step") == step else run_eval(step)
    except NonFiniteLossError as e:
      ckpt.wait()
      raise NonFiniteLossError(f"{e}; training stopped, the last good checkpoint is step "
                               f"{last_good} in {workdir}") from None
    finally:
      if bar is not None:
        bar.close()
      writer.close()
      ckpt.close()
  return {**result, "step": step}


def evaluate_workdir(config, workdir: str) -> dict:
  """Held-out NELBO and perplexity of the latest checkpoint's EMA parameters in `workdir`."""
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    if ckpt.latest_step is None:
      raise checkpoint.CheckpointError(f"no checkpoint in {workdir}; train first")
    s = setup(config, workdir, ckpt)
  finally:
    ckpt.close()
  with jax.set_mesh(s.mesh):
    result = evaluate.evaluate(_eval_step_fn(s, config), s.state.ema_params,
                               valid_batches(config, s.data), seed=config.seed,
                               draws=config.train.eval_draws)
  return {"step": s.start_step, **result}
