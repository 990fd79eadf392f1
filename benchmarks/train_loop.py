"""Overhead of the full training loop against the bare jitted train step, in one process.

  python benchmarks/train_loop.py                        # the demo config, 120 steps
  python benchmarks/train_loop.py --steps=240 --config.train.log_every=40

The check: on the demo config, the full loop's steps/s (data, logging, checkpointing
included) is at least 90% of the bare jitted step's on the same machine. Prints one JSON
line with both and their ratio. Conventions:
- full loop: `bd3jax.run.train_and_evaluate(config, workdir)` from scratch in a fresh
  workdir for `--steps` steps, with the config's log_every and checkpoint_every (the demo's:
  20 and 100; the default 120 steps put the save of step 100 inside the measured span, one
  save per 100 steps as in a demo run). The loop logs a window of steps every log_every
  steps, after fetching the window's metrics (so after its steps ran). The script stamps the
  wall clock and the process CPU time at each of those writes and measures from the end of
  the first window (which holds the compile) to the end of the last: (steps between) /
  (seconds between). That span holds everything the loop does per step: fetching batches,
  dispatch, metric writes, and the checkpoint saves started inside it; setup (corpus,
  tokenizer, init), the final checkpoint and the final evaluation lie outside it.
  `window_steps_per_s` lists the loop's own `train/steps_per_s` (metrics.jsonl) for every
  window, the first included.
- mid-run evaluation and the noise-interval search (`noise.search_every`, a held-out
  measurement like evaluation) are not loop overhead and each brings a one-time compile, so by
  default both are moved past the last step (`--keep_eval` keeps the config's eval_every and
  search_every; their time then counts).
- bare step: `train.jit_train_step` of the same task, with the loop's mesh and shardings, on
  the restored state and one batch of the same iterator, already on device; first call =
  compile, `--warmup` calls in all, then the median of `--bare_steps` calls, each ended by
  `jax.block_until_ready`.
- ratio = loop steps/s / bare steps/s (wall clock: the check). `checkpoints_measured` /
  `evals_measured` count the saves / evaluations inside the measured span.
- cpu_ratio = bare CPU s per step / loop CPU s per step (process CPU time, all threads; bare
  from the mean over the timed calls). Meaningful on a CPU backend only, where it is less
  sensitive than wall clock (not immune) to other processes on the host. load_avg_1m is the
  host's 1-minute load average before the loop and after the bare step: trust the
  wall-clock ratio only when both stay well under the core count.
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bd3jax import host  # noqa: E402

host.keep_freed_memory()  # as main.py does, before jax starts its threads

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.ROOT, "configs", "demo.py"),
    "Config file; override fields with --config.KEY=VALUE.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 120, "Steps of the full loop (sets config.train.num_steps).")
_KEEP_EVAL = flags.DEFINE_bool("keep_eval", False, "Keep the config's mid-run evaluations and "
                                "noise-interval searches.")
_BARE_STEPS = flags.DEFINE_integer("bare_steps", 20, "Timed calls of the bare step.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed bare calls, the compiling one included.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the loop (default: a temporary "
                               "directory, removed afterwards). Must not hold a checkpoint.")


def loop_windows(workdir: str) -> list[float]:
  """The loop's own `train/steps_per_s` of each window, from metrics.jsonl."""
  from bd3jax import metrics
  return list(metrics.read_scalars(workdir, "train/steps_per_s").values())


@contextlib.contextmanager
def window_stamps():
  """Yields a list that gets (step, wall s, process CPU s) at each training-window write."""
  from bd3jax import metrics
  stamps, write = [], metrics.MetricWriter.write
  def stamped_write(self, step, scalars):
    if "train/steps_per_s" in scalars:
      stamps.append((step, time.perf_counter(), time.process_time()))
    return write(self, step, scalars)
  metrics.MetricWriter.write = stamped_write
  try:
    yield stamps
  finally:
    metrics.MetricWriter.write = write


def bare_step(config, workdir: str) -> dict:
  """Times the bare step on the task, state, data and mesh the loop left in `workdir`."""
  from bd3jax import checkpoint, parallel, run, train
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    s = run.setup(config, workdir, ckpt)
  finally:
    ckpt.close()
  with jax.set_mesh(s.mesh):  # as the loop compiles and runs its step
    step_fn = train.jit_train_step(s.task, parallel.shardings(s.state), s.batch_sharding)
    batch = parallel.global_batch(next(s.train_iter), s.batch_sharding, config.train.batch_size)
    _, compile_s, times, cpu_s = common.time_train_steps(
        step_fn, s.state, batch, warmup=_WARMUP.value, steps=_BARE_STEPS.value)
  return {"vocab_size": s.task.model.cfg.vocab_size, "compile_s": compile_s,
          "step_s": common.median(times), "cpu_s": cpu_s / len(times),
          "devices": s.mesh.size}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from bd3jax import run
  config, steps = _CONFIG.value, _STEPS.value
  t = config.train
  t.num_steps = steps
  if not _KEEP_EVAL.value:
    t.eval_every = steps + 1
    if config.noise.search_every:
      config.noise.search_every = steps + 1
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bd3jax_train_loop_")
  load_before = os.getloadavg()[0]
  try:
    t0 = time.perf_counter()
    with window_stamps() as stamps:
      run.train_and_evaluate(config, workdir)
    loop_wall_s = time.perf_counter() - t0
    if len(stamps) < 2:
      raise app.UsageError(f"{len(stamps)} logging window(s) in {steps} steps; need at least 2: "
                           "raise --steps or lower --config.train.log_every")
    windows = loop_windows(workdir)
    bare = bare_step(config, workdir)
  finally:
    if _WORKDIR.value is None:
      shutil.rmtree(workdir, ignore_errors=True)

  (first_end, wall0, cpu0), (last_end, wall1, cpu1) = stamps[0], stamps[-1]
  n = last_end - first_end
  loop_sps, bare_sps = n / (wall1 - wall0), 1.0 / bare["step_s"]
  loop_cpu_s = (cpu1 - cpu0) / n
  in_span = lambda every: sum(1 for k in range(first_end, last_end) if k % every == 0)
  common.emit({
      "benchmark": "train_loop",
      **common.config_summary(config, t.batch_size, bare["vocab_size"]),
      **common.device_summary(), "devices": bare["devices"],
      "steps": steps, "log_every": t.log_every, "checkpoint_every": t.checkpoint_every,
      "eval_every": t.eval_every if t.eval_every <= steps else None,
      "loop_wall_s": loop_wall_s,
      "measured_steps": n, "measured_s": wall1 - wall0,
      "checkpoints_measured": in_span(t.checkpoint_every),
      "evals_measured": in_span(t.eval_every),
      "searches_measured": in_span(config.noise.search_every) if config.noise.search_every else 0,
      "window_steps_per_s": windows,
      "loop_steps_per_s": loop_sps,
      "bare_compile_s": bare["compile_s"],
      "bare_step_ms": 1e3 * bare["step_s"],
      "bare_steps_per_s": bare_sps,
      "ratio": loop_sps / bare_sps,
      "loop_cpu_s_per_step": loop_cpu_s,
      "bare_cpu_s_per_step": bare["cpu_s"],
      "cpu_ratio": bare["cpu_s"] / loop_cpu_s,
      "load_avg_1m": [load_before, os.getloadavg()[0]],
  })


if __name__ == "__main__":
  app.run(main)
