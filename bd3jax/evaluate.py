"""Held-out likelihood: NELBO per token, perplexity and per-block NELBO variance."""

import dataclasses

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


def evaluate(eval_step, params, batches, *, seed: int) -> dict:
  """Mean NELBO per token over `batches` of [B, L] tokens (the first token of each row, BOS,
  is context and not scored), perplexity, and the variance across sequences of each block's
  NELBO, summed over blocks. The t draws depend only on `seed` and the batch index."""
  nelbo_sum, n_tokens, block_nelbos = 0.0, 0, []
  for i, x0_BL in enumerate(batches):
    key = jax.random.fold_in(jax.random.key(seed), i)
    token_loss_BL, block_nelbo_BN = jax.device_get(eval_step(params, x0_BL, key))
    nelbo_sum += float(token_loss_BL[:, 1:].sum())
    n_tokens += token_loss_BL[:, 1:].size
    block_nelbos.append(block_nelbo_BN)
  nelbo = nelbo_sum / n_tokens
  return {"nelbo": nelbo, "ppl": float(np.exp(nelbo)),
          "block_nelbo_var": float(np.concatenate(block_nelbos).var(0).sum()),
          "tokens": n_tokens}
