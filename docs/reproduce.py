"""The small-scale reproduction in docs/results.md: AR, BD3-LM (L' = 1, 4, 16) and MDLM on the
bundled documentation corpus, same model, data and token budget; writes docs/results.json and
the plots.

  python docs/reproduce.py --steps=400 --workdir=/tmp/bd3jax_results

Each run trains `configs/demo.py` with the overrides in RUNS (resuming if its workdir holds a
checkpoint), then measures on the held-out split: the NELBO with `--draws` Monte-Carlo draws per
sequence (t ~ U[1e-3, 1] per block; AR and full masking: exact), and for diffusion runs the
variance of training's per-block NELBO estimator (bd3jax.clip_search) under the run's final
training interval and under U[1e-3, 1]. Finished runs found in results.json are not re-run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bd3jax import host  # noqa: E402

host.keep_freed_memory()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bd3jax import checkpoint, clip_search, evaluate, metrics, run  # noqa: E402
from configs import demo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps of every run (batch 16 x 128 tokens).")
_DRAWS = flags.DEFINE_integer("draws", 4, "Monte-Carlo NELBO draws per held-out sequence.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bd3jax_results", "Parent of the runs' workdirs.")
_ONLY = flags.DEFINE_list("only", [], "Run only these runs (default: all).")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only redraw the plots from results.json.")

FULL = {"noise.clip_min": 1.0, "noise.clip_max": 1.0, "noise.search_every": 0}
UNIFORM = {"noise.clip_min": 1e-3, "noise.clip_max": 1.0, "noise.search_every": 0}
TUNED = {"noise.clip_min": 1e-3, "noise.clip_max": 1.0}   # the demo's search re-tunes it
RUNS = {
    "ar": {"algo": "ar", "block_size": 1, **UNIFORM},
    "bd3_L1_full": {"block_size": 1, **FULL},
    "bd3_L4_tuned": {"block_size": 4, **TUNED},
    "bd3_L16_tuned": {"block_size": 16, **TUNED},
    "mdlm": {"block_size": 128, **UNIFORM},
    "bd3_L4_uniform": {"block_size": 4, **UNIFORM},
    "bd3_L1_uniform": {"block_size": 1, **UNIFORM},
}


def make_config(overrides: dict, steps: int):
  config = demo.get_config()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  config.train.update(num_steps=steps, eval_every=steps, checkpoint_every=steps)
  config.sample.num_samples = 0
  return config


def estimator_variance(config, workdir: str) -> dict:
  """Variance of training's block-NELBO estimator, final training interval vs U[1e-3, 1]."""
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  try:
    s = run.setup(config, workdir, ckpt)
  finally:
    ckpt.close()
  interval = np.asarray(jax.device_get(s.state.noise_interval), np.float32)
  intervals = np.stack([interval, np.array(evaluate.EVAL_CLIP, np.float32)])
  step = clip_search.jit_search_step(s.task, chunk=2)
  batches = run.valid_batches(config, s.data)
  var = clip_search.block_nelbo_variance(step, s.state.ema_params, batches, intervals,
                                         seed=config.seed)
  return {"interval": interval.tolist(), "var_train_interval": float(var[0]),
          "var_uniform": float(var[1])}


def plot(results: dict) -> None:
  """docs/results_ppl.png (held-out perplexity) and docs/results_loss.png (training loss)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [n for n in RUNS if n in results]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ppl = [results[n]["ppl"] for n in names]
  err = [results[n]["ppl"] * 2 * results[n]["nelbo_se"] for n in names]  # 2 SE, delta method
  ax.bar(names, ppl, yerr=err, color="tab:blue", capsize=3)
  ax.set_ylabel("held-out perplexity (bound)")
  ax.set_title(f"{results[names[0]]['train_tokens'] / 1e6:.2f}M training tokens each")
  ax.tick_params(axis="x", rotation=30)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "results_ppl.png"), dpi=120)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for n in names:
    curve = {int(k): v for k, v in results[n]["train_loss"].items()}
    steps = sorted(curve)
    ax.plot(steps, [curve[k] for k in steps], label=n)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (window mean)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "results_loss.png"), dpi=120)


def main(argv):
  del argv
  path = os.path.join(HERE, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  if _PLOT_ONLY.value:
    plot(results)
    return
  for name, overrides in RUNS.items():
    if (_ONLY.value and name not in _ONLY.value) or name in results:
      continue
    config = make_config(overrides, _STEPS.value)
    workdir = os.path.join(_WORKDIR.value, name)
    run.train_and_evaluate(config, workdir)
    config.train.eval_draws = _DRAWS.value
    row = {"overrides": overrides, "steps": _STEPS.value,
           "train_tokens": _STEPS.value * config.train.batch_size * config.length,
           **run.evaluate_workdir(config, workdir),
           "train_loss": metrics.read_scalars(workdir, "train/loss"),
           "search": {k: metrics.read_scalars(workdir, f"noise/{k}")
                      for k in ("clip_min", "clip_max", "block_nelbo_var",
                                "block_nelbo_var_before")}}
    if config.algo == "bd3lm" and config.noise.clip_min < 1.0:
      row.update(estimator_variance(config, workdir))
    results[name] = row
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
    print(name, {k: row[k] for k in ("nelbo", "nelbo_se", "ppl", "block_nelbo_var")}, flush=True)
  plot(results)


if __name__ == "__main__":
  app.run(main)
