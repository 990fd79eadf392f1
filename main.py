"""Train, evaluate or sample a BD3-LM.

  python main.py --config=configs/demo.py --workdir=/tmp/demo
  python main.py --config=configs/owt_bd3lm.py --config.block_size=4 --workdir=gs://bucket/run

Running the same command again resumes from the latest checkpoint in --workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override any field with "
    "--config.KEY=VALUE, e.g. --config.block_size=4.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for checkpoints, TensorBoard events and "
    "metrics.jsonl; a run restarted with the same workdir resumes.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"],
    "train: train (resuming if possible), then report held-out perplexity; eval: held-out "
    "perplexity of the workdir's latest checkpoint (EMA weights).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from bd3jax import run
  config = _CONFIG.value
  try:
    if _MODE.value == "train":
      result = run.train_and_evaluate(config, _WORKDIR.value)
    else:
      result = run.evaluate_workdir(config, _WORKDIR.value)
  except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
    if logging.get_verbosity() > logging.INFO:  # --verbosity=1 shows the traceback
      raise
    sys.exit(f"error: {e}")
  if "ppl" in result:
    print(f"step {result['step']}: held-out NELBO {result['nelbo']:.4f} nats/token, "
          f"perplexity {result['ppl']:.2f}")
  logging.info("done: %s", result)


if __name__ == "__main__":
  app.run(main)
