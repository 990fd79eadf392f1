"""Held-out likelihood: NELBO per token, perplexity and per-block NELBO variance."""

import dataclasses
import time

import jax
import numpy as np

from bd3jax import train

EVAL_CLIP = (1e-3, 1.0)  # t ~ U[1e-3, 1] for the bound, whatever range training used


def eval_task(task: train.Task) -> train.Task:
  """The task that evaluates the true NELBO: unclipped t, no resampling (full masking kept)."""
  cfg = task.loss_cfg
  if cfg.full_masking:
    return task
  return dataclasses.replace(task, loss_cfg=dataclasses.replace(
      cfg, clip_min=EVAL_CLIP[0], clip_max=EVAL_CLIP[1], resample=False))


def evaluate(eval_step, params, batches, *, seed: int, draws: int = 1) -> dict:
  """Held-out NELBO of `params` over `batches` of [B, L] tokens.

  Each sequence gets `draws` independent Monte-Carlo estimates (one t per block each); the
  first token of each row, BOS, is context and not scored. Returns the mean NELBO per token,
  its perplexity, `nelbo_se` (the standard error of the mean over draws; 0 for one draw),
  `block_nelbo_var` (the variance across sequences of each block's NELBO, summed over blocks,
  averaged over draws), the scored tokens per draw and tokens/s (wall clock, a first call's
  compile included). The t draws depend only on `seed`, the batch index and the draw.
  """
  if draws < 1:
    raise ValueError(f"draws {draws} must be at least 1")
  nelbo_sum_D, n_tokens, block_nelbos_D = np.zeros(draws), 0, [[] for _ in range(draws)]
  start = time.perf_counter()
  for i, x0_BL in enumerate(batches):
    batch_key = jax.random.fold_in(jax.random.key(seed), i)
    for d in range(draws):
      key = batch_key if d == 0 else jax.random.fold_in(batch_key, d)
      token_loss_BL, block_nelbo_BN = jax.device_get(eval_step(params, x0_BL, key))
      nelbo_sum_D[d] += float(token_loss_BL[:, 1:].sum())
      block_nelbos_D[d].append(block_nelbo_BN)
    n_tokens += token_loss_BL[:, 1:].size
  seconds = time.perf_counter() - start
  nelbo_D = nelbo_sum_D / n_tokens
  nelbo = float(nelbo_D.mean())
  se = float(nelbo_D.std(ddof=1) / np.sqrt(draws)) if draws > 1 else 0.0
  block_var = np.mean([np.concatenate(b).var(0).sum() for b in block_nelbos_D])
  return {"nelbo": nelbo, "ppl": float(np.exp(nelbo)), "nelbo_se": se,
          "block_nelbo_var": float(block_var), "tokens": n_tokens,
          "tokens_per_s": n_tokens * draws / seconds}
