"""The TPU path: JAX's bundled splash attention with the BD3 mask.

`splash_attention(q_BQHK, k_BTHK, v_BTHK, mask)` builds a splash kernel from the first Q rows
of `mask.dense()` (the queries are the first Q <= T tokens; splash derives its own empty /
partial / full block lists from the mask, skips empty blocks and masks partial ones; backward
included), once per (mask, Q, heads, interpret), and vmaps it over the batch. Splash takes
[H, T, K] per example and does not scale the logits, so q is scaled by 1/sqrt(K) first.
Blocks are `BLOCK` = 128 wide (the lane width splash requires, and the finest granularity:
31% of the 2L x 2L tiles are non-empty at L = 1024, L' = 16, against 38% at 256); T is padded
to a multiple of 128 with padding tokens that see only each other (`tiles.padded_mask`), Q with
further rows of that mask, whose outputs are dropped.
Runs compiled on TPU and interpreted on CPU (tests); other backends get an error.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from bd3jax.kernels import platform
from bd3jax.kernels.block_sparse import check_query_prefix
from bd3jax.kernels.tiles import padded_mask, round_up
from bd3jax.masks import AttentionMask

BLOCK = 128


def splash_attention(q_BQHK, k_BTHK, v_BTHK, mask: AttentionMask, *, interpret: bool | None = None):
  """softmax(q k^T / sqrt(K) + mask) v through splash attention for the first Q <= T of the
  mask's T tokens (q's rows); differentiable."""
  check_query_prefix("splash", q_BQHK, k_BTHK, v_BTHK, mask)
  _, q, h, head_dim = q_BQHK.shape
  t = k_BTHK.shape[1]
  interpret = platform.interpret_by_default() if interpret is None else interpret
  if not interpret and platform.backend() != "tpu":
    raise ValueError(f"model.attention 'splash' runs on TPU only (backend is "
                     f"{platform.backend()!r}); use 'pallas' on GPU, 'dense' on CPU")
  kernel = _kernel(mask, round_up(t, BLOCK), round_up(q, BLOCK), h, interpret)

  def to_BHNK(x_BTHK):  # padded to whole blocks, heads-major
    pad = round_up(x_BTHK.shape[1], BLOCK) - x_BTHK.shape[1]
    return jnp.swapaxes(jnp.pad(x_BTHK, ((0, 0), (0, pad), (0, 0), (0, 0))), 1, 2)
  q_BHNK = to_BHNK(q_BQHK * jnp.asarray(head_dim ** -0.5, q_BQHK.dtype))
  o_BHNK = jax.vmap(kernel)(q_BHNK, to_BHNK(k_BTHK), to_BHNK(v_BTHK))
  return jnp.swapaxes(o_BHNK, 1, 2)[:, :q]


@functools.lru_cache(maxsize=16)
def _kernel(mask: AttentionMask, num_tokens: int, num_queries: int, heads: int, interpret: bool):
  head_mask = splash_mask.NumpyMask(padded_mask(mask, num_tokens)[:num_queries])
  sizes = splash.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                            block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
                            block_q_dq=BLOCK, block_kv_dq=BLOCK)
  with jax.ensure_compile_time_eval():  # concrete mask arrays, safe to cache across traces
    return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads),
                                  block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
