"""Overhead of the full training loop against the bare jitted train step, in one process.

  python benchmarks/train_loop.py                        # the demo config, 120 steps
  python benchmarks/train_loop.py --steps=240 --config.train.log_every=40

The check: on the demo config, the full loop's steps/s (data, logging, checkpointing
included) is at least 90% of the bare jitted step's on the same machine. Prints one JSON
line with both and their ratio. Conventions:
- full loop: `bd3jax.run.train_and_evaluate(config, workdir)` from scratch in a fresh
  workdir for `--steps` steps, with the config's log_every and checkpoint_every (the demo's:
  20 and 100). Its steps/s is read from the loop's own `train/steps_per_s` windows in
  `metrics.jsonl`: the windows tile the run (each starts where the previous one was fetched),
  so a window holds everything done between its steps: fetching batches, dispatch, metric
  writes, and a checkpoint save started at its first step. The first window is dropped (it
  holds the compile); the rest give sum(steps) / sum(seconds). Setup (corpus, tokenizer,
  init), the final checkpoint and the final evaluation lie outside every window.
- mid-run evaluation is not loop overhead and brings a one-time compile, so by default it is
  moved past the last step (`--keep_eval` keeps the config's eval_every; its time then counts).
- bare step: `train.jit_train_step` of the same task, restored state and one batch of the
  same iterator, already on device; first call = compile, `--warmup` calls in all, then the
  median of `--bare_steps` calls, each ended by `jax.block_until_ready`.
- ratio = loop steps/s / bare steps/s. `checkpoints_measured` / `evals_measured` count the
  saves / evaluations inside the measured windows; with 0 the ratio leaves them out.
"""

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.ROOT, "configs", "demo.py"),
    "Config file; override fields with --config.KEY=VALUE.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 120, "Steps of the full loop (sets config.train.num_steps).")
_KEEP_EVAL = flags.DEFINE_bool("keep_eval", False, "Keep the config's mid-run evaluations.")
_BARE_STEPS = flags.DEFINE_integer("bare_steps", 20, "Timed calls of the bare step.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed bare calls, the compiling one included.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the loop (default: a temporary "
                               "directory, removed afterwards). Must not hold a checkpoint.")


def loop_windows(workdir: str) -> list[tuple[int, int, float]]:
  """(last step, steps, seconds) of each `train/steps_per_s` window in metrics.jsonl."""
  out, prev = [], 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/steps_per_s" in rec:
        n = rec["step"] - prev
        out.append((rec["step"], n, n / rec["train/steps_per_s"]))
        prev = rec["step"]
  return out


def bare_step(config, workdir: str) -> dict:
  """Times the bare step on the task, state and data the loop left in `workdir`."""
  from bd3jax import checkpoint, run, train
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    s = run.setup(config, workdir, ckpt)
  finally:
    ckpt.close()
  batch = jax.device_put(next(s.train_iter))
  _, compile_s, times = common.time_train_steps(
      train.jit_train_step(s.task), s.state, batch, warmup=_WARMUP.value, steps=_BARE_STEPS.value)
  return {"vocab_size": s.task.model.cfg.vocab_size, "compile_s": compile_s,
          "step_s": common.median(times)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from bd3jax import run
  config, steps = _CONFIG.value, _STEPS.value
  t = config.train
  t.num_steps = steps
  if not _KEEP_EVAL.value:
    t.eval_every = steps + 1
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bd3jax_train_loop_")
  try:
    t0 = time.perf_counter()
    run.train_and_evaluate(config, workdir)
    loop_wall_s = time.perf_counter() - t0
    windows = loop_windows(workdir)
    if len(windows) < 2:
      raise app.UsageError(f"{len(windows)} logging window(s) in {steps} steps; need at least 2: "
                           "raise --steps or lower --config.train.log_every")
    first_end, measured = windows[0][0], windows[1:]
    last_end = measured[-1][0]
    loop_steps = sum(n for _, n, _ in measured)
    loop_s = sum(sec for _, _, sec in measured)
    bare = bare_step(config, workdir)
  finally:
    if _WORKDIR.value is None:
      shutil.rmtree(workdir, ignore_errors=True)

  in_measured = lambda every: sum(1 for k in range(first_end, last_end) if k % every == 0)
  loop_sps, bare_sps = loop_steps / loop_s, 1.0 / bare["step_s"]
  common.emit({
      "benchmark": "train_loop",
      **common.config_summary(config, t.batch_size, bare["vocab_size"]),
      **common.device_summary(),
      "steps": steps, "log_every": t.log_every, "checkpoint_every": t.checkpoint_every,
      "eval_every": t.eval_every if t.eval_every <= steps else None,
      "first_window_s": windows[0][2],
      "measured_steps": loop_steps, "measured_s": loop_s,
      "checkpoints_measured": in_measured(t.checkpoint_every),
      "evals_measured": in_measured(t.eval_every),
      "window_steps_per_s": [n / sec for _, n, sec in windows],
      "loop_wall_s": loop_wall_s,
      "loop_steps_per_s": loop_sps,
      "bare_compile_s": bare["compile_s"],
      "bare_step_ms": 1e3 * bare["step_s"],
      "bare_steps_per_s": bare_sps,
      "ratio": loop_sps / bare_sps,
  })


if __name__ == "__main__":
  app.run(main)
