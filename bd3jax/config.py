"""Config checks and the typed views of an ml_collections config that the library uses.

`validate` runs before anything compiles and names the offending key and the fix.
"""

import numpy as np

from bd3jax import schedules
from bd3jax.diffusion import LossConfig
from bd3jax.model import ModelConfig
from bd3jax.model.attention import IMPLEMENTATIONS
from bd3jax.model.layer_ops import LAYER_NORMS

ALGOS = ("bd3lm", "ar")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config value that cannot work, with the key and the fix in the message."""


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config) -> None:
  """Reject a config that cannot train, with a message naming the key."""
  length, block = config.length, config.block_size
  _require(config.algo in ALGOS, f"algo {config.algo!r} is not one of {ALGOS}")
  _require(length >= 2, f"length {length} must be at least 2")
  _require(block >= 1, f"block_size {block} must be at least 1")
  _require(length % block == 0,
           f"block_size {block} does not divide length {length}; use a divisor of {length}")
  if config.algo == "ar":
    _require(block == 1, f"block_size {block} must be 1 for algo 'ar'")
  m = config.model
  _require(m.d_model % m.n_heads == 0,
           f"model.n_heads {m.n_heads} does not divide model.d_model {m.d_model}")
  _require((m.d_model // m.n_heads) % 2 == 0,
           f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for rotary")
  _require(m.dtype in DTYPES, f"model.dtype {m.dtype!r} is not one of {DTYPES}")
  _require(m.attention in IMPLEMENTATIONS,
           f"model.attention {m.attention!r} is not one of {IMPLEMENTATIONS}")
  _require(m.layer_norm in LAYER_NORMS,
           f"model.layer_norm {m.layer_norm!r} is not one of {LAYER_NORMS}")
  _require(0.0 <= m.dropout < 1.0, f"model.dropout {m.dropout} must be in [0, 1)")
  if m.time_conditioning:
    _require(config.algo == "bd3lm" and block == length,
             "model.time_conditioning needs one t per sequence: set block_size = length (MDLM) "
             "or turn it off")
  n = config.noise
  _require(n.schedule in schedules.SCHEDULES,
           f"noise.schedule {n.schedule!r} is not one of {sorted(schedules.SCHEDULES)}")
  _require(0.0 < n.clip_min <= n.clip_max <= 1.0,
           f"noise.clip_min {n.clip_min} and noise.clip_max {n.clip_max} must satisfy "
           "0 < clip_min <= clip_max <= 1")
  if n.resample and config.algo == "bd3lm":
    _require(schedules.has_valid_masked_count(block, n.clip_min, n.clip_max),
             f"noise.clip_min/clip_max [{n.clip_min}, {n.clip_max}]: no masked fraction k/{block} "
             f"of a block of {block} tokens lies in it, so resampling could never accept a block; "
             "widen the interval or set noise.resample=False")
  _require(n.search_every >= 0, f"noise.search_every {n.search_every} must be >= 0 (0: no search)")
  if n.search_every:
    _require(config.algo == "bd3lm" and not (n.clip_min >= 1.0 and n.clip_max >= 1.0),
             "noise.search_every: the interval search needs a diffusion model (algo 'bd3lm' "
             "without full masking); set noise.search_every=0")
    _require(n.search_batches >= 1 and n.search_chunk >= 1,
             f"noise.search_batches {n.search_batches} and noise.search_chunk {n.search_chunk} "
             "must be at least 1")
    _require(all(0.0 < w < 1.0 for w in n.search_widths),
             f"noise.search_widths {tuple(n.search_widths)}: every width must lie in (0, 1)")
  t = config.train
  _require(t.batch_size >= 1 and t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
           f"train.grad_accum {t.grad_accum} must divide train.batch_size {t.batch_size}")


def model_config(config, vocab_size: int) -> ModelConfig:
  m = config.model
  return ModelConfig(
      vocab_size=vocab_size, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
      cond_dim=m.cond_dim, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
      adaln=config.algo != "ar", time_conditioning=m.time_conditioning, dtype=m.dtype,
      attention=m.attention, layer_norm=m.layer_norm)


def loss_config(config, mask_id: int) -> LossConfig:
  """The loss, with logits only at masked tokens, sized for t in the configured interval."""
  n = config.noise
  return LossConfig(
      algo=config.algo, length=config.length, block_size=config.block_size, mask_id=mask_id,
      schedule=n.schedule, clip_min=n.clip_min, clip_max=n.clip_max, resample=n.resample,
      antithetic=n.antithetic, logits_interval=(n.clip_min, n.clip_max))


def validate_tokens(tokens: np.ndarray, vocab_size: int, mask_id: int) -> None:
  """Reject token ids outside [0, vocab_size) or equal to the mask id, before compiling."""
  tokens = np.asarray(tokens)
  if tokens.size == 0:
    raise ValueError("no tokens to train on")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"token ids span [{lo}, {hi}] but the vocabulary has {vocab_size} ids; "
                     "use the tokenizer the data was made with, or raise the vocabulary size")
  if not 0 <= mask_id < vocab_size:
    raise ValueError(f"mask id {mask_id} is outside the vocabulary of {vocab_size} ids")
  if np.any(tokens == mask_id):
    raise ValueError(f"mask id {mask_id} collides with a real token in the data; reserve a "
                     "dedicated id for [MASK] (e.g. append one to the vocabulary)")
