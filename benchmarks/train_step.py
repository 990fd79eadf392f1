"""Speed of the bare jitted train step and eval step, on random tokens.

  python benchmarks/train_step.py                       # small model, L=1024, L'=16, batch 16, bf16
  python benchmarks/train_step.py --config.model.attention=cudnn
  python benchmarks/train_step.py --config=configs/demo.py --vocab_size=2048 --batch_size=8 \
      --steps=3 --warmup=1                              # a CPU smoke run, under a minute

Prints one JSON line (two with `--profile_dir`). Conventions:
- train step: `train.jit_train_step(task)` (AdamW, grad clipping, EMA; the state donated),
  on one device, one fixed batch of uniform random ids in [0, vocab_size - 1) already on
  device; mask id = vocab_size - 1. No data pipeline, logging or checkpointing.
- eval step (unless `--noeval`): `train.jit_eval_step` of the evaluation task (t ~ U[1e-3, 1],
  no resampling, no dropout) on the same batch.
- timing: first call = compile (`compile_s`), `--warmup` calls in all before timing, then
  the median over `--steps` calls, each ended by `jax.block_until_ready` (`step_ms`: the
  host's dispatch and the device's work, nothing overlapped).
- pipelined: then runs of `--steps` and 2 * `--steps` back-to-back calls, each ended by one
  `jax.block_until_ready`, as the training loop issues them (`pipelined_step_ms`: the runs'
  difference per step, so start-up and drain cancel; the host's work overlaps the device's
  where nothing in the step makes the host wait); `dispatch_ms`, the median time a call took
  to return among them (near the step time once the runtime's queue of enqueued steps is full,
  whether the host or the device holds the loop back), and `host_ms`, the median return time of
  the first `common.HOST_CALLS` calls of each run, which start on an idle device: what a call
  costs the host. host_ms well under pipelined_step_ms means the device is the bottleneck.
- tokens_per_s = batch * L / step time (tokens of the L-long sequences, not the 2L the
  network runs over); pipelined_tokens_per_s the same for the pipelined step time;
  eval_tokens_per_s for the eval step.
- model_tflops_per_s: `bd3jax.flops.train_flops_per_sequence` * batch / step time (the
  convention string is printed as `flop_convention`); mfu divides by one device's dense bf16
  peak from `bd3jax.flops.peak_flops_per_device()`, null where unknown (CPU).
- peak_memory_gib: the device's peak bytes in use, null where not reported (CPU).
- `--profile_dir=DIR`: after the timing, `--profile_steps` more train steps run under the
  profiler (trace written under DIR) and a second line, "train_step_profile", gives the time
  per op, per kind of op and per part of the step (the ops' named scopes: model layers,
  dropout, masking, loss, optimizer, ema) for each device timeline, and the busiest events of
  the four busiest host threads (benchmarks/trace_summary.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bd3jax import host  # noqa: E402

host.keep_freed_memory()  # as main.py does, before jax starts its threads

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common, trace_summary  # noqa: E402
from bd3jax import evaluate, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.ROOT, "configs", "base.py"),
    "Config file; override fields with --config.KEY=VALUE.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 16,
                              "Sequences per step (sets config.train.batch_size).")
_VOCAB = flags.DEFINE_integer("vocab_size", 50258,
                              "Vocabulary size, [MASK] (the last id) included.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls of each step.")
_WARMUP = flags.DEFINE_integer("warmup", 3,
                               "Untimed calls before timing, the compiling one included.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random tokens.")
_EVAL = flags.DEFINE_bool("eval", True, "Also time the eval step (a second compilation).")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Trace --profile_steps steps into this directory "
                               "and print where their time goes.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Train steps traced with --profile_dir.")
_HOST_THREADS = 4  # the busiest host threads listed in the profile line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, batch_size, vocab = _CONFIG.value, _BATCH.value, _VOCAB.value
  config.train.batch_size = batch_size
  task = train.Task.from_config(config, vocab, vocab - 1)
  state = jax.jit(lambda k: train.init_state(task, task.init_params(k)))(
      jax.random.key(config.seed))
  x0_BL = jax.random.randint(jax.random.key(_SEED.value), (batch_size, config.length), 0, vocab - 1)
  batch = {"tokens": x0_BL}

  step_fn = train.jit_train_step(task)
  state, compile_s, times, _ = common.time_train_steps(
      step_fn, state, batch, warmup=_WARMUP.value, steps=_STEPS.value)
  step_s = common.median(times)
  state, pipelined_s, dispatch_s, host_s = common.time_pipelined_steps(
      step_fn, state, batch, steps=_STEPS.value)

  tokens = batch_size * config.length
  evaluation = {}
  if _EVAL.value:
    eval_fn = train.jit_eval_step(evaluate.eval_task(task))
    eval_compile_s, eval_times = common.time_calls(
        eval_fn, state.params, x0_BL, jax.random.key(1), warmup=_WARMUP.value, steps=_STEPS.value)
    eval_s = common.median(eval_times)
    evaluation = {"eval_compile_s": eval_compile_s, "eval_step_ms": 1e3 * eval_s,
                  "eval_tokens_per_s": tokens / eval_s}
  common.emit({
      "benchmark": "train_step",
      **common.config_summary(config, batch_size, vocab),
      **common.device_summary(),
      "steps": _STEPS.value, "warmup": _WARMUP.value,
      "compile_s": compile_s,
      "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "tokens_per_s": tokens / step_s,
      "pipelined_step_ms": 1e3 * pipelined_s, "pipelined_tokens_per_s": tokens / pipelined_s,
      "dispatch_ms": 1e3 * dispatch_s, "host_ms": 1e3 * host_s,
      **common.throughput(task, batch_size, step_s),
      **evaluation,
      "peak_memory_gib": common.peak_memory_gib(),
      "flop_convention": common.flop_convention(),
  })
  if _PROFILE.value:
    def run_steps():
      s = state
      for _ in range(_PROFILE_STEPS.value):
        s, _ = step_fn(s, batch)
      return s
    hlo_text = step_fn.lower(state, batch).compile().as_text()  # the compiled step, cached
    seconds, _, timelines = trace_summary.trace(run_steps, _PROFILE.value, hlo_text=hlo_text)
    threads = trace_summary.host_threads(trace_summary.newest_trace(_PROFILE.value))
    common.emit({
        "benchmark": "train_step_profile", "attention": config.model.attention,
        "layer_norm": config.model.layer_norm,
        "steps": _PROFILE_STEPS.value, "wall_ms_per_step": 1e3 * seconds / _PROFILE_STEPS.value,
        "timelines": timelines, "host_threads": threads[:_HOST_THREADS]})


if __name__ == "__main__":
  app.run(main)
