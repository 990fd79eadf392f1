"""Speed of the KV-cached sampler, the parallel rules' speed/quality curve, and the per-block cost.

  python benchmarks/sampler.py              # small model, L = 1024, L' = 16, batch 1 and 64, bf16
  python benchmarks/sampler.py --workdir=RUN  # a trained checkpoint (meaningful quality figures)
  python benchmarks/sampler.py --config.model.attention=pallas  # the Pallas KV-cache kernel (GPU)
  python benchmarks/sampler.py --workdir=RUN --scorer=AR_RUN  # + generative perplexity
  python benchmarks/sampler.py --config.model.n_layers=4 --config.model.d_model=256 \\
      --config.model.n_heads=4 --config.model.dtype=float32 --vocab_size=8192 \\
      --batch_sizes=1 --parallel_batch=4 --runs=1          # a CPU-sized run

Prints JSON lines. Conventions:
- model: `--config`'s network with random weights, every parameter perturbed by
  `--param_noise` x N(0, 1) so that the zero-initialised output layer gives peaked, varied
  predictions (speed only; the quality figures mean something only with `--workdir`).
- every run samples a fixed length (`--config.length`, BOS included): no EOS, no entropy
  stop, no prompt; nucleus p = `--nucleus_p`, temperature 1. Generated tokens = batch x (L - 1).
- timing: the first call of `sampling.generate` compiles and runs (`first_call_s`); then the
  median of `--runs` calls, each ended by `jax.block_until_ready`.
- "speed": the first_hitting rule (one token per NFE) at each of `--batch_sizes`, for each
  value of `--nucleus_bits` (bits per pass of the exact top-p search; by default the
  backend's choice, `SamplerConfig.nucleus_pass_bits`):
  tokens_per_s = generated tokens / time; ms_per_nfe = time / NFEs per sequence (the commit
  passes, one per block, are included in the time, not counted as NFEs); ms_per_forward =
  time / batched network passes (denoising and commit).
- "parallel": each rule setting of `--parallel` at batch `--parallel_batch`: nfes_per_token
  (mean over sequences), tokens_per_s, unigram_entropy (mean over sequences, nats), and with
  `--scorer` (needs `--workdir`) gen_ppl: the samples' text scored by `bd3jax.generative`.
- "flat_cost" (`--flat_cost`): per-block time of the cached sampler at batch 1, from host
  timestamps taken by the `on_block` callback (per block the minimum over max(`--runs`, 2)
  runs; first: median of blocks 1-8; last: median of the last 8; cached_ratio = last / first
  in wall time, cached_cpu_ratio in process CPU time), against the uncached recompute: L' times one
  full forward over the prefix of n tokens under the block-causal mask (median of `--runs` + 2
  calls), for n = L', L/4, L/2, L.
- "profile" (`--profile_dir=DIR`): after each speed run, one call of its compiled sampler over
  its first `--profile_blocks` blocks (the block count is data) under the profiler, trace
  written under DIR/bitsN_batchB: wall ms per NFE and the time per op and per device timeline
  (benchmarks/trace_summary.py).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bd3jax import host  # noqa: E402

host.keep_freed_memory()  # as main.py does, before jax starts its threads

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common, trace_summary  # noqa: E402
from bd3jax import config as config_lib  # noqa: E402
from bd3jax import generative, sampling  # noqa: E402
from bd3jax.masks import AttentionMask, MaskKind  # noqa: E402
from bd3jax.model import DiT  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.ROOT, "configs", "base.py"),
    "Config file (network, length, block_size); override fields with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "Sample a trained checkpoint of this workdir.")
_SCORER = flags.DEFINE_string("scorer", "", "With --workdir: score the parallel rules' samples "
                              "with this AR run's workdir or hf:NAME (generative perplexity).")
_VOCAB = flags.DEFINE_integer("vocab_size", 50258, "Vocabulary size with random weights.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes of the speed runs.")
_PARALLEL = flags.DEFINE_list(
    "parallel", ["threshold:0.9", "threshold:0.7", "threshold:0.5", "entropy:0.5", "entropy:2",
                 "topk:2", "topk:4", "topk:8"],
    "Parallel rule settings RULE:VALUE (threshold tau, entropy bound, topk k); empty: none.")
_PARALLEL_BATCH = flags.DEFINE_integer("parallel_batch", 64, "Batch of the parallel-rule runs.")
_FLAT = flags.DEFINE_bool("flat_cost", True, "Measure the per-block cost against a recompute.")
_PROFILE = flags.DEFINE_string("profile_dir", "", "Trace a short run at each batch size into "
                               "this directory and print where its time goes.")
_PROFILE_BLOCKS = flags.DEFINE_integer("profile_blocks", 8, "Blocks sampled by a traced run.")
_RUNS = flags.DEFINE_integer("runs", 3, "Timed calls per measurement.")
_NUCLEUS = flags.DEFINE_float("nucleus_p", 0.9, "Nucleus (top-p) of every run.")
_NUCLEUS_BITS = flags.DEFINE_list(
    "nucleus_bits", [], "Bits of the nucleus cutoff settled per pass over the vocabulary "
    "(SamplerConfig.nucleus_bits): the speed runs run each value, the other runs the first; "
    "none given: the backend's default.")
_NOISE = flags.DEFINE_float("param_noise", 0.1, "Scale of the random weights' perturbation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and of the samples.")


def random_model(config, vocab: int, noise: float, seed: int):
  model = DiT(config_lib.model_config(config, vocab))
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, config.block_size, config.block_size)

  @jax.jit
  def init(key):
    init_key, noise_key = jax.random.split(key)
    params = nn.unbox(model.init(init_key, jnp.zeros((1, mask.num_tokens), jnp.int32), None,
                                 mask)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    return jax.tree.unflatten(tree, [p + noise * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return model, init(jax.random.key(seed)), {"bos_id": 0, "mask_id": vocab - 1}


def workdir_model(workdir: str, config):
  """The checkpoint's EMA weights; sets config.length and block_size to the run's."""
  from bd3jax.api import BD3LM
  lm = BD3LM.from_workdir(workdir)
  config.length, config.block_size = lm.length, lm.block_size
  return (DiT(lm.model_cfg), lm.params, {"bos_id": lm.ids.bos_id, "mask_id": lm.ids.mask_id},
          lm.tokenizer)


def timed(fn, runs: int):
  """(first call's seconds, median seconds of `runs` more, last result) of `fn()`, each call
  ended by block_until_ready."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first_call_s = time.perf_counter() - t0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first_call_s, statistics.median(times), out


def nucleus_bits_values() -> list[int | None]:
  """The --nucleus_bits values, or [None] (SamplerConfig's backend default) when none given."""
  return [int(bits) for bits in _NUCLEUS_BITS.value] or [None]


def sampler_cfg(config, **kwargs):
  kwargs.setdefault("nucleus_bits", nucleus_bits_values()[0])
  return sampling.SamplerConfig(
      length=config.length, block_size=config.block_size, steps=config.block_size,
      nucleus_p=_NUCLEUS.value, autoregressive=config.algo == "ar", stop_entropy=0.0, **kwargs)


def run_sampler(model, params, ids, cfg, batch: int, runs: int, quality=None):
  """Timings and NFEs of `batch` samples; `quality(output) -> dict` adds quality figures."""
  key = jax.random.key(_SEED.value)
  generate = lambda: sampling.generate(model, params, key, cfg, num_samples=batch, **ids)
  first_call_s, seconds, out = timed(generate, runs)
  generated = batch * (cfg.length - 1)
  nfes = float(np.mean(out.nfes_B))
  return {"batch": batch, "rule": cfg.rule, "nucleus_bits": cfg.nucleus_pass_bits,
          "first_call_s": first_call_s, "seconds": seconds,
          "tokens_per_s": generated / seconds, "nfes_per_sequence": nfes,
          "nfes_per_token": nfes / (cfg.length - 1), "ms_per_nfe": 1e3 * seconds / nfes,
          "forwards": int(out.forwards), "ms_per_forward": 1e3 * seconds / int(out.forwards),
          "unigram_entropy": float(np.mean(out.entropy_B)), **(quality(out) if quality else {})}


def profile(model, params, ids, cfg, batch: int, directory: str) -> dict:
  """One traced call of the sampler at `batch` over its first `--profile_blocks` blocks."""
  blocks = min(_PROFILE_BLOCKS.value, cfg.n_blocks)
  seconds, out, timelines = trace_summary.trace(
      lambda: sampling.generate(model, params, jax.random.key(_SEED.value), cfg,
                                num_samples=batch, num_blocks=blocks, **ids), directory)
  nfes = float(np.mean(out.nfes_B))
  return {"batch": batch, "rule": cfg.rule, "nucleus_bits": cfg.nucleus_pass_bits, "blocks": blocks,
          "seconds": seconds, "nfes_per_sequence": nfes, "ms_per_nfe": 1e3 * seconds / nfes,
          "forwards": int(out.forwards), "timelines": timelines}


def generative_perplexity(tokenizer, scorer):
  def quality(out) -> dict:
    return {"gen_ppl": generative.report(sampling.rows(out, tokenizer.decode), scorer)["gen_ppl"]}
  return quality


def parallel_setting(text: str) -> dict:
  rule, value = text.split(":")
  field = {"threshold": "threshold", "entropy": "entropy_bound", "topk": "tokens_per_step"}[rule]
  return {"rule": rule, field: int(value) if rule == "topk" else float(value)}


def block_times(model, params, ids, cfg, runs: int):
  """Wall and process CPU seconds of each block at batch 1, from host timestamps taken by
  `on_block` (called once each block's tokens exist); per block the minimum over `runs` runs."""
  stamps = []
  stamp = lambda block: stamps.append((time.perf_counter(), time.process_time()))
  run = lambda: sampling.generate(model, params, jax.random.key(_SEED.value), cfg, num_samples=1,
                                  on_block=stamp, **ids)  # one callback: one compilation
  jax.block_until_ready(run())
  jax.effects_barrier()
  per_run = []
  for _ in range(runs):
    stamps.clear()
    stamp(-1)
    jax.block_until_ready(run())
    jax.effects_barrier()
    per_run.append(np.diff(np.array(stamps), axis=0))
  wall, cpu = np.min(per_run, axis=0).T
  return wall, cpu


def recompute_block_seconds(model, params, n: int, block_size: int, runs: int) -> float:
  """L' x one forward over n tokens under the block-causal mask (a dense sampler's block)."""
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, n, block_size)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, None, mask))
  tokens = jnp.zeros((1, n), jnp.int32)
  _, seconds, _ = timed(lambda: forward(params, tokens), runs + 2)
  return block_size * seconds


def flat_cost(model, params, ids, config, runs: int) -> dict:
  cfg = sampler_cfg(config, rule="first_hitting")
  wall, cpu = block_times(model, params, ids, cfg, max(runs, 2))
  first, last = (lambda t: float(np.median(t[1:9]))), (lambda t: float(np.median(t[-8:])))
  lengths = sorted({config.block_size, config.length // 4, config.length // 2, config.length})
  cached = {str(n): float(wall[n // config.block_size - 1]) for n in lengths}
  recompute = {str(n): recompute_block_seconds(model, params, n, config.block_size, runs)
               for n in lengths}
  return {"cached_first_block_s": first(wall), "cached_last_block_s": last(wall),
          "cached_ratio": last(wall) / first(wall), "cached_cpu_ratio": last(cpu) / first(cpu),
          "cached_block_s_at_length": cached, "recompute_block_s_at_length": recompute,
          "recompute_ratio": recompute[str(lengths[-1])] / recompute[str(lengths[0])],
          "load_avg_1m": os.getloadavg()[0]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, runs = _CONFIG.value, _RUNS.value
  if _SCORER.value and not _WORKDIR.value:
    raise app.UsageError("--scorer needs --workdir: random weights have no tokenizer")
  quality = None
  if _WORKDIR.value:
    model, params, ids, tokenizer = workdir_model(_WORKDIR.value, config)
    if _SCORER.value:
      quality = generative_perplexity(tokenizer, generative.load_scorer(_SCORER.value))
  else:
    model, params, ids = random_model(config, _VOCAB.value, _NOISE.value, _SEED.value)
  m = model.cfg
  base = {"device": common.device_summary(), "length": config.length,
          "block_size": config.block_size, "n_layers": m.n_layers, "d_model": m.d_model,
          "n_heads": m.n_heads, "vocab_size": m.vocab_size, "dtype": m.dtype,
          "attention": m.attention,
          "weights": _WORKDIR.value or "random"}
  for bits in nucleus_bits_values():
    speed_cfg = sampler_cfg(config, rule="first_hitting", nucleus_bits=bits)
    for batch in map(int, _BATCHES.value):
      result = run_sampler(model, params, ids, speed_cfg, batch, runs)
      common.emit({"kind": "speed", **base, **result})
      if _PROFILE.value:
        directory = os.path.join(_PROFILE.value,
                                 f"bits{speed_cfg.nucleus_pass_bits}_batch{batch}")
        common.emit({"kind": "profile", **base,
                     **profile(model, params, ids, speed_cfg, batch, directory)})
  for text in _PARALLEL.value:
    setting = parallel_setting(text)
    result = run_sampler(model, params, ids, sampler_cfg(config, **setting), _PARALLEL_BATCH.value,
                         runs, quality)
    common.emit({"kind": "parallel", **base, "setting": text, **result})
  if _FLAT.value:
    common.emit({"kind": "flat_cost", **base, **flat_cost(model, params, ids, config, runs)})


if __name__ == "__main__":
  app.run(main)
