"""The Pallas attention kernels, interpreted on CPU, against the dense masked reference."""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax_helpers
from jax_helpers import TRITON_CALL, lowered_for
import tiny_config
from conftest import MASK_ID, assert_same_model_loss_and_gradients, tiny_model
from jax.experimental import pallas as pl

from bd3jax import sampling, train
from bd3jax.kernels import block_sparse, decode, platform, splash_attention, tiles
from bd3jax.kernels.block_sparse import block_sparse_attention
from bd3jax.masks import AttentionMask, MaskKind, Tile, tile_map
from bd3jax.model.attention import attention, dense_attention, dense_cache_attention
from bd3jax.model.transformer import positions_for
from bd3jax.rotary import rotary_cos_sin, rotary_qkv

TRAINING, BLOCK_CAUSAL, FULL = MaskKind.TRAINING, MaskKind.BLOCK_CAUSAL, MaskKind.FULL


def qkv_and_cotangent(seed, shape, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


value_and_grads = jax.jit(jax_helpers.value_and_grads, static_argnums=(0,))


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("kind,seq_len,block_size", [
    (TRAINING, 16, 1), (TRAINING, 16, 4), (TRAINING, 16, 16), (TRAINING, 32, 16),
    (TRAINING, 32, 32), (BLOCK_CAUSAL, 32, 4), (BLOCK_CAUSAL, 12, 3), (FULL, 8, 8)])
def test_visible_and_tile_lists_follow_the_mask(kind, seq_len, block_size):
  mask = AttentionMask(kind, seq_len, block_size)
  n = -(-mask.num_tokens // 16) * 16
  dense_NN = tiles.padded_mask(mask, n)
  np.testing.assert_array_equal(dense_NN[:mask.num_tokens, :mask.num_tokens], mask.dense())
  pos = jnp.arange(n, dtype=jnp.int32)
  np.testing.assert_array_equal(tiles.visible(mask, n, pos[:, None], pos[None, :]), dense_NN)
  np.testing.assert_array_equal(tiles.visible(mask, n, pos[None, :], pos[:, None]), dense_NN.T)
  for block_q, block_k in ((8, 8), (16, 4)):
    rows, cols = tiles.kernel_tiles(mask, n, block_q, block_k)
    for lists, map_NM in ((rows, tile_map(dense_NN, block_q, block_k)),
                          (cols, tile_map(dense_NN, block_q, block_k).T)):
      width = lists.index_NP.shape[1]
      assert width & (width - 1) == 0
      for row_M, (n_full, n_partial), index_P in zip(map_NM, lists.counts_N2, lists.index_NP):
        np.testing.assert_array_equal(index_P[:n_full], np.flatnonzero(row_M == Tile.FULL))
        np.testing.assert_array_equal(index_P[n_full:n_full + n_partial],
                                      np.flatnonzero(row_M == Tile.PARTIAL))


Launch = block_sparse.Launch
# (mask kind, L, L', dtype, head dim, block_q, block_k, (dq, dkv) launches or None: the
# forward's): L' in {1, 4, 16, L}, both dtypes, head dims 64 and 128, square and rectangular
# tiles, backward tiles unlike the forward's; T = 2L for the training mask.
CASES = [
    (TRAINING, 16, 1, jnp.float32, 64, 8, 8, None),
    (TRAINING, 16, 4, jnp.bfloat16, 64, 8, 8, None),
    (TRAINING, 32, 4, jnp.float32, 64, 16, 8, None),
    (TRAINING, 32, 4, jnp.float32, 64, 8, 8, (Launch(16, 4), Launch(4, 16))),
    (TRAINING, 32, 16, jnp.bfloat16, 128, 8, 16, None),
    (TRAINING, 16, 16, jnp.bfloat16, 128, 16, 16, (Launch(8, 16, 4, 1), Launch(16, 8))),
    (TRAINING, 32, 32, jnp.float32, 64, 16, 16, None),
    (BLOCK_CAUSAL, 32, 4, jnp.float32, 64, 8, 8, None),
    (BLOCK_CAUSAL, 31, 1, jnp.bfloat16, 64, 8, 8, None),  # padded: T = 31 tokens, tiles of 8
    (BLOCK_CAUSAL, 31, 1, jnp.bfloat16, 64, 8, 8, (Launch(16, 8), Launch(8, 32))),  # T -> 32
    (FULL, 16, 16, jnp.float32, 64, 8, 8, None),
]


@pytest.mark.parametrize("kind,seq_len,block_size,dtype,head_dim,block_q,block_k,backward",
                         CASES)
def test_forward_and_gradients_match_dense(kind, seq_len, block_size, dtype, head_dim, block_q,
                                           block_k, backward):
  mask = AttentionMask(kind, seq_len, block_size)
  shape = (2, mask.num_tokens, 3, head_dim)
  q, k, v, do = qkv_and_cotangent(seq_len + block_size + head_dim, shape, dtype)
  dq, dkv = backward or (None, None)
  pallas = functools.partial(block_sparse_attention, mask=mask, block_q=block_q, block_k=block_k,
                             dq=dq, dkv=dkv)
  dense = functools.partial(dense_attention, mask_TS=mask.dense())
  o, grads = value_and_grads(pallas, q, k, v, do)
  assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
  if dtype == jnp.float32:
    o_ref, grads_ref = value_and_grads(dense, q, k, v, do)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  else:  # against float32 dense on the same bf16 values: bf16 rounding only
    o_ref, grads_ref = value_and_grads(dense, *(x.astype(jnp.float32) for x in (q, k, v, do)))
    assert relative_error(o, o_ref) < 1e-2  # dense in bf16 is off by 0.3-0.5%
    for g, g_ref in zip(grads, grads_ref):
      assert relative_error(g, g_ref) < 1.5e-2


# (mask kind, L, L', queries Q, dtype, block_q, block_k, (dq, dkv) launches or None): the x_t
# half of the training mask (Q = L), a Q no tile divides, Q = 1 and Q = T.
PREFIX_CASES = [
    (TRAINING, 16, 1, 16, jnp.float32, 8, 8, None),
    (TRAINING, 16, 4, 16, jnp.bfloat16, 8, 8, None),
    (TRAINING, 32, 16, 32, jnp.float32, 16, 8, (Launch(8, 16), Launch(16, 8))),
    (TRAINING, 16, 16, 16, jnp.float32, 8, 8, None),
    (TRAINING, 16, 4, 13, jnp.float32, 8, 8, (Launch(4, 8), Launch(16, 4))),
    (TRAINING, 16, 4, 1, jnp.float32, 8, 8, None),
    (BLOCK_CAUSAL, 31, 1, 31, jnp.float32, 8, 8, None),
    (BLOCK_CAUSAL, 31, 1, 20, jnp.bfloat16, 8, 8, None),
]


@pytest.mark.parametrize("kind,seq_len,block_size,queries,dtype,block_q,block_k,backward",
                         PREFIX_CASES)
def test_first_queries_match_the_dense_rows(kind, seq_len, block_size, queries, dtype, block_q,
                                            block_k, backward):
  """Q < T queries: the output and gradients of the first Q rows of the whole attention."""
  mask = AttentionMask(kind, seq_len, block_size)
  shape = (2, mask.num_tokens, 3, 64)
  q, k, v, do = qkv_and_cotangent(queries + seq_len + block_size, shape, dtype)
  q, do = q[:, :queries], do[:, :queries]
  dq, dkv = backward or (None, None)
  pallas = functools.partial(block_sparse_attention, mask=mask, block_q=block_q, block_k=block_k,
                             dq=dq, dkv=dkv)
  o, grads = value_and_grads(pallas, q, k, v, do)
  assert o.shape == q.shape and grads[0].shape == q.shape and grads[1].shape == k.shape
  dense_rows = functools.partial(dense_attention, mask_TS=mask.dense()[:queries])
  o_ref, grads_ref = value_and_grads(dense_rows, *(x.astype(jnp.float32) for x in (q, k, v, do)))
  tolerance, grad_tolerance = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1.5e-2)
  assert relative_error(o, o_ref) < tolerance
  for g, g_ref in zip(grads, grads_ref):
    assert relative_error(g, g_ref) < grad_tolerance
  for implementation in ("dense", "xla"):  # the dispatcher's other paths take a prefix too
    o_impl = attention(q, k, v, mask, implementation)
    assert o_impl.shape == q.shape and relative_error(o_impl, o_ref) < tolerance


# (mask kind, L, L', queries Q or None (all T), dtype, head dim, tile): the packed projection's
# path, Q < T (the dq kernel zeroes the other rows of slot 0) and a padded T (the fallback).
PACKED_CASES = [
    (TRAINING, 16, 1, None, jnp.float32, 64, 8),
    (TRAINING, 16, 4, 16, jnp.bfloat16, 64, 8),
    (TRAINING, 32, 16, None, jnp.bfloat16, 128, 16),
    (TRAINING, 16, 16, 16, jnp.float32, 64, 8),
    (TRAINING, 16, 4, 12, jnp.float32, 64, 8),          # Q = 12: padded, so unpacked
    (BLOCK_CAUSAL, 32, 4, None, jnp.float32, 64, 8),
    (BLOCK_CAUSAL, 31, 1, None, jnp.bfloat16, 64, 8),  # T = 31: padded, so q, k, v unpacked
]


@pytest.mark.parametrize("kind,seq_len,block_size,queries,dtype,head_dim,tile", PACKED_CASES)
def test_packed_attention_matches_rotary_then_dense(monkeypatch, kind, seq_len, block_size,
                                                    queries, dtype, head_dim, tile):
  """`packed_attention` of qkv [B, T, 3, H, K] against rotary q, k then dense attention: the
  output and d qkv (the rotary's backward inside the backward kernels)."""
  monkeypatch.setattr(block_sparse, "BLOCK_Q", tile)
  monkeypatch.setattr(block_sparse, "BLOCK_K", tile)
  mask = AttentionMask(kind, seq_len, block_size)
  t = mask.num_tokens
  q = t if queries is None else queries
  keys = jax.random.split(jax.random.key(seq_len + block_size + q), 2)
  qkv = jax.random.normal(keys[0], (2, t, 3, 2, head_dim)).astype(dtype)
  do = jax.random.normal(keys[1], (2, q, 2, head_dim)).astype(dtype)
  cos, sin = rotary_cos_sin(positions_for(mask), head_dim)

  def reference(qkv):
    return dense_attention(*rotary_qkv(qkv, cos, sin, q), mask.dense()[:q])

  packed = lambda qkv: block_sparse.packed_attention(qkv, cos, sin, mask, queries)
  o, vjp = jax.vjp(packed, qkv)
  (dqkv,) = vjp(do)
  o_ref, (dqkv_ref,) = jax_helpers.value_and_grads(reference, qkv.astype(jnp.float32),
                                                   do.astype(jnp.float32))
  assert o.shape == (2, q, 2, head_dim) and dqkv.shape == qkv.shape and dqkv.dtype == dtype
  tolerance, grad_tolerance = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1.5e-2)
  assert relative_error(o, o_ref) < tolerance
  for slot in range(3):
    assert relative_error(dqkv[:, :, slot], dqkv_ref[:, :, slot]) < grad_tolerance
  assert not np.asarray(dqkv[:, q:, 0], np.float32).any()   # no query, no gradient
  aliased = [eqn for eqn in jax_helpers.equations(jax.make_jaxpr(vjp)(do).jaxpr)
             if eqn.primitive.name == "pallas_call" and eqn.params["input_output_aliases"]]
  packed_path = not (t % tile or q % tile)
  assert len(aliased) == (1 + (q < t) if packed_path else 0)   # dk/dv into dq's buffer


def test_every_output_element_is_written():
  """The interpreter fills outputs with NaN before the kernel runs; none may survive."""
  def writes_nothing(x_ref, o_ref):
    del x_ref, o_ref
  poisoned = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32),
                            interpret=True)(jnp.zeros((8, 8)))
  assert np.isnan(poisoned).all()

  mask = AttentionMask(TRAINING, 32, 4)
  q, k, v, do = qkv_and_cotangent(0, (2, 64, 2, 64), jnp.float32)
  cfg = block_sparse.kernel_config(q, k, v, mask, 8, 8)
  o, lse = block_sparse.forward(q, k, v, cfg)
  outputs = (o, lse, *block_sparse.backward(q, k, v, o, lse, do, cfg))
  for out in outputs:
    assert np.isfinite(out).all()


def test_model_loss_and_gradients_identical_with_dense_and_pallas(rng, monkeypatch):
  monkeypatch.setattr(block_sparse, "BLOCK_Q", 8)  # 8 x 8 tiles: empty, partial and full ones
  monkeypatch.setattr(block_sparse, "BLOCK_K", 8)
  assert_same_model_loss_and_gradients(rng, 32, 4, dict(n_layers=1, n_heads=2, attention="dense"),
                                       dict(n_layers=1, n_heads=2, attention="pallas"))


@pytest.mark.parametrize("queries", [256, 128, 100])  # all, the x_t half, not a block multiple
def test_splash_matches_dense_with_gradients(queries):
  mask = AttentionMask(TRAINING, 128, 16)  # T = 256: 2 x 2 splash blocks of 128
  q, k, v, do = qkv_and_cotangent(1, (2, 256, 2, 64), jnp.float32)
  q, do = q[:, :queries], do[:, :queries]
  o, grads = value_and_grads(functools.partial(splash_attention, mask=mask), q, k, v, do)
  o_ref, grads_ref = value_and_grads(
      functools.partial(dense_attention, mask_TS=mask.dense()[:queries]), q, k, v, do)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_dispatch_and_errors():
  mask = AttentionMask(TRAINING, 8, 4)
  q, k, v, _ = qkv_and_cotangent(2, (1, 16, 2, 16), jnp.float32)
  dense = attention(q, k, v, mask, "dense")
  np.testing.assert_array_equal(attention(q, k, v, mask, "auto"), dense)  # dense on CPU
  np.testing.assert_allclose(attention(q, k, v, mask, "pallas"), dense, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="'pallas' compiles for GPU only"):
    block_sparse_attention(q, k, v, mask, interpret=False)
  with pytest.raises(ValueError, match="'splash' runs on TPU only"):
    splash_attention(q, k, v, mask, interpret=False)
  with pytest.raises(ValueError, match="power of two"):
    block_sparse_attention(q, k, v, mask, block_q=12)
  with pytest.raises(ValueError, match="num_warps=3 must be"):
    block_sparse_attention(q, k, v, mask, num_warps=3)
  with pytest.raises(ValueError, match="covers 8 tokens, k and v have 16"):
    block_sparse_attention(q, k, v, AttentionMask(TRAINING, 4, 4))
  with pytest.raises(ValueError, match="covers 8 tokens, k and v have 16"):
    splash_attention(q, k, v, AttentionMask(TRAINING, 4, 4))
  with pytest.raises(ValueError, match="q has 17 queries"):
    block_sparse_attention(jnp.concatenate([q, q[:, :1]], axis=1), k, v, mask)
  with pytest.raises(ValueError, match=r"needs q \[B, Q, H, K\] and k, v \[B, T, H, K\]"):
    block_sparse_attention(q, k, v[:, :, :1], mask)
  with pytest.raises(ValueError, match=r"needs q \[B, Q, H, K\] and k, v \[B, T, H, K\]"):
    splash_attention(q[:, :, :1], k, v, mask)
  with pytest.raises(ValueError, match="float32 or all bfloat16"):
    block_sparse_attention(q, k.astype(jnp.bfloat16), v, mask)
  with pytest.raises(ValueError, match="num_stages=0"):
    block_sparse_attention(q, k, v, mask, num_stages=0)
  with pytest.raises(ValueError, match=r"\(dq\) tile block_q=12 must be a power of two"):
    block_sparse_attention(q, k, v, mask, dq=block_sparse.Launch(12, 8))
  with pytest.raises(ValueError, match=r"\(dkv\) num_warps=3 must be"):
    block_sparse_attention(q, k, v, mask, dkv=block_sparse.Launch(8, 8, num_warps=3))


@pytest.mark.parametrize("backend, dtype, head_dim, chosen", [
    ("gpu", jnp.bfloat16, 64, "pallas"), ("gpu", jnp.float32, 128, "pallas"),
    ("gpu", jnp.bfloat16, 48, "xla"), ("gpu", jnp.bfloat16, 512, "xla"),
    ("gpu", jnp.float16, 64, "cudnn"), ("tpu", jnp.bfloat16, 64, "splash"),
    ("cpu", jnp.bfloat16, 64, "dense")])
def test_auto_choice_per_backend(monkeypatch, backend, dtype, head_dim, chosen):
  monkeypatch.setattr(platform, "backend", lambda: backend)
  module = importlib.import_module("bd3jax.model.attention")  # the package exports the function
  assert module._auto(dtype, head_dim) == chosen


def query_and_cache(seed, batch, t, heads, slots, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = ((batch, t, heads, head_dim), (batch, heads, slots, head_dim),
            (batch, heads, slots, head_dim))
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k, shape in zip(keys, shapes)]


@pytest.mark.parametrize("t,slots,end,dtype,head_dim,block_k", [
    (1, 64, 1, jnp.float32, 64, None),       # AR: the first token
    (1, 64, 37, jnp.bfloat16, 64, 16),       # AR: a partial last key tile
    (4, 64, 64, jnp.float32, 128, None),     # L' = 4, the cache just full
    (16, 64, 32, jnp.bfloat16, 64, 16),      # L' = 16
    (16, 96, 400, jnp.float32, 64, None),    # past the window: every slot, tiles of 32
    (24, 48, 24, jnp.bfloat16, 16, None),    # T padded to 32 queries
    (64, 64, 64, jnp.bfloat16, 64, None),    # L' = L: MDLM's one block
    (96, 96, 96, jnp.float32, 64, 32),       # two query tiles, three key tiles
])
def test_cache_attention_matches_dense(t, slots, end, dtype, head_dim, block_k):
  q, k, v = query_and_cache(t + slots + end, 2, t, 3, slots, head_dim, dtype)
  o = decode.cache_attention(q, k, v, jnp.int32(end), block_k=block_k)
  assert o.shape == q.shape and o.dtype == dtype and np.isfinite(o).all()
  if dtype == jnp.float32:
    np.testing.assert_allclose(o, dense_cache_attention(q, k, v, end), rtol=1e-5, atol=1e-5)
  else:  # against float32 dense on the same bf16 values: bf16 rounding only
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert relative_error(o, dense_cache_attention(*f32, end)) < 1e-2
  # Unfilled slots weigh nothing, and key tiles past the last filled slot are never read.
  filled = min(end, slots)
  tile = decode.decode_config(q, k, v, block_k).block_k
  read = -(-filled // tile) * tile
  k, v = (x.at[:, :, filled:read].set(1e4).at[:, :, read:].set(jnp.nan) for x in (k, v))
  np.testing.assert_array_equal(decode.cache_attention(q, k, v, jnp.int32(end), block_k=block_k),
                                o)


def test_cache_attention_errors(monkeypatch):
  q, k, v = query_and_cache(0, 1, 4, 2, 24, 16, jnp.float32)
  with pytest.raises(ValueError, match="'pallas' compiles for GPU only"):
    decode.cache_attention(q, k, v, 4, interpret=False)
  with pytest.raises(ValueError, match="all float32 or all bfloat16"):
    decode.cache_attention(q, k.astype(jnp.bfloat16), v, 4)
  with pytest.raises(ValueError, match=r"caches \[B, H, S, K\]"):
    decode.cache_attention(q, k[:, :1], v, 4)
  with pytest.raises(ValueError, match="num_warps=3"):
    decode.cache_attention(q, k, v, 4, num_warps=3)
  for block_k in (0, 6):
    with pytest.raises(ValueError, match=f"block_k={block_k} must be a power of two"):
      decode.cache_attention(q, k, v, 4, block_k=block_k)
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  with pytest.raises(ValueError, match="multiple of 16 slots; got 24"):
    decode.cache_attention(q, k, v, 4, interpret=False)


def exponentiates_with_exp2(module: str) -> bool:
  """The kernels' Triton IR calls libdevice's exp2f (one MUFU.EX2 on the GPU), never its
  expf (several more instructions per element)."""
  return "__nv_exp2f" in module and "__nv_expf" not in module


@pytest.mark.parametrize("kind,seq_len,block_size,dtype,head_dim", [
    (TRAINING, 128, 1, jnp.bfloat16, 64), (TRAINING, 128, 16, jnp.float32, 128),
    (TRAINING, 96, 4, jnp.bfloat16, 128), (TRAINING, 128, 128, jnp.bfloat16, 64),
    (BLOCK_CAUSAL, 96, 4, jnp.float32, 64)])
def test_pallas_forward_and_backward_lower_to_triton(monkeypatch, kind, seq_len, block_size,
                                                     dtype, head_dim):
  """The GPU path without a GPU: Pallas lowers the kernels to Triton IR for CUDA (Triton's
  compilation to GPU code happens on the GPU)."""
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  mask = AttentionMask(kind, seq_len, block_size)
  x = jax.ShapeDtypeStruct((2, mask.num_tokens, 3, head_dim), dtype)
  attend = functools.partial(block_sparse_attention, mask=mask, interpret=False)
  module = lowered_for("cuda", lambda q, k, v: jax.vjp(attend, q, k, v)[1](q), x, x, x)
  assert module.count(TRITON_CALL) == 3   # forward, dq, dk and dv
  warps = block_sparse.default_num_warps(head_dim, dtype)
  assert module.count(f"num_warps = {warps} : i32") == 3
  assert exponentiates_with_exp2(module)


def test_each_training_kernel_lowers_with_its_own_launch(monkeypatch):
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  mask = AttentionMask(TRAINING, 128, 16)
  x = jax.ShapeDtypeStruct((1, mask.num_tokens, 2, 64), jnp.bfloat16)
  attend = functools.partial(block_sparse_attention, mask=mask, num_warps=4, interpret=False,
                             dq=Launch(128, 32, 8, 3), dkv=Launch(32, 128, 2, 1))
  module = lowered_for("cuda", lambda q, k, v: jax.vjp(attend, q, k, v)[1](q), x, x, x)
  launches = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32',
                        module)
  assert module.count(TRITON_CALL) == 3
  assert {name: (int(stages), int(warps)) for name, stages, warps in launches} == {
      "bd3_attention_fwd": (2, 4), "bd3_attention_dq": (3, 8), "bd3_attention_dkv": (1, 2)}


@pytest.mark.parametrize("t,slots,dtype,head_dim", [
    (16, 1024, jnp.bfloat16, 64), (1, 96, jnp.float32, 128), (24, 48, jnp.bfloat16, 64)])
def test_cache_attention_lowers_to_triton(monkeypatch, t, slots, dtype, head_dim):
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  q = jax.ShapeDtypeStruct((2, t, 3, head_dim), dtype)
  cache = jax.ShapeDtypeStruct((2, 3, slots, head_dim), dtype)
  attend = functools.partial(decode.cache_attention, interpret=False)
  module = lowered_for("cuda", attend, q, cache, cache, jax.ShapeDtypeStruct((), jnp.int32))
  assert module.count(TRITON_CALL) == 1
  assert module.count(f"num_warps = {block_sparse.default_num_warps(head_dim, dtype)} : i32") == 1
  assert exponentiates_with_exp2(module)


def test_sampler_lowers_with_the_decode_kernel(monkeypatch):
  """The KV-cached sampler with model.attention = pallas: the decode kernel in every layer of
  the denoising pass and of the commit pass, inside the sampling loops (the commit pass keeps
  only keys and values, so its last layer's attention is dead code)."""
  monkeypatch.setattr(platform, "backend", lambda: "gpu")
  model = tiny_model(d_model=64, n_heads=4, attention="pallas", dtype="bfloat16")
  cfg = sampling.SamplerConfig(length=64, block_size=16, steps=16, rule="first_hitting")
  mask = AttentionMask(BLOCK_CAUSAL, 16, 16)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                                             None, mask)["params"])

  def generate(params):
    return sampling._generate(
        params, jax.random.split(jax.random.key(0), 2), jnp.zeros((2, 0), jnp.int32),
        jnp.zeros((2,), jnp.int32), jnp.int32(4), model=model, cfg=cfg, bos_id=0, eos_id=None,
        mask_id=MASK_ID, on_block=None)
  module = lowered_for("cuda", generate, params)
  assert module.count(TRITON_CALL) == 2 * model.cfg.n_layers - 1


@pytest.mark.parametrize("backend,implementation,platform_name,custom_call", [
    ("gpu", "pallas", "cuda", TRITON_CALL), ("tpu", "splash", "tpu", "tpu_custom_call")])
def test_train_step_lowers_with_the_kernels(monkeypatch, backend, implementation,
                                            platform_name, custom_call):
  monkeypatch.setattr(platform, "backend", lambda: backend)
  config = tiny_config.get_config()
  config.model.attention = implementation
  task = train.Task.from_config(config, 64, 63)
  state = jax.eval_shape(lambda: train.init_state(task, task.init_params(jax.random.key(0))))
  batch = {"tokens": jax.ShapeDtypeStruct((4, config.length), jnp.int32)}
  module = lowered_for(platform_name, train.jit_train_step(task), state, batch)
  assert custom_call in module


def test_kernel_resources_captures_the_triton_kernels():
  """benchmarks/kernel_resources.py's Triton IR (building it for a GPU needs `triton`): each
  training kernel loops over its full tiles, then its partial ones, with 2 (forward), 3 (dq)
  or 4 (dk, dv) matmuls per tile; the KV-cache kernel loops once over the filled tiles."""
  from benchmarks import kernel_resources
  modules = kernel_resources.triton_modules(AttentionMask(TRAINING, 64, 16), 64,
                                            jnp.dtype(jnp.bfloat16), 64, 64, 4)
  names = ["bd3_attention_fwd", "bd3_attention_dq", "bd3_attention_dkv"]
  for module, name, dots in zip(modules, names, (2, 3, 4)):
    assert f"tt.func public @{name}(" in module
    assert module.count("scf.for") == 2
    assert module.count("tt.dot ") == 2 * dots
  for queries in (None, 64):   # all 2L queries; the x_t half (dq into a zeroed d qkv)
    packed = kernel_resources.packed_modules(AttentionMask(TRAINING, 64, 16), 64,
                                             jnp.dtype(jnp.bfloat16), queries)
    for module, name, dots in zip(packed, names, (2, 3, 4)):   # same loops, other epilogues
      assert f"tt.func public @{name}(" in module and module.count("tt.dot ") == 2 * dots
  module, cfg = kernel_resources.decode_module(16, 1024, 64, jnp.dtype(jnp.bfloat16), 4)
  assert "tt.func public @bd3_cache_attention(" in module and (cfg.block_q, cfg.block_k) == (16, 64)
  assert module.count("scf.for") == 1 and module.count("tt.dot ") == 2  # one loop, 2 matmuls
