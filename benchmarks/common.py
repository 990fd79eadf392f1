"""Helpers shared by the benchmark scripts: timing, device description, JSON output.

Timing convention: the first call of a jitted function compiles and is reported apart
(`compile_s`); further warm-up calls are discarded; each timed call is followed by
`jax.block_until_ready` on its outputs, and the median of the timed calls is reported
(`time_pipelined_steps` apart: calls back to back, one block_until_ready per run).
Imports only jax, numpy and bd3jax modules that need neither grain nor sentencepiece.
"""

import json
import os
import statistics
import time

import jax

from bd3jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_CALLS = 3  # calls at the start of each back-to-back run that time the host's own cost


def time_train_steps(step_fn, state, batch, *, warmup: int, steps: int):
  """Times `state, metrics = step_fn(state, batch)` (state donated, so threaded through).

  Returns (state, compile_s, wall seconds of each timed step, process CPU seconds of all
  timed steps together).
  """
  t0 = time.perf_counter()
  state, m = step_fn(state, batch)
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    state, m = step_fn(state, batch)
  jax.block_until_ready((state, m))
  times, cpu0 = [], time.process_time()
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return state, compile_s, times, time.process_time() - cpu0


def time_pipelined_steps(step_fn, state, batch, *, steps: int):
  """Times `state, metrics = step_fn(state, batch)` called back to back, as a training loop
  issues them: a run of `steps` calls and a run of 2 * `steps`, each ended by one
  block_until_ready; their difference over `steps` is the time per step, without the start-up
  (the first dispatch on an idle device) and drain that both runs share.

  Returns (state, seconds per step, median seconds a call took to return, median seconds the
  first `HOST_CALLS` calls of each run took to return). A runtime lets the host enqueue only so
  many steps ahead, so once that queue is full every call waits for the device and the second
  figure nears the step time either way; the third, taken while each run starts on an idle
  device, is what a call costs the host (an upper bound where the queue is shorter).
  """
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  dispatch, first, runs = [], [], []
  for calls in (steps, 2 * steps):
    t0 = time.perf_counter()
    for i in range(calls):
      t1 = time.perf_counter()
      state, m = step_fn(state, batch)
      dispatch.append(time.perf_counter() - t1)
      if i < HOST_CALLS:
        first.append(dispatch[-1])
    jax.block_until_ready((state, m))
    runs.append(time.perf_counter() - t0)
  return state, (runs[1] - runs[0]) / steps, median(dispatch), median(first)


def time_calls(fn, *args, warmup: int, steps: int, calls: int = 1):
  """Times `fn(*args)` (nothing donated). Returns (compile_s, seconds per call of each of the
  `steps` samples); a sample is `calls` back-to-back calls ended by one block_until_ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(calls)])
    times.append((time.perf_counter() - t0) / calls)
  return compile_s, times


def value_and_grads(fn, *args):
  """fn's output at args[:-1] and the gradients of sum(output * args[-1]) with respect to each
  of them, e.g. (o, (dq, dk, dv)) of `value_and_grads(attend, q, k, v, do)`."""
  *inputs, cotangent = args
  out, vjp = jax.vjp(fn, *inputs)
  return out, vjp(cotangent)


def error_text(e: Exception) -> str:
  """An exception as one short line for a JSON record: its type and first line."""
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def median(xs):
  return statistics.median(xs)


def config_summary(config, batch_size: int, vocab_size: int) -> dict:
  m = config.model
  return {"algo": config.algo, "length": config.length, "block_size": config.block_size,
          "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
          "dtype": m.dtype, "attention": m.attention, "layer_norm": m.layer_norm,
          "batch": batch_size,
          "grad_accum": config.train.grad_accum, "vocab_size": vocab_size}


def device_summary() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "jax": jax.__version__}


def peak_memory_gib() -> float | None:
  """Peak bytes in use on device 0 so far, where the backend reports it (GPU, TPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def flop_convention() -> str:
  doc = flops.__doc__ or ""
  text = doc.split("Convention:", 1)[1] if "Convention:" in doc else doc
  return "bd3jax.flops: " + " ".join(text.split())


def throughput(task, batch_size: int, step_s: float) -> dict:
  """Model TFLOP/s and MFU (against one device's dense bf16 peak) of a train step."""
  per_step = flops.train_flops_per_sequence(
      task.model.cfg, task.loss_cfg, batch_size // task.grad_accum) * batch_size
  achieved = per_step / step_s
  peak = flops.peak_flops_per_device()
  return {"model_tflop_per_step": per_step / 1e12, "model_tflops_per_s": achieved / 1e12,
          "peak_tflops_per_s": peak / 1e12 if peak else None,
          "mfu": achieved / peak if peak else None}


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)
