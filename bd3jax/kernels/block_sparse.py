"""Block-sparse flash attention for the BD3 masks: a Pallas kernel, forward and backward.

`block_sparse_attention(q_BQHK, k_BTHK, v_BTHK, mask)` equals `dense_attention` under
`mask.dense()`, without ever touching an empty tile (see `tiles.py` for the tile lists). The
queries are the first Q <= T of the mask's T tokens: with Q < T (the x_t half in the training
pass's last layer) the kernels visit only those queries' tiles.
- Forward: one program per (batch, head, query tile); it walks the key tiles of its row,
  full ones without mask arithmetic, then partial ones through `tiles.visible`, with an
  online softmax in float32; it writes the output and the log-sum-exp `lse2_BHT` (float32, in
  base 2: the kernels scale logits by log2 e and exponentiate with exp2).
- Backward (`jax.custom_vjp`), FlashAttention-2 style with no atomics: one kernel per (batch,
  head, query tile) computes its rows' delta = rowsum(dO * O) and accumulates dq over the same
  key tiles, and writes delta for the other kernel: one per (batch, head, key tile), which
  accumulates dk and dv over the query tiles that see it, computing each tile transposed (keys
  by queries), so that p^T and ds^T enter its matmuls as computed.
  Probabilities are recomputed from `lse2`; they are cast to the input dtype before the
  matmuls with v / dO, as `dense_attention` does; all accumulators are float32.

Each kernel has its own `Launch` (tile of queries x keys, Triton warps and pipelining stages):
`block_q`, `block_k`, `num_warps` and `num_stages` set the forward's, `dq=` and `dkv=` the
backward kernels' (by default the forward's); for dk/dv, `block_k` is the program's key tile and
`block_q` the query tile of its loop. Tiles: `BLOCK_Q` = `BLOCK_K` = 64 by default (clipped to
T rounded up to a power of two). At L = 1024, L' = 16 the non-empty 64 x 64 tiles cover 28.1% of
the 2L x 2L matrix (the mask itself 25.4%), against 31.2% for 128-wide tiles. Tile sizes must be
powers of two (Triton); T is padded to a multiple of every tile size in use
(`tiles.padded_mask`), Q likewise with further rows of that mask, whose outputs are dropped.
Warps: `default_num_warps`. At the reference shape on an H200 (bf16, head dim 64) these
defaults, with `NUM_STAGES`, were the fastest of eight settings forward and backward, each
setting shared by the three kernels (README; benchmarks/attention.py --pallas).
`packed_attention(qkv_BT3HK, cos_TK, sin_TK, mask, queries)` is the training step's entry: the
model's packed projection [B, T, 3, H, K] with the rotary applied to q and k (by XLA). Its
kernels read v in place, and the backward kernels apply the rotary's backward to dq and dk in
their epilogues and write one d qkv: the dq kernel slot 0, the dk/dv kernel slots 1 and 2 of the
dq kernel's output (aliased); so nothing copies v out of the projection nor assembles d qkv.
On GPU the kernels lower through Triton (float32 matmuls there may run as TF32); on CPU they run
interpreted.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bd3jax.kernels import platform
from bd3jax.kernels.tiles import kernel_tiles, round_up, visible
from bd3jax.masks import AttentionMask
from bd3jax.rotary import rotary_backward, rotary_qkv

BLOCK_Q = 64
BLOCK_K = 64
NUM_STAGES = 2
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2(MASK_VALUE - m) == 0
LOG2_E = 1.4426950408889634
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class Launch:
  """How one kernel runs: a tile of `block_q` queries x `block_k` keys, Triton's warps per
  program (None: `default_num_warps`) and software-pipelining stages of its tile loop."""
  block_q: int
  block_k: int
  num_warps: int | None = None
  num_stages: int = NUM_STAGES


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static arguments of the kernels (hashable); `num_tokens` is T and `num_queries` Q after
  padding."""
  mask: AttentionMask
  num_tokens: int
  num_queries: int
  forward: Launch
  dq: Launch
  dkv: Launch
  interpret: bool


def block_sparse_attention(q_BQHK, k_BTHK, v_BTHK, mask: AttentionMask, *,
                           block_q: int | None = None, block_k: int | None = None,
                           num_warps: int | None = None, num_stages: int = NUM_STAGES,
                           dq: Launch | None = None, dkv: Launch | None = None,
                           interpret: bool | None = None):
  """softmax(q k^T / sqrt(K) + mask) v over T = mask.num_tokens tokens, block-sparse, for the
  first Q <= T of them (q's rows).

  The forward kernel's tiles `block_q`/`block_k` default to `BLOCK_Q`/`BLOCK_K`, `num_warps`
  (GPU) to `default_num_warps`; `num_stages` is Triton's software-pipelining depth of the tile
  loop. `dq`/`dkv`: the backward kernels' `Launch` (default: the forward's). `interpret`
  defaults to True on CPU. Differentiable in q, k and v.
  """
  cfg = kernel_config(q_BQHK, k_BTHK, v_BTHK, mask, block_q, block_k, num_warps, interpret,
                      num_stages, dq=dq, dkv=dkv)
  pad = lambda x_BTHK, n: jnp.pad(x_BTHK, ((0, 0), (0, n - x_BTHK.shape[1]), (0, 0), (0, 0)))
  o_BQHK = _attention(pad(q_BQHK, cfg.num_queries), pad(k_BTHK, cfg.num_tokens),
                      pad(v_BTHK, cfg.num_tokens), cfg)
  return o_BQHK[:, :q_BQHK.shape[1]]


def default_num_warps(head_dim: int, dtype) -> int:
  """Warps per Triton program: 4 for bfloat16 with head dim <= 64, else 8.

  From sm_90 builds of the three kernels with 64 x 64 tiles (benchmarks/kernel_resources.py):
  at 4 warps none spills at head dim 64, but dk/dv (two float32 [block_k, K] accumulators)
  spills at head dim 128; at 8 warps only float32 with head dim 128 still does. (float32 at head
  dim 64 keeps 8 warps from builds in which its dk/dv spilled at 4.)
  """
  return 4 if head_dim <= 64 and jnp.dtype(dtype) == jnp.bfloat16 else 8


def buildable_head_dim(head_dim: int) -> bool:
  """Whether Triton builds the kernels for this head dim: a power of two in [16, 256]."""
  return not head_dim & (head_dim - 1) and 16 <= head_dim <= 256


def check_gpu_build(head_dim: int, *, elsewhere: str) -> None:
  """Raises unless a Triton build can run: a GPU backend, a power-of-two head dim in [16, 256].
  `elsewhere` tells what to use on other backends."""
  if platform.backend() != "gpu":
    raise ValueError(f"model.attention 'pallas' compiles for GPU only (backend is "
                     f"{platform.backend()!r}); {elsewhere}")
  if not buildable_head_dim(head_dim):
    raise ValueError(f"model.attention 'pallas' on GPU needs a power-of-two head dim in "
                     f"[16, 256]; got {head_dim} (d_model / n_heads)")


def check_tiles_and_warps(kernel: str, num_warps: int, **tiles: int) -> None:
  """Raises unless every tile size is a power of two and `num_warps` one Triton accepts."""
  for name, block in tiles.items():
    if block < 1 or block & (block - 1):
      raise ValueError(f"{kernel} tile {name}={block} must be a power of two")
  if num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"{kernel} num_warps={num_warps} must be 1, 2, 4, 8 or 16")


def kernel_config(q_BQHK, k_BTHK, v_BTHK, mask, block_q=None, block_k=None, num_warps=None,
                  interpret=None, num_stages=NUM_STAGES, *, dq: Launch | None = None,
                  dkv: Launch | None = None) -> KernelConfig:
  """Checks the inputs and settles each kernel's launch, the padded lengths and interpret mode.
  Tiles larger than T rounded up to a power of two are clipped to it."""
  check_query_prefix("pallas", q_BQHK, k_BTHK, v_BTHK, mask)
  if not q_BQHK.dtype == k_BTHK.dtype == v_BTHK.dtype or q_BQHK.dtype not in DTYPES:
    raise ValueError(f"pallas attention needs q, k, v all float32 or all bfloat16; got "
                     f"{q_BQHK.dtype}, {k_BTHK.dtype}, {v_BTHK.dtype}")
  q, t, head_dim = q_BQHK.shape[1], k_BTHK.shape[1], q_BQHK.shape[3]
  interpret = platform.interpret_by_default() if interpret is None else interpret
  if not interpret:
    check_gpu_build(head_dim, elsewhere="use 'splash' on TPU, 'dense' on CPU")
  forward = Launch(BLOCK_Q if block_q is None else block_q, BLOCK_K if block_k is None else block_k,
                   num_warps, num_stages)
  t_pow2 = 1 << (t - 1).bit_length()
  launches = {}
  for name, launch in (("forward", forward), ("dq", dq or forward), ("dkv", dkv or forward)):
    warps = launch.num_warps
    if warps is None:
      warps = default_num_warps(head_dim, q_BQHK.dtype)
    check_tiles_and_warps(f"pallas attention ({name})", warps, block_q=launch.block_q,
                          block_k=launch.block_k)
    if launch.num_stages < 1:
      raise ValueError(f"pallas attention ({name}) num_stages={launch.num_stages} must be at "
                       "least 1")
    launches[name] = Launch(min(launch.block_q, t_pow2), min(launch.block_k, t_pow2), warps,
                            launch.num_stages)
  step = max(size for launch in launches.values() for size in (launch.block_q, launch.block_k))
  return KernelConfig(mask, round_up(t, step), round_up(q, step), **launches,
                      interpret=interpret)


def check_query_prefix(kernel: str, q_BQHK, k_BTHK, v_BTHK, mask: AttentionMask) -> None:
  """Raises unless k and v are [B, T, H, K] with T = mask.num_tokens and q is [B, Q, H, K] with
  1 <= Q <= T (the first Q tokens' queries)."""
  if (q_BQHK.ndim != 4 or k_BTHK.ndim != 4 or k_BTHK.shape != v_BTHK.shape or
      q_BQHK.shape[::2] != k_BTHK.shape[::2] or q_BQHK.shape[3] != k_BTHK.shape[3]):
    raise ValueError(f"{kernel} attention needs q [B, Q, H, K] and k, v [B, T, H, K]; got "
                     f"{q_BQHK.shape}, {k_BTHK.shape}, {v_BTHK.shape}")
  if k_BTHK.shape[1] != mask.num_tokens:
    raise ValueError(f"the {mask.kind.value} mask covers {mask.num_tokens} tokens, k and v have "
                     f"{k_BTHK.shape[1]}")
  if not 1 <= q_BQHK.shape[1] <= mask.num_tokens:
    raise ValueError(f"q has {q_BQHK.shape[1]} queries; the first Q of the mask's "
                     f"{mask.num_tokens} tokens are supported, 1 <= Q <= {mask.num_tokens}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BQHK, k_BTHK, v_BTHK, cfg: KernelConfig):
  return forward(q_BQHK, k_BTHK, v_BTHK, cfg)[0]


def _attention_fwd(q_BQHK, k_BTHK, v_BTHK, cfg):
  o_BQHK, lse2_BHQ = forward(q_BQHK, k_BTHK, v_BTHK, cfg)
  return o_BQHK, (q_BQHK, k_BTHK, v_BTHK, o_BQHK, lse2_BHQ)


def _attention_bwd(cfg, residuals, do_BQHK):
  return backward(*residuals, do_BQHK, cfg)


_attention.defvjp(_attention_fwd, _attention_bwd)


def packed_attention(qkv_BT3HK, cos_TK, sin_TK, mask: AttentionMask, queries: int | None = None,
                     *, interpret: bool | None = None):
  """`block_sparse_attention` of `rotary.rotary_qkv(qkv_BT3HK, cos_TK, sin_TK, queries)`: the
  rotary q (first `queries` rows, default all T), the rotary k and v of one packed projection
  [B, T, 3, H, K], with the default launches. Differentiable in qkv only (cos and sin [T, K]
  are constants).

  The forward kernel reads v in place, and the gradient, d qkv, is written by the backward
  kernels into one [B, T, 3, H, K] array, the rotary's backward applied in their epilogues:
  no copy of v, and no pass assembling dq, dk and dv. Where the tiles do not divide T or Q
  (they would be padded) it runs `block_sparse_attention` on the unpacked arrays instead.
  """
  b, t, _, h, d = qkv_BT3HK.shape
  q = t if queries is None else queries
  shape = lambda rows: jax.ShapeDtypeStruct((b, rows, h, d), qkv_BT3HK.dtype)
  cfg = kernel_config(shape(q), shape(t), shape(t), mask, interpret=interpret)
  if (cfg.num_tokens, cfg.num_queries) != (t, q):
    return block_sparse_attention(*rotary_qkv(qkv_BT3HK, cos_TK, sin_TK, q), mask,
                                  interpret=interpret)
  return _packed(qkv_BT3HK, cos_TK.astype(jnp.float32), sin_TK.astype(jnp.float32), cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _packed(qkv_BT3HK, cos_TK, sin_TK, cfg: KernelConfig):
  return _packed_fwd(qkv_BT3HK, cos_TK, sin_TK, cfg)[0]


def _packed_fwd(qkv_BT3HK, cos_TK, sin_TK, cfg):
  q_BQHK, k_BTHK, _ = rotary_qkv(qkv_BT3HK, cos_TK, sin_TK, cfg.num_queries)
  o_BQHK, lse2_BHQ = forward(q_BQHK, k_BTHK, qkv_BT3HK, cfg)
  # The rotary q and k are kept, and the whole projection (for v): recomputing q and k in the
  # backward pass would keep a third of this memory but read and write them once more.
  return o_BQHK, (q_BQHK, k_BTHK, qkv_BT3HK, o_BQHK, lse2_BHQ, cos_TK, sin_TK)


def _packed_bwd(cfg, residuals, do_BQHK):
  q_BQHK, k_BTHK, qkv_BT3HK, o_BQHK, lse2_BHQ, cos_TK, sin_TK = residuals
  dqkv_BT3HK = packed_backward(q_BQHK, k_BTHK, qkv_BT3HK, o_BQHK, lse2_BHQ, do_BQHK, cos_TK,
                               sin_TK, cfg)
  return dqkv_BT3HK, None, None


_packed.defvjp(_packed_fwd, _packed_bwd)


def _visit(counts_ref, index_ref, body, carry):
  """carry = body(tile, masked, carry) over the listed full tiles, then the partial ones."""
  n_full, n_partial = counts_ref[0], counts_ref[1]
  carry = lax.fori_loop(0, n_full, lambda n, c: body(index_ref[n], False, c), carry)
  return lax.fori_loop(n_full, n_full + n_partial, lambda n, c: body(index_ref[n], True, c), carry)


def load_tile(ref, index, size):
  """Rows index * size ... of `ref`: tile `index` of `size` rows."""
  return ref[pl.ds(pl.multiple_of(index * size, size), size)]


def tile_positions(index, size):
  """The row numbers of tile `index` of `size` rows (int32)."""
  return index * size + jnp.arange(size, dtype=jnp.int32)


def scaled_logits(q_QD, k_KD):
  """q k^T / sqrt(K) of one tile in float32, times log2 e: softmaxes over it use exp2 (one GPU
  instruction, where Pallas lowers exp to a libdevice routine of several)."""
  scale = q_QD.shape[-1] ** -0.5 * LOG2_E
  return jnp.dot(q_QD, k_KD.T, preferred_element_type=jnp.float32) * scale


def _logits(a_AD, b_BD, q_pos, k_pos, masked: bool, cfg: KernelConfig):
  """Scaled float32 logits a b^T of one tile (`scaled_logits`), a and b its queries and keys
  (a [Q, K] tile) or its keys and queries (the transposed [K, Q] tile); the mask applied only
  when `masked`, at the query and key positions shaped to broadcast to the tile's shape."""
  s_AB = scaled_logits(a_AD, b_BD)
  if masked:
    s_AB = jnp.where(visible(cfg.mask, cfg.num_tokens, q_pos, k_pos), s_AB, MASK_VALUE)
  return s_AB


def online_softmax_init(shape_QD):
  """(acc, running max, running sum) before the first key tile, all float32."""
  return (jnp.zeros(shape_QD, jnp.float32), jnp.full(shape_QD[:1], -jnp.inf, jnp.float32),
          jnp.zeros(shape_QD[:1], jnp.float32))


def online_softmax_update(carry, s_QK, v_KD):
  """Folds one key tile's `scaled_logits` and values into (acc, max, sum), in base 2; the output
  is acc / sum after the last tile. Probabilities meet v in v's dtype, as in `dense_attention`."""
  acc_QD, m_Q, l_Q = carry
  m_new_Q = jnp.maximum(m_Q, s_QK.max(axis=-1))
  rescale_Q = jnp.exp2(m_Q - m_new_Q)
  p_QK = jnp.exp2(s_QK - m_new_Q[:, None])
  l_Q = rescale_Q * l_Q + p_QK.sum(axis=-1)
  acc_QD = rescale_Q[:, None] * acc_QD + jnp.dot(
      p_QK.astype(v_KD.dtype), v_KD, preferred_element_type=jnp.float32)
  return acc_QD, m_new_Q, l_Q


def _forward_kernel(counts_ref, index_ref, q_ref, k_ref, v_ref, o_ref, lse2_ref, *, cfg):
  bq, bk = cfg.forward.block_q, cfg.forward.block_k
  q_QD = q_ref[...]
  q_pos_Q1 = tile_positions(pl.program_id(2), bq)[:, None]

  def body(j, masked, carry):
    k_KD, v_KD = load_tile(k_ref, j, bk), load_tile(v_ref, j, bk)
    s_QK = _logits(q_QD, k_KD, q_pos_Q1, tile_positions(j, bk)[None, :], masked, cfg)
    return online_softmax_update(carry, s_QK, v_KD)

  acc_QD, m_Q, l_Q = _visit(counts_ref, index_ref, body, online_softmax_init(q_QD.shape))
  o_ref[...] = (acc_QD / l_Q[:, None]).astype(o_ref.dtype)
  lse2_ref[...] = m_Q + jnp.log2(l_Q)


def _dq_kernel(counts_ref, index_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, o_ref, *refs, cfg,
               packed=False, aliased=False):
  # packed: refs start with cos and sin (this tile's rows), then, if aliased, the dqkv buffer
  # passed in; dq_ref is then slot 0 of dqkv.
  cos_ref = sin_ref = None
  if packed:
    cos_ref, sin_ref, *refs = refs
  dq_ref, delta_ref = refs[1:] if aliased else refs
  bq, bk = cfg.dq.block_q, cfg.dq.block_k
  q_QD, do_QD, lse2_Q = q_ref[...], do_ref[...], lse2_ref[...]
  delta_Q = jnp.sum(o_ref[...].astype(jnp.float32) * do_QD.astype(jnp.float32), axis=-1)
  delta_ref[...] = delta_Q
  q_pos_Q1 = tile_positions(pl.program_id(2), bq)[:, None]

  def body(j, masked, dq_QD):
    k_KD, v_KD = load_tile(k_ref, j, bk), load_tile(v_ref, j, bk)
    s_QK = _logits(q_QD, k_KD, q_pos_Q1, tile_positions(j, bk)[None, :], masked, cfg)
    p_QK = jnp.exp2(s_QK - lse2_Q[:, None])
    dp_QK = jnp.dot(do_QD, v_KD.T, preferred_element_type=jnp.float32)
    ds_QK = p_QK * (dp_QK - delta_Q[:, None])
    return dq_QD + jnp.dot(ds_QK.astype(k_KD.dtype), k_KD, preferred_element_type=jnp.float32)

  dq_QD = _visit(counts_ref, index_ref, body, jnp.zeros(q_QD.shape, jnp.float32))
  dq_QD = dq_QD * q_QD.shape[-1] ** -0.5
  if packed:
    dq_QD = rotary_backward(dq_QD, cos_ref[...], sin_ref[...])
  dq_ref[...] = dq_QD.astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, index_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref,
                *refs, cfg, packed=False):
  # packed: refs = cos, sin (this tile's rows), the aliased dqkv buffer, dqkv (all 3 slots).
  bq, bk = cfg.dkv.block_q, cfg.dkv.block_k
  k_KD, v_KD = k_ref[...], v_ref[...]
  k_pos_K1 = tile_positions(pl.program_id(2), bk)[:, None]

  # The tile is computed transposed, keys by queries: p^T and ds^T are then the left operands of
  # their matmuls as they are, where p and ds would each be transposed (through shared memory)
  # every iteration, and k and v are the left operands of k q^T and v dO^T.
  def body(i, masked, carry):
    dk_KD, dv_KD = carry
    q_QD, do_QD = load_tile(q_ref, i, bq), load_tile(do_ref, i, bq)
    lse2_Q, delta_Q = load_tile(lse2_ref, i, bq), load_tile(delta_ref, i, bq)
    s_KQ = _logits(k_KD, q_QD, tile_positions(i, bq)[None, :], k_pos_K1, masked, cfg)
    p_KQ = jnp.exp2(s_KQ - lse2_Q[None, :])
    dv_KD = dv_KD + jnp.dot(p_KQ.astype(do_QD.dtype), do_QD, preferred_element_type=jnp.float32)
    dp_KQ = jnp.dot(v_KD, do_QD.T, preferred_element_type=jnp.float32)
    ds_KQ = p_KQ * (dp_KQ - delta_Q[None, :])
    dk_KD = dk_KD + jnp.dot(ds_KQ.astype(q_QD.dtype), q_QD, preferred_element_type=jnp.float32)
    return dk_KD, dv_KD

  zeros_KD = jnp.zeros(k_KD.shape, jnp.float32)
  dk_KD, dv_KD = _visit(counts_ref, index_ref, body, (zeros_KD, zeros_KD))
  dk_KD = dk_KD * k_KD.shape[-1] ** -0.5
  if packed:
    cos_ref, sin_ref, _, dqkv_ref = refs  # the dqkv buffer passed in, and it again as output
    dqkv_ref[:, 1, :] = rotary_backward(dk_KD, cos_ref[...], sin_ref[...]).astype(dqkv_ref.dtype)
    dqkv_ref[:, 2, :] = dv_KD.astype(dqkv_ref.dtype)
  else:
    dk_ref, dv_ref = refs
    dk_ref[...] = dk_KD.astype(dk_ref.dtype)
    dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _tile(block, d):
  """BlockSpec over grid (batch, head, tile) of a [block, K] tile of a [B, T, H, K] array."""
  return pl.BlockSpec((None, block, None, d), lambda b, h, n: (b, n, h, 0))


def _whole(t, d):
  """BlockSpec of the whole [T, K] sequence of a [B, T, H, K] array."""
  return pl.BlockSpec((None, t, None, d), lambda b, h, n: (b, 0, h, 0))


def _row_tile(block):
  """BlockSpec of a [block] slice of a [B, H, T] array."""
  return pl.BlockSpec((None, None, block), lambda b, h, n: (b, h, n))


def _row_whole(t):
  """BlockSpec of a whole [T] row of a [B, H, T] array."""
  return pl.BlockSpec((None, None, t), lambda b, h, n: (b, h, 0))


def _list_specs(lists):
  return [pl.BlockSpec((None, 2), lambda b, h, n: (n, 0)),
          pl.BlockSpec((None, lists.index_NP.shape[1]), lambda b, h, n: (n, 0))]


def _list_args(lists):
  return jnp.asarray(lists.counts_N2), jnp.asarray(lists.index_NP)


def call_kernel(kernel, grid, in_specs, out_specs, out_shape, name, *, num_warps: int,
                interpret: bool, num_stages: int = NUM_STAGES, input_output_aliases=None):
  """`pl.pallas_call` with this package's Triton settings (warps, pipelining stages)."""
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                       num_stages=num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, compiler_params=params,
                        name=name, input_output_aliases=input_output_aliases or {})


def _call(kernel, cfg, launch: Launch, grid, in_specs, out_specs, out_shape, name, *,
          input_output_aliases=None, **options):
  """`call_kernel` of kernel(..., cfg=cfg, **options) with `launch`'s warps and stages."""
  return call_kernel(functools.partial(kernel, cfg=cfg, **options), grid, in_specs, out_specs,
                     out_shape, name, num_warps=launch.num_warps, num_stages=launch.num_stages,
                     interpret=cfg.interpret, input_output_aliases=input_output_aliases)


def _v_spec(v, block, d, index):
  """BlockSpec of `block` rows of v: a [B, T, H, K] array, or slot 2 of a packed [B, T, 3, H, K]
  projection (read in place); `index(n)` is the row block of program n."""
  if v.ndim == 5:
    return pl.BlockSpec((None, block, None, None, d), lambda b, h, n: (b, index(n), 2, h, 0))
  return pl.BlockSpec((None, block, None, d), lambda b, h, n: (b, index(n), h, 0))


def forward(q_BQHK, k_BTHK, v_BTHK, cfg: KernelConfig):
  """(o_BQHK, lse2_BHQ): the output and float32 log-sum-exp in base 2 (the natural one times
  log2 e); Q and T already cfg.num_queries and cfg.num_tokens. v may be the packed projection
  (`_v_spec`)."""
  b, q, h, d = q_BQHK.shape
  f = cfg.forward
  rows, _ = kernel_tiles(cfg.mask, cfg.num_tokens, f.block_q, f.block_k, q)
  q_tile, kv_whole = _tile(f.block_q, d), _whole(cfg.num_tokens, d)
  v_whole = _v_spec(v_BTHK, cfg.num_tokens, d, lambda n: 0)
  return _call(
      _forward_kernel, cfg, f, (b, h, q // f.block_q),
      [*_list_specs(rows), q_tile, kv_whole, v_whole], [q_tile, _row_tile(f.block_q)],
      [jax.ShapeDtypeStruct(q_BQHK.shape, q_BQHK.dtype),
       jax.ShapeDtypeStruct((b, h, q), jnp.float32)],
      "bd3_attention_fwd")(*_list_args(rows), q_BQHK, k_BTHK, v_BTHK)


def backward(q_BQHK, k_BTHK, v_BTHK, o_BQHK, lse2_BHQ, do_BQHK, cfg: KernelConfig):
  """(dq, dk, dv) from the forward's residuals and the output cotangent (Q and T padded)."""
  b, q, h, d = q_BQHK.shape
  t = cfg.num_tokens
  do_BQHK = do_BQHK.astype(q_BQHK.dtype)

  rows, _ = kernel_tiles(cfg.mask, t, cfg.dq.block_q, cfg.dq.block_k, q)
  q_tile, kv_whole, row_tile = _tile(cfg.dq.block_q, d), _whole(t, d), _row_tile(cfg.dq.block_q)
  dq_BQHK, delta_BHQ = _call(
      _dq_kernel, cfg, cfg.dq, (b, h, q // cfg.dq.block_q),
      [*_list_specs(rows), q_tile, kv_whole, kv_whole, q_tile, row_tile, q_tile],
      [q_tile, row_tile],
      [jax.ShapeDtypeStruct(q_BQHK.shape, q_BQHK.dtype),
       jax.ShapeDtypeStruct((b, h, q), jnp.float32)],
      "bd3_attention_dq")(*_list_args(rows), q_BQHK, k_BTHK, v_BTHK, do_BQHK, lse2_BHQ, o_BQHK)
  args = (q_BQHK, k_BTHK, v_BTHK, do_BQHK, lse2_BHQ, delta_BHQ)

  _, cols = kernel_tiles(cfg.mask, t, cfg.dkv.block_q, cfg.dkv.block_k, q)
  k_tile, q_whole, row_whole = _tile(cfg.dkv.block_k, d), _whole(q, d), _row_whole(q)
  dk_BTHK, dv_BTHK = _call(
      _dkv_kernel, cfg, cfg.dkv, (b, h, t // cfg.dkv.block_k),
      [*_list_specs(cols), q_whole, k_tile, k_tile, q_whole, row_whole, row_whole],
      [k_tile, k_tile],
      [jax.ShapeDtypeStruct(k_BTHK.shape, k_BTHK.dtype),
       jax.ShapeDtypeStruct(v_BTHK.shape, v_BTHK.dtype)],
      "bd3_attention_dkv")(*_list_args(cols), *args)
  return dq_BQHK, dk_BTHK, dv_BTHK


def _rope_tile(block, d):
  """BlockSpec of the [block, K] rows of cos or sin [T, K] of program n's tile."""
  return pl.BlockSpec((block, d), lambda b, h, n: (n, 0))


def packed_backward(q_BQHK, k_BTHK, qkv_BT3HK, o_BQHK, lse2_BHQ, do_BQHK, cos_TK, sin_TK,
                    cfg: KernelConfig):
  """d qkv [B, T, 3, H, K] of `packed_attention`: the dq kernel writes slot 0 (its rows; the
  others zero when Q < T), the dk/dv kernel slots 1 and 2 of the same buffer, each through
  the rotary's backward in its epilogue where the slot needs it."""
  batch, q, heads, d = q_BQHK.shape
  t = cfg.num_tokens
  do_BQHK = do_BQHK.astype(q_BQHK.dtype)
  dqkv_shape = jax.ShapeDtypeStruct(qkv_BT3HK.shape, qkv_BT3HK.dtype)
  aliased = q < t   # then rows >= Q of slot 0 must read zero: the kernel starts from zeros
  buffer = [jnp.zeros_like(qkv_BT3HK)] if aliased else []

  bq = cfg.dq.block_q
  rows, _ = kernel_tiles(cfg.mask, t, bq, cfg.dq.block_k, q)
  q_tile, row_tile = _tile(bq, d), _row_tile(bq)
  slot0 = pl.BlockSpec((None, bq, None, None, d), lambda b, h, n: (b, n, 0, h, 0))
  dq_call = _call(
      _dq_kernel, cfg, cfg.dq, (batch, heads, q // bq),
      [*_list_specs(rows), q_tile, _whole(t, d), _v_spec(qkv_BT3HK, t, d, lambda n: 0), q_tile,
       row_tile, q_tile, _rope_tile(bq, d), _rope_tile(bq, d), *[slot0] * aliased],
      [slot0, row_tile], [dqkv_shape, jax.ShapeDtypeStruct((batch, heads, q), jnp.float32)],
      "bd3_attention_dq", input_output_aliases={10: 0} if aliased else None, packed=True,
      aliased=aliased)
  dqkv_BT3HK, delta_BHQ = dq_call(*_list_args(rows), q_BQHK, k_BTHK, qkv_BT3HK, do_BQHK, lse2_BHQ,
                                  o_BQHK, cos_TK[:q], sin_TK[:q], *buffer)

  bk = cfg.dkv.block_k
  _, cols = kernel_tiles(cfg.mask, t, cfg.dkv.block_q, bk, q)
  k_tile, q_whole, row_whole = _tile(bk, d), _whole(q, d), _row_whole(q)
  # All three slots of the program's rows; the kernel stores into slots 1 and 2 only (a [bk, 3,
  # K] block is never loaded whole: Triton tensors have power-of-two sizes).
  slots = pl.BlockSpec((None, bk, 3, None, d), lambda b, h, n: (b, n, 0, h, 0))
  return _call(
      _dkv_kernel, cfg, cfg.dkv, (batch, heads, t // bk),
      [*_list_specs(cols), q_whole, k_tile, _v_spec(qkv_BT3HK, bk, d, lambda n: n), q_whole,
       row_whole, row_whole, _rope_tile(bk, d), _rope_tile(bk, d), slots],
      slots, dqkv_shape, "bd3_attention_dkv", input_output_aliases={10: 0}, packed=True)(
          *_list_args(cols), q_BQHK, k_BTHK, qkv_BT3HK, do_BQHK, lse2_BHQ, delta_BHQ, cos_TK,
          sin_TK, dqkv_BT3HK)
