"""What a block-sparse kernel needs to know about a BD3 mask, all static.

The mask is split into tiles of `block_q` queries by `block_k` keys and each tile is
classified by `masks.tile_map` as empty, partial or full. A kernel program that owns one
row tile visits only the non-empty column tiles of its row, listed as:
- `counts_N2[n] = (number of full tiles, number of partial tiles)` of row tile n;
- `index_NP[n]`: their column-tile indices, the full ones first, then the partial ones,
  padded with zeros to a power of two P (Triton block shapes must be powers of two).
Empty tiles appear nowhere, so they are never loaded nor computed; the kernel runs a
loop without mask arithmetic over the full tiles, then a masked loop over the partial ones.
The forward pass and dq use the lists over key tiles per query tile, dk/dv the transposed ones.
When only the first queries are wanted (the x_t half in the training pass's last layer), the
lists cover only their row tiles.

`visible` recomputes the mask element-wise from positions (integer arithmetic, no mask
tensor in memory); the kernels call it on partial tiles only.

Token counts that no tile divides (e.g. the AR model's L - 1 causal tokens) are padded to
`num_tokens`: padding tokens see only each other, so real rows are unchanged and every
padded row has a well-defined softmax (no NaN reaches the gradients).
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from bd3jax.masks import AttentionMask, MaskKind, Tile, tile_map


@dataclasses.dataclass(frozen=True)
class TileLists:
  """Non-empty column tiles of each row tile: full ones first, then partial ones."""
  counts_N2: np.ndarray  # int32 [row tiles, 2]: (n_full, n_partial)
  index_NP: np.ndarray   # int32 [row tiles, P]: column-tile indices, zero-padded


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def tile_lists(map_NM: np.ndarray) -> TileLists:
  """Lists the non-empty tiles of each row of a `masks.tile_map`."""
  n_full_N = (map_NM == Tile.FULL).sum(1)
  n_partial_N = (map_NM == Tile.PARTIAL).sum(1)
  width = _next_power_of_two(int((n_full_N + n_partial_N).max()))
  index_NP = np.zeros((map_NM.shape[0], width), np.int32)
  for n, row_M in enumerate(map_NM):
    order = np.concatenate([np.flatnonzero(row_M == Tile.FULL),
                            np.flatnonzero(row_M == Tile.PARTIAL)])
    index_NP[n, :len(order)] = order
  counts_N2 = np.stack([n_full_N, n_partial_N], axis=1).astype(np.int32)
  counts_N2.setflags(write=False)
  index_NP.setflags(write=False)
  return TileLists(counts_N2, index_NP)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def padded_mask(mask: AttentionMask, num_tokens: int) -> np.ndarray:
  """[N, N] bool: `mask.dense()` with N - T padding tokens that see only each other."""
  t = mask.num_tokens
  out_NN = np.zeros((num_tokens, num_tokens), bool)
  out_NN[:t, :t] = mask.dense()
  out_NN[t:, t:] = True
  return out_NN


@functools.lru_cache(maxsize=64)
def kernel_tiles(mask: AttentionMask, num_tokens: int, block_q: int, block_k: int,
                 num_queries: int | None = None) -> tuple[TileLists, TileLists]:
  """(key tiles per query tile, query tiles per key tile) of the padded mask's first
  `num_queries` rows (default: all `num_tokens`)."""
  map_NM = tile_map(padded_mask(mask, num_tokens)[:num_queries], block_q, block_k)
  return tile_lists(map_NM), tile_lists(map_NM.T)


def visible(mask: AttentionMask, num_tokens: int, q_pos, k_pos):
  """`padded_mask(mask, num_tokens)` at these positions, by arithmetic: bool of the broadcast
  shape of the int32 query and key positions (q_pos [Q, 1] and k_pos [1, K] give [Q, K];
  q_pos [1, Q] and k_pos [K, 1] the transposed [K, Q])."""
  vis = _visible(mask, q_pos, k_pos)
  if num_tokens == mask.num_tokens:
    return vis
  q_pad, k_pad = q_pos >= mask.num_tokens, k_pos >= mask.num_tokens
  return jnp.where(q_pad | k_pad, q_pad & k_pad, vis)


def _visible(mask: AttentionMask, q_pos, k_pos):
  if mask.kind is MaskKind.FULL:
    return jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), jnp.bool_)
  length, size = mask.seq_len, mask.block_size
  if mask.kind is MaskKind.BLOCK_CAUSAL:
    return lax.div(k_pos, size) <= lax.div(q_pos, size)
  # Training mask over x_t ⊕ x_0: an x_0 key is visible iff its block is earlier than the
  # query's (x_t query) or not later (x_0 query); an x_t key only to x_t queries of its block.
  q_x0, k_x0 = q_pos >= length, k_pos >= length
  q_blk = lax.div(jnp.where(q_x0, q_pos - length, q_pos), size)
  k_blk = lax.div(jnp.where(k_x0, k_pos - length, k_pos), size)
  sees_x0 = k_blk < q_blk + q_x0.astype(jnp.int32)
  sees_xt = ~q_x0 & (k_blk == q_blk)
  return jnp.where(k_x0, sees_x0, sees_xt)
