"""The BD3-LM objective: forward masking, SUBS parameterisation and the per-block NELBO.

One loss covers every model the library trains:
- block diffusion (algo "bd3lm"): one vectorised pass over x_t ⊕ x_0 with the training mask;
  block_size == length is MDLM (its single block never sees x_0, so only x_t is run) and
  block_size == 1 with full masking (clip_min = clip_max = 1) is an AR model;
- a plain causal next-token model (algo "ar"): x_0 under the causal mask, targets shifted.
Both reduce per-token losses the same way: the mean over all L tokens of the batch.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from bd3jax import schedules
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model.layer_ops import linear


@dataclasses.dataclass(frozen=True)
class LossConfig:
  algo: str            # "bd3lm" | "ar"
  length: int
  block_size: int
  mask_id: int
  schedule: str = "loglinear"
  clip_min: float = 1e-3
  clip_max: float = 1.0
  resample: bool = True
  antithetic: bool = True
  # None: the network projects every x_t token to logits. (lo, hi): only the masked ones
  # (`masked_log_prob_head`), as many per pair of rows as t drawn from [lo, hi] makes likely
  # when `nelbo` gets an `interval` (t beyond [lo, hi] makes pairs overflow, whose losses are
  # then subsampled; the training loop keeps it at the train state's), else as many as t in
  # [clip_min, clip_max] does.
  logits_interval: tuple[float, float] | None = None

  @property
  def n_blocks(self) -> int:
    return self.length // self.block_size

  @property
  def full_masking(self) -> bool:
    return self.clip_min >= 1.0 and self.clip_max >= 1.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def target_log_prob(logits_BLV, target_BL, excluded_id: int | None = None):
  """log softmax(logits)[target] in float32 [B, L], token `excluded_id`'s logit set to -inf.

  What log_softmax followed by take_along_axis computes, written so that XLA can fuse each pass
  over the [B, L, V] logits: the forward only reduces (the log-sum-exp, and the target's logit
  by a select, not a gather), the backward recomputes the softmax from the logits instead of
  keeping it and returns their gradient in their dtype in one elementwise pass (no scatter)."""
  return _target_log_prob_fwd(logits_BLV, target_BL, excluded_id)[0]


def _excluded(logits_BLV, excluded_id):
  logits_BLV = logits_BLV.astype(jnp.float32)
  if excluded_id is None:
    return logits_BLV
  return jnp.where(jnp.arange(logits_BLV.shape[-1]) == excluded_id, -jnp.inf, logits_BLV)


def _target_log_prob_fwd(logits_BLV, target_BL, excluded_id):
  masked_BLV = _excluded(logits_BLV, excluded_id)
  lse_BL = jax.nn.logsumexp(masked_BLV, axis=-1)
  hit_BLV = jax.nn.one_hot(target_BL, masked_BLV.shape[-1], dtype=jnp.bool_)
  target_logit_BL = jnp.sum(jnp.where(hit_BLV, masked_BLV, 0.0), axis=-1)
  return target_logit_BL - lse_BL, (logits_BLV, target_BL, lse_BL)


def _target_log_prob_bwd(excluded_id, residuals, g_BL):
  logits_BLV, target_BL, lse_BL = residuals
  probs_BLV = jnp.exp(_excluded(logits_BLV, excluded_id) - lse_BL[..., None])
  hit_BLV = jax.nn.one_hot(target_BL, logits_BLV.shape[-1], dtype=jnp.float32)
  grad_BLV = g_BL[..., None] * (hit_BLV - probs_BLV)
  return grad_BLV.astype(logits_BLV.dtype), None


target_log_prob.defvjp(_target_log_prob_fwd, _target_log_prob_bwd)


def subs_log_prob(logits_BLV, x0_BL, masked_BL, mask_id: int):
  """log p(x_0 | x_t) under SUBS: [MASK] gets -inf, unmasked positions copy x_t (log p = 0)."""
  return jnp.where(masked_BL, target_log_prob(logits_BLV, x0_BL, mask_id), 0.0)


def forward_process(key, x0_BL, cfg: LossConfig, interval=None):
  """Draw t per block and mask x_0. Returns (x_t, masked, move chance and weight per token).

  `interval`: a float [2] array (clip_min, clip_max) used instead of cfg's, e.g. the train
  state's tuned interval (ignored under full masking).
  """
  batch = x0_BL.shape[0]
  key_t, key_mask = jax.random.split(key)
  lo, hi = (cfg.clip_min, cfg.clip_max) if interval is None else (interval[0], interval[1])
  if cfg.full_masking:
    t_BN = jnp.ones((batch, cfg.n_blocks))
  else:
    t_BN = schedules.sample_t(key_t, batch, cfg.n_blocks, lo, hi, cfg.antithetic)
  p_BN, w_BN = schedules.move_chance_and_weight(t_BN, cfg.schedule)
  masked_BL = schedules.sample_masked(key_mask, p_BN, cfg.block_size, lo, hi, resample=cfg.resample)
  xt_BL = jnp.where(masked_BL, cfg.mask_id, x0_BL)
  per_token = lambda a_BN: jnp.repeat(a_BN, cfg.block_size, axis=1)
  return xt_BL, masked_BL, per_token(p_BN), per_token(w_BN)


def diffusion_logits(apply_fn: Callable, xt_BL, x0_BL, sigma_B, cfg: LossConfig, **kwargs):
  """Network logits for the x_t tokens, given each block's clean prefix x_0."""
  if cfg.n_blocks == 1:
    return apply_fn(xt_BL, sigma_B, AttentionMask(MaskKind.FULL, cfg.length, cfg.length), **kwargs)
  tokens_BT = jnp.concatenate([xt_BL, x0_BL], axis=1)
  return apply_fn(tokens_BT, sigma_B,
                  AttentionMask(MaskKind.TRAINING, cfg.length, cfg.block_size), **kwargs)


def masked_capacity(cfg: LossConfig, batch: int, interval_given: bool) -> int | None:
  """Tokens per pair of rows that `nelbo` projects to logits (`schedules.pair_capacity`, rounded
  up to a multiple of 8 for the matmul's tiles), or None for all of them: with
  `cfg.logits_interval` set, antithetic t, an even batch and not full masking.
  `interval_given`: whether `nelbo` gets an `interval` (see `LossConfig.logits_interval`)."""
  if (cfg.algo != "bd3lm" or cfg.logits_interval is None or cfg.full_masking
      or not cfg.antithetic or batch % 2):
    return None
  lo, hi = cfg.logits_interval if interval_given else (cfg.clip_min, cfg.clip_max)
  capacity = -(-schedules.pair_capacity(batch, cfg.n_blocks, cfg.block_size, cfg.schedule, lo,
                                        hi, cfg.resample) // 8) * 8
  return capacity if capacity < 2 * cfg.length else None


def _rows_log_prob(x_GND, kernel_DV, bias_V, rows_GR, target_GN, masked_GN, mask_id):
  """SUBS log-probs of the tokens at `rows_GR` (positions within each group), 0 where unmasked."""
  take = lambda a: jnp.take_along_axis(a, rows_GR.reshape(rows_GR.shape + (1,) * (a.ndim - 2)), 1)
  logits_GRV = linear(take(x_GND), kernel_DV, bias_V)
  return jnp.where(take(masked_GN), target_log_prob(logits_GRV, take(target_GN), mask_id), 0.0)


def masked_log_prob_head(x0_BL, masked_BL, mask_id: int, capacity: int, key):
  """A head for the network (`DiT(..., head=)`) that gives `subs_log_prob` [B, L], projecting
  only masked tokens to logits.

  Rows pair up as (2i, 2i+1), which antithetic t balances (`schedules.folded_rows`). Each pair
  projects `capacity` tokens, its masked ones first, in an order drawn from `key`. A pair that
  masks m > capacity tokens (rare, `schedules.pair_capacity`) has a uniformly random `capacity`
  of them projected, their log-probs scaled by m / capacity and the rest 0: unbiased for the
  pair's sum. Otherwise equal to the full logits' log-probs up to matmul rounding. No branch
  depends on the data (run op by op on a GPU, XLA's host waits for a conditional's predicate).
  """
  batch, length = x0_BL.shape
  pairs = lambda a: a.reshape(batch // 2, 2 * length, *a.shape[2:])
  masked_GN, target_GN = pairs(masked_BL), pairs(x0_BL)
  random_GN = jax.random.bits(key, masked_GN.shape, jnp.uint32) >> 1
  priority_GN = jnp.where(masked_GN, random_GN, jnp.uint32(1 << 31))  # masked ones first
  rows_GC = jnp.argsort(priority_GN, axis=1)[:, :capacity]
  scale_G1 = jnp.maximum(masked_GN.sum(1, keepdims=True) / capacity, 1.0)

  def head(x_BLD, kernel_DV, bias_V):
    log_p_GC = _rows_log_prob(pairs(x_BLD), kernel_DV, bias_V, rows_GC, target_GN, masked_GN,
                              mask_id) * scale_G1
    pair_G1 = jnp.arange(batch // 2)[:, None]
    log_p_GN = jnp.zeros(masked_GN.shape, log_p_GC.dtype).at[pair_G1, rows_GC].set(log_p_GC)
    return log_p_GN.reshape(batch, length)
  return head


def nelbo(apply_fn: Callable, x0_BL, key, cfg: LossConfig, train: bool = True, interval=None):
  """The loss and its per-token and per-block parts.

  `apply_fn(tokens, sigma, mask, **kwargs) -> logits` runs the network (`train`: dropout on;
  `head`: see `masked_log_prob_head`, passed when `masked_capacity` is not None);
  `interval` as in `forward_process`. Returns
  (loss, aux) with aux["token_loss"] [B, L] and aux["block_nelbo"] [B, n_blocks] (the
  loss averaged within each block, whose variance the clipped-schedule search minimises).
  """
  kwargs = {"train": train}
  if cfg.algo == "ar":
    mask = AttentionMask(MaskKind.BLOCK_CAUSAL, cfg.length - 1, 1)
    logits_BLV = apply_fn(x0_BL[:, :-1], None, mask, **kwargs)
    with jax.named_scope("loss"):
      nll_BL = -target_log_prob(logits_BLV, x0_BL[:, 1:])
      token_loss_BL = jnp.pad(nll_BL, ((0, 0), (1, 0)))  # position 0 (BOS) is not predicted
      loss = nll_BL.mean()
  else:
    with jax.named_scope("masking"):
      xt_BL, masked_BL, p_BL, w_BL = forward_process(key, x0_BL, cfg, interval)
      sigma_B = -jnp.log1p(-jnp.minimum(p_BL[:, 0], 1.0 - 1e-6))
    capacity = masked_capacity(cfg, x0_BL.shape[0], interval is not None)
    if capacity is None:
      logits_BLV = diffusion_logits(apply_fn, xt_BL, x0_BL, sigma_B, cfg, **kwargs)
      with jax.named_scope("loss"):
        log_p_BL = subs_log_prob(logits_BLV, x0_BL, masked_BL, cfg.mask_id)
    else:
      order_key = jax.random.split(key, 3)[2]  # the first two are forward_process's
      head = masked_log_prob_head(x0_BL, masked_BL, cfg.mask_id, capacity, order_key)
      log_p_BL = diffusion_logits(apply_fn, xt_BL, x0_BL, sigma_B, cfg, head=head, **kwargs)
    with jax.named_scope("loss"):
      token_loss_BL = -w_BL * log_p_BL
      loss = token_loss_BL.mean()
  block_nelbo_BN = token_loss_BL.reshape(x0_BL.shape[0], -1, cfg.block_size).mean(-1)
  return loss, {"token_loss": token_loss_BL, "block_nelbo": block_nelbo_BN}
