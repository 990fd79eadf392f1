"""Attention of a few new tokens over a KV cache: a Pallas kernel that reads only the filled slots.

`cache_attention(q_BTHK, k_BHSK, v_BHSK, end)` equals `model.attention.dense_cache_attention`:
T queries attend to the first min(end, S) slots of a heads-major [B, H, S, K] cache. One
program per (batch, head, query tile) walks the key tiles up to the last filled slot, with an
online softmax in float32. The number of tiles is data, so one compiled kernel serves every
step of a sampling loop. The dense version reads all S slots on every step and writes
[B, H, T, S] float32 logits; this kernel reads the filled slots once and writes only the output.

Tiles: queries in tiles of 16 to `BLOCK_Q` rows (T padded; Triton's matmuls need 16), keys in
tiles of `BLOCK_K` slots, or the largest power of two dividing S; the last tile read may hold
up to `block_k` - 1 unfilled slots, masked. Warps: `default_num_warps`. On GPU the kernel
lowers through Triton (float32 matmuls there may run as TF32); on CPU it runs interpreted.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bd3jax.kernels import platform
from bd3jax.kernels.block_sparse import (DTYPES, MASK_VALUE, call_kernel, check_gpu_build,
                                         check_tiles_and_warps, default_num_warps, load_tile,
                                         online_softmax_init, online_softmax_update,
                                         scaled_logits, tile_positions)
from bd3jax.kernels.tiles import round_up

BLOCK_Q = 64
BLOCK_K = 64
MIN_TILE = 16  # Triton's smallest matmul operand dimension


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static arguments of the kernel (hashable); `num_queries` is T after padding."""
  num_queries: int
  block_q: int
  block_k: int
  num_warps: int
  interpret: bool


def cache_attention(q_BTHK, k_BHSK, v_BHSK, end, *, block_k: int | None = None,
                    num_warps: int | None = None, interpret: bool | None = None):
  """softmax(q k^T / sqrt(K)) v over the cache slots < min(end, S); [B, T, H, K].

  `end` (traced, >= 1) is one past the last position written; `block_k` defaults to `BLOCK_K`
  (clipped to the largest power of two dividing S), `num_warps` (GPU) to `default_num_warps`,
  `interpret` to True on CPU.
  """
  cfg = decode_config(q_BTHK, k_BHSK, v_BHSK, block_k, num_warps, interpret)
  b, t, h, d = q_BTHK.shape
  q_BTHK = jnp.pad(q_BTHK, ((0, 0), (0, cfg.num_queries - t), (0, 0), (0, 0)))
  filled_1 = jnp.minimum(jnp.asarray(end, jnp.int32), k_BHSK.shape[2]).reshape(1)
  q_spec = pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0))
  cache_spec = pl.BlockSpec((None, None, k_BHSK.shape[2], d), lambda b, h, i: (b, h, 0, 0))
  o_BTHK = call_kernel(
      functools.partial(_kernel, cfg=cfg), (b, h, cfg.num_queries // cfg.block_q),
      [pl.BlockSpec((1,), lambda b, h, i: (0,)), q_spec, cache_spec, cache_spec], q_spec,
      jax.ShapeDtypeStruct(q_BTHK.shape, q_BTHK.dtype), "bd3_cache_attention",
      num_warps=cfg.num_warps, interpret=cfg.interpret)(filled_1, q_BTHK, k_BHSK, v_BHSK)
  return o_BTHK[:, :t]


def decode_config(q_BTHK, k_BHSK, v_BHSK, block_k=None, num_warps=None,
                  interpret=None) -> DecodeConfig:
  """Checks the inputs and settles tiles, warps, padded query count and interpret mode."""
  b, t, h, d = q_BTHK.shape
  if k_BHSK.ndim != 4 or k_BHSK.shape != v_BHSK.shape or k_BHSK.shape[:2] != (b, h) or \
     k_BHSK.shape[3] != d:
    raise ValueError(f"pallas cache attention needs q [B, T, H, K] and caches [B, H, S, K]; "
                     f"got {q_BTHK.shape}, {k_BHSK.shape}, {v_BHSK.shape}")
  if not q_BTHK.dtype == k_BHSK.dtype == v_BHSK.dtype or q_BTHK.dtype not in DTYPES:
    raise ValueError(f"pallas cache attention needs q and the caches all float32 or all "
                     f"bfloat16; got {q_BTHK.dtype}, {k_BHSK.dtype}, {v_BHSK.dtype}")
  s = k_BHSK.shape[2]
  interpret = platform.interpret_by_default() if interpret is None else interpret
  block_k = min(BLOCK_K if block_k is None else block_k, s & -s)  # s & -s: 2^(trailing zeros)
  num_warps = default_num_warps(d, q_BTHK.dtype) if num_warps is None else num_warps
  check_tiles_and_warps("pallas cache attention", num_warps, block_k=block_k)
  if not interpret:
    check_gpu_build(d, elsewhere="use 'dense' elsewhere")
    if block_k < MIN_TILE:
      raise ValueError(f"model.attention 'pallas' on GPU decodes with a KV cache of a multiple "
                       f"of {MIN_TILE} slots; got {s} (the sample length or context): use "
                       f"model.attention='dense' to sample it")
  block_q = min(BLOCK_Q, max(MIN_TILE, 1 << (t - 1).bit_length()))
  return DecodeConfig(round_up(t, block_q), block_q, block_k, num_warps, interpret)


def _kernel(filled_ref, q_ref, k_ref, v_ref, o_ref, *, cfg: DecodeConfig):
  bk = cfg.block_k
  q_QD = q_ref[...]
  filled = filled_ref[0]

  def body(j, carry):
    k_KD, v_KD = load_tile(k_ref, j, bk), load_tile(v_ref, j, bk)
    filled_K = tile_positions(j, bk) < filled
    s_QK = jnp.where(filled_K[None, :], scaled_logits(q_QD, k_KD), MASK_VALUE)
    return online_softmax_update(carry, s_QK, v_KD)

  n_tiles = (filled + bk - 1) // bk
  acc_QD, _, l_Q = lax.fori_loop(0, n_tiles, body, online_softmax_init(q_QD.shape))
  o_ref[...] = (acc_QD / l_Q[:, None]).astype(o_ref.dtype)
