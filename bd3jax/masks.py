"""The BD3-LM attention masks, as numpy boolean arrays (True = may attend).

All masks are known at trace time from the sequence length L and the block size L',
so they are built with numpy and enter jitted code as constants.
"""

import dataclasses
import enum
import functools

import numpy as np


def _check(seq_len: int, block_size: int) -> None:
  if seq_len < 1 or block_size < 1:
    raise ValueError(f"seq_len ({seq_len}) and block_size ({block_size}) must be positive")
  if seq_len % block_size:
    raise ValueError(
        f"block_size {block_size} does not divide length {seq_len}; choose a block size "
        f"among the divisors of {seq_len}")


def block_causal_mask(seq_len: int, block_size: int) -> np.ndarray:
  """[L, L] mask: query i sees key j iff block(j) <= block(i)."""
  _check(seq_len, block_size)
  block_L = np.arange(seq_len) // block_size
  return block_L[:, None] >= block_L[None, :]


def causal_mask(seq_len: int) -> np.ndarray:
  """[L, L] lower-triangular mask (block_causal_mask with block size 1)."""
  return block_causal_mask(seq_len, 1)


def training_mask(seq_len: int, block_size: int) -> np.ndarray:
  """[2L, 2L] mask of the vectorised training pass over x_t ⊕ x_0.

  The OR of: block-diagonal (same half, same block), offset block-causal (x_t query,
  x_0 key of a strictly earlier block) and block-causal (both in x_0). x_0 never sees x_t.
  """
  _check(seq_len, block_size)
  idx_T = np.arange(2 * seq_len)
  is_x0_T = idx_T >= seq_len
  block_T = (idx_T % seq_len) // block_size
  q_x0, k_x0 = is_x0_T[:, None], is_x0_T[None, :]
  q_blk, k_blk = block_T[:, None], block_T[None, :]
  block_diagonal = (q_x0 == k_x0) & (q_blk == k_blk)
  offset_block_causal = ~q_x0 & k_x0 & (k_blk < q_blk)
  block_causal = q_x0 & k_x0 & (k_blk <= q_blk)
  return block_diagonal | offset_block_causal | block_causal


class MaskKind(enum.Enum):
  TRAINING = "training"          # x_t ⊕ x_0, length 2L
  BLOCK_CAUSAL = "block_causal"  # length L (block size 1: causal)
  FULL = "full"                  # bidirectional, length L (MDLM)


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """A static description of a BD3 mask; hashable, so it can be a jit static argument.

  `seq_len` is L (the training mask covers 2L tokens).
  """
  kind: MaskKind
  seq_len: int
  block_size: int

  def __post_init__(self):
    _check(self.seq_len, self.block_size)

  @property
  def num_tokens(self) -> int:
    return 2 * self.seq_len if self.kind is MaskKind.TRAINING else self.seq_len

  def dense(self) -> np.ndarray:
    """The [T, T] boolean mask."""
    return _dense(self)


@functools.lru_cache(maxsize=64)
def _dense(mask: AttentionMask) -> np.ndarray:
  if mask.kind is MaskKind.TRAINING:
    out = training_mask(mask.seq_len, mask.block_size)
  elif mask.kind is MaskKind.BLOCK_CAUSAL:
    out = block_causal_mask(mask.seq_len, mask.block_size)
  else:
    out = np.ones((mask.seq_len, mask.seq_len), bool)
  out.setflags(write=False)
  return out


class Tile(enum.IntEnum):
  EMPTY = 0    # nothing visible: never load or compute
  PARTIAL = 1  # apply the mask element-wise
  FULL = 2     # everything visible: skip the mask arithmetic


def tile_map(mask_TS: np.ndarray, tile_q: int, tile_k: int) -> np.ndarray:
  """[T/tile_q, S/tile_k] int8 map of Tile values for a boolean mask."""
  t, s = mask_TS.shape
  if t % tile_q or s % tile_k:
    raise ValueError(f"tiles ({tile_q}, {tile_k}) do not divide the mask shape {mask_TS.shape}")
  counts = mask_TS.reshape(t // tile_q, tile_q, s // tile_k, tile_k).sum(axis=(1, 3))
  out = np.full(counts.shape, Tile.PARTIAL, np.int8)
  out[counts == 0] = Tile.EMPTY
  out[counts == tile_q * tile_k] = Tile.FULL
  return out


def density(mask: np.ndarray) -> float:
  """Fraction of (query, key) pairs that may attend."""
  return float(mask.mean())
