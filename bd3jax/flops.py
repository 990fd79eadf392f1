"""Model FLOPs per training sequence and model-FLOPs utilisation (MFU).

Convention: matmul FLOPs only (2 per multiply-add) of the trunk over every token it runs
(2L for block diffusion, L for MDLM's single block, L - 1 for AR; in block diffusion's last
layer only the x_t half past the q, k, v projection), attention scores and values over the
visible (query, key) pairs, the output projection on the x_t half only (given the batch, on
the tokens the loss projects: `diffusion.masked_capacity`), and x3 for the backward pass.
Embedding lookups, norms, adaLN and softmax are not counted.
"""

import jax

from bd3jax.diffusion import LossConfig, masked_capacity
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import ModelConfig

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6": 918e12,
}


def training_mask_spec(loss_cfg: LossConfig) -> AttentionMask:
  """The attention mask the training pass runs under."""
  if loss_cfg.algo == "ar":
    return AttentionMask(MaskKind.BLOCK_CAUSAL, loss_cfg.length - 1, 1)
  if loss_cfg.n_blocks == 1:
    return AttentionMask(MaskKind.FULL, loss_cfg.length, loss_cfg.length)
  return AttentionMask(MaskKind.TRAINING, loss_cfg.length, loss_cfg.block_size)


def train_flops_per_sequence(model: ModelConfig, loss_cfg: LossConfig,
                             batch: int | None = None) -> float:
  """Forward + backward model FLOPs for one L-token training sequence; `batch`: the sequences
  per loss evaluation (the micro-batch), which sets how many tokens the loss projects."""
  mask = training_mask_spec(loss_cfg)
  t, d = mask.num_tokens, model.d_model
  outputs = loss_cfg.length - 1 if loss_cfg.algo == "ar" else loss_cfg.length
  capacity = None if batch is None else masked_capacity(loss_cfg, batch, interval_given=True)
  projected = outputs if capacity is None else capacity / 2

  def layer(queries: int) -> float:  # a block whose first `queries` tokens go on past q, k, v
    qkv = 2 * 3 * d * d * t
    per_query = 2 * (d * d + 2 * model.mlp_ratio * d * d)
    return qkv + queries * per_query + 4 * d * mask.dense()[:queries].sum()

  last = outputs if mask.kind is MaskKind.TRAINING else t
  trunk = (model.n_layers - 1) * layer(t) + layer(last)
  return 3.0 * (trunk + 2 * projected * d * model.vocab_size)


def peak_flops_per_device() -> float | None:
  """The device's dense bf16 peak, or None where unknown (e.g. CPU)."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None
