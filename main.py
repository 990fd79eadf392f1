"""Train, evaluate or sample a BD3-LM.

  python main.py --config=configs/demo.py --workdir=/tmp/demo
  python main.py --config=configs/owt_bd3lm.py --config.block_size=4 --workdir=gs://bucket/run

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from bd3jax import host

host.keep_freed_memory()  # first, before jax starts its threads

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import bd3jax  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override any field with "
    "--config.KEY=VALUE, e.g. --config.block_size=4.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for checkpoints, TensorBoard events and "
    "metrics.jsonl; a run restarted with the same workdir resumes.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample"],
    "train: train (resuming if possible), then report held-out perplexity and print "
    "config.sample.num_samples samples; eval: held-out perplexity of the workdir's latest "
    "checkpoint (EMA weights); sample: write samples of it to WORKDIR/samples.jsonl.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start JAX's multi-process runtime (jax.distributed.initialize) before anything else. "
    "auto: when the launch has several processes (SLURM, Open MPI, multi-host TPU environment "
    "variables) or --coordinator_address is given; on: always (TPU VM pods: the workers are "
    "detected from the metadata server); off: never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for --distributed; default: detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes for --distributed; default: detected.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes); default: detected.")
flags.mark_flags_as_required(["config", "workdir"])


def _print_samples(samples, workdir):
  for i, row in enumerate(samples):
    print(f"--- sample {i} ({row['length']} tokens) ---\n{row['text']}")
  print(f"samples written to {workdir}/samples.jsonl, their summary (entropy, NFEs, lengths, "
        f"generative perplexity with --config.sample.scorer) to {workdir}/samples_report.json")


def _run(config, mode: str, workdir: str) -> None:
  from bd3jax import api, run  # imports jax: after flag parsing, so --help stays fast
  if mode == "sample":
    _print_samples(api.sample_workdir(config, workdir), workdir)
    return
  if mode == "train":
    result = run.train_and_evaluate(config, workdir)
    if result.get("preempted"):
      return
  else:
    result = run.evaluate_workdir(config, workdir)
  se = f" ± {result['nelbo_se']:.4f}" if result.get("nelbo_se") else ""
  print(f"step {result['step']}: held-out NELBO {result['nelbo']:.4f}{se} nats/token, "
        f"perplexity {result['ppl']:.2f}, block NELBO variance {result['block_nelbo_var']:.4f}")
  if mode == "train" and config.sample.num_samples > 0:
    _print_samples(api.sample_workdir(config, workdir), workdir)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(bd3jax.__file__)) + os.sep


def _quiet_libraries(record) -> bool:
  """At the default verbosity, INFO lines come from bd3jax only (orbax and grain are chatty)."""
  return (record.levelno >= logging.converter.STANDARD_WARNING
          or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
          or logging.get_verbosity() > logging.INFO)


def _start_distributed() -> None:
  """Joins the other processes of a multi-host run; only process 0 then logs and prints."""
  import jax
  from bd3jax import parallel
  started = parallel.initialize_distributed(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  if started and jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
    sys.stdout = open(os.devnull, "w")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    _start_distributed()
    _run(_CONFIG.value, _MODE.value, _WORKDIR.value)
  except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
    if logging.get_verbosity() > logging.INFO:  # --verbosity=1 shows the traceback
      raise
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
