import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax_helpers
from conftest import MASK_ID, VOCAB, apply_fn, random_params, tiny_model

from bd3jax import sampling
from bd3jax.kernels import platform
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import dense_attention, transformer
from bd3jax.model.transformer import DiT, init_cache

# the module (the package exports its function under the same name)
attention_lib = importlib.import_module("bd3jax.model.attention")

BOS, EOS = 0, 5
L, LB = 32, 4
PROMPTS = np.array([[11, 12, 13, 14, 15, EOS], [21, 22, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
PROMPT_LENGTHS = np.array([6, 2, 0])


def one_hot_logits(targets_BL):
  return jnp.where(jax.nn.one_hot(targets_BL, VOCAB) > 0, 10.0, -10.0)


@functools.lru_cache(maxsize=None)
def model_and_params(autoregressive: bool = False):
  model = tiny_model(adaln=not autoregressive)
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, L, 1 if autoregressive else LB)
  return model, random_params(model, jnp.zeros((1, L), jnp.int32), mask)


def run_generate(cfg, key, prompts=PROMPTS, lengths=PROMPT_LENGTHS, **kwargs):
  model, params = model_and_params(cfg.autoregressive)
  return sampling.generate(model, params, key, cfg, bos_id=BOS, eos_id=EOS, mask_id=MASK_ID,
                           prompt_tokens=prompts, prompt_lengths=lengths, **kwargs)


def reveal_rows(cfg, keys_B, block_BK, logits_BKV, t=1.0, s=0.0):
  rule = functools.partial(sampling.reveal, cfg, t=t, s=s, mask_id=MASK_ID)
  return jax.vmap(rule)(keys_B, block_BK, block_BK == MASK_ID, logits_BKV)


def test_nucleus_filter_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
  kept = np.isfinite(np.asarray(sampling.nucleus_filter(logits, 0.8)))
  np.testing.assert_array_equal(kept[0, 0], [True, True, False, False])
  kept = np.isfinite(np.asarray(sampling.nucleus_filter(logits, 0.81)))
  np.testing.assert_array_equal(kept[0, 0], [True, True, True, False])
  assert np.isfinite(np.asarray(sampling.nucleus_filter(logits, 1.0))).all()


def sorted_nucleus(probs_V, p: float):
  """The nucleus by a sort: the most probable tokens until their mass reaches p, plus ties;
  and whether float32 sums could move the cutoff (a mass next to it within 1e-5 of p)."""
  order = np.argsort(-probs_V, kind="stable")
  mass = np.cumsum(probs_V[order].astype(np.float64))
  last = min(np.searchsorted(mass, p), len(order) - 1)
  return probs_V >= probs_V[order[last]], np.abs(mass[max(last - 1, 0):last + 1] - p).min() < 1e-5


@pytest.mark.parametrize("bits_per_pass", [1, 2, 4, 5, 6])
def test_nucleus_filter_matches_a_sort(bits_per_pass):
  """Fresh random rows (flat, peaked, with ties, near ties one ulp apart and -inf logits)
  against the sorted nucleus."""
  keys = jax.random.split(jax.random.key(bits_per_pass), 4)
  logits = jax.random.normal(keys[0], (3, 8, 1000)) * jnp.array([0.1, 2.0, 8.0])[:, None, None]
  ties = jnp.round(jax.random.normal(keys[1], (3, 8, 1000)) * 2.0)
  drop = jax.random.bernoulli(keys[2], 0.2, ties.shape)
  near_ties = jnp.where(jax.random.bernoulli(keys[3], 0.5, ties.shape),
                        jnp.nextafter(ties, -jnp.inf), ties)
  logits = jnp.concatenate([logits, ties, near_ties, jnp.where(drop, -jnp.inf, ties)])
  logits = logits.reshape(-1, 1000)
  probs = np.asarray(jax.nn.softmax(logits))
  compared = 0
  for p in (0.1, 0.5, 0.9, 0.95):
    kept = np.isfinite(np.asarray(sampling.nucleus_filter(logits, p, bits_per_pass)))
    for row_kept, row_probs in zip(kept, probs):
      expected, ambiguous = sorted_nucleus(row_probs, p)
      if not ambiguous:
        np.testing.assert_array_equal(row_kept, expected)
        compared += 1
  assert compared >= 0.9 * 4 * len(probs)


def test_ddpm_rule_reveals_at_the_rate_and_never_remasks():
  cfg = sampling.SamplerConfig(length=4, block_size=4, steps=4, nucleus_p=1.0)
  x = jnp.full((2000, 4), MASK_ID).at[:, 0].set(7)
  logits = jnp.zeros((2000, 4, VOCAB))
  keys = jax.random.split(jax.random.key(0), 2000)
  out = reveal_rows(cfg, keys, x, logits, 1.0, 0.75)
  assert (out[:, 0] == 7).all()
  revealed = np.asarray(out[:, 1:] != MASK_ID)
  assert abs(revealed.mean() - 0.25) < 0.02
  assert not (reveal_rows(cfg, keys, x, logits, 0.25, 0.0) == MASK_ID).any()


def test_first_hitting_reveals_one_uniform_masked_token_per_step():
  cfg = sampling.SamplerConfig(length=4, block_size=4, steps=1, rule="first_hitting")
  x = jnp.full((3000, 4), MASK_ID).at[:, 1].set(7)
  out = np.asarray(reveal_rows(cfg, jax.random.split(jax.random.key(0), 3000), x,
                               jnp.zeros((3000, 1, VOCAB))))
  revealed = out != MASK_ID
  assert (revealed.sum(1) == 2).all() and (out[:, 1] == 7).all()
  np.testing.assert_allclose(revealed[:, [0, 2, 3]].mean(0), 1 / 3, atol=0.03)
  assert out[revealed].max() < MASK_ID


@pytest.mark.parametrize("rule,kwargs,expected", [
    ("threshold", dict(threshold=0.9), [0, 2]),
    ("threshold", dict(threshold=0.999), [2]),
    ("topk", dict(tokens_per_step=3), [0, 1, 2]),
    ("topk", dict(tokens_per_step=9), [0, 1, 2, 4]),
    ("entropy", dict(entropy_bound=0.0), [2]),
    ("entropy", dict(entropy_bound=0.6), [0, 1, 2]),
])
def test_parallel_rules_reveal_the_confident_tokens(rule, kwargs, expected):
  """Masked positions 0, 1, 2, 4 with top probabilities 0.95, 0.6, 0.99, 0.3; position 3 given."""
  top = np.array([0.95, 0.6, 0.99, 0.5, 0.3])
  probs = np.full((5, VOCAB), 0.0) + ((1 - top) / (VOCAB - 2))[:, None]
  probs[np.arange(5), np.arange(5) + 1] = top
  probs[:, MASK_ID] = 0.0
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  block = jnp.array([[MASK_ID, MASK_ID, MASK_ID, 30, MASK_ID]])
  cfg = sampling.SamplerConfig(length=5, block_size=5, steps=1, rule=rule, temperature=0.0,
                               **kwargs)
  out = np.asarray(reveal_rows(cfg, jax.random.split(jax.random.key(0), 1), block, logits))[0]
  assert out[3] == 30
  revealed = [i for i in (0, 1, 2, 4) if out[i] != MASK_ID]
  assert revealed == expected
  np.testing.assert_array_equal(out[revealed], np.array(revealed) + 1)


def test_unigram_entropy_matches_numpy():
  tokens = np.random.default_rng(0).integers(0, 6, (4, 20))
  lengths = np.array([20, 7, 1, 0])
  got = np.asarray(sampling.unigram_entropy(jnp.asarray(tokens), jnp.asarray(lengths)))
  for row, n, h in zip(tokens, lengths, got):
    _, counts = np.unique(row[:n], return_counts=True)
    p = counts / max(n, 1)
    np.testing.assert_allclose(h, -(p * np.log(p)).sum(), atol=1e-5)


@pytest.mark.parametrize("block_size,steps", [(1, 1), (4, 2), (16, 4)])
def test_dense_sampler_follows_the_model(block_size, steps):
  """With a model certain of 'position mod 5 + 1', every sample is exactly that sequence."""
  n = 16
  def fake_apply(tokens, sigma, mask, train):
    assert mask == AttentionMask(MaskKind.BLOCK_CAUSAL, n, block_size)
    return one_hot_logits(jnp.broadcast_to(jnp.arange(n) % 5 + 1, tokens.shape))
  cfg = sampling.SamplerConfig(length=n, block_size=block_size, steps=steps)
  out = sampling.sample(fake_apply, jax.random.key(0), 3, cfg, bos_id=BOS, mask_id=MASK_ID)
  expected = np.concatenate([[BOS], np.arange(1, n) % 5 + 1])
  np.testing.assert_array_equal(out, np.broadcast_to(expected, (3, n)))


def test_autoregressive_sampling_reads_the_previous_position():
  n = 12
  fake_apply = lambda tokens, sigma, mask, train: one_hot_logits((tokens + 1) % MASK_ID)
  cfg = sampling.SamplerConfig(length=n, block_size=1, steps=1, autoregressive=True)
  out = sampling.sample(fake_apply, jax.random.key(0), 2, cfg, bos_id=BOS, mask_id=MASK_ID)
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(n), (2, n)))


def test_stops_at_eos_after_the_prompt_and_keeps_the_prompt():
  """A fake model predicts 'position mod 6 + 1' (EOS = 5 at positions 4, 10, 16, ...), except
  for the row whose prompt starts with 9, which always gets 8 and never stops."""
  def fake_apply(tokens, sigma, mask, train):
    cyclic = jnp.broadcast_to(jnp.arange(L) % 6 + 1, tokens.shape)
    return one_hot_logits(jnp.where(tokens[:, 1:2] == 9, 8, cyclic))
  prompts = np.array([[9, 0, 0, 0, 0], [3, EOS, 7, 7, 7], [2, 2, 0, 0, 0], [1, 1, 1, 1, 1]])
  lengths = np.array([1, 5, 2, 0])
  cfg = sampling.SamplerConfig(length=L, block_size=LB, steps=2, rule="first_hitting")
  prefix, prefix_len = sampling.prefix(jnp.asarray(prompts), jnp.asarray(lengths), L, bos_id=BOS,
                                       mask_id=MASK_ID)
  out, _ = sampling.sample_loop(sampling.DenseNetwork(fake_apply, L, LB),
                                jax.random.split(jax.random.key(0), 4), prefix, prefix_len,
                                cfg.n_blocks, cfg, eos_id=EOS, mask_id=MASK_ID)
  np.testing.assert_array_equal(out.lengths_B, [L, 11, 5, 5])
  tokens = np.asarray(out.tokens_BS)
  np.testing.assert_array_equal(tokens[:, 0], BOS)
  np.testing.assert_array_equal(tokens[0, 1:], [9] + [8] * (L - 2))
  np.testing.assert_array_equal(tokens[1, :11], [BOS, 3, EOS, 7, 7, 7, 1, 2, 3, 4, EOS])
  np.testing.assert_array_equal(tokens[2, :5], [BOS, 2, 2, 4, EOS])
  np.testing.assert_array_equal(tokens[3, :5], [BOS, 2, 3, 4, EOS])
  for row, n in zip(tokens, out.lengths_B):
    assert (row[n:] == MASK_ID).all()
  np.testing.assert_array_equal(out.nfes_B, [L - 2, 6, 5, 7])  # whole blocks, one per token
  rows = sampling.rows(out, decode=lambda ids: " ".join(map(str, ids)))
  assert [r["length"] for r in rows] == [L, 11, 5, 5] and [r["nfes"] for r in rows] == [30, 6, 5, 7]
  assert rows[2]["tokens"] == [BOS, 2, 2, 4, EOS] and rows[2]["text"] == "0 2 2 4 5"


def test_low_entropy_stops_a_degenerate_sequence():
  fake_apply = lambda tokens, sigma, mask, train: one_hot_logits(jnp.full(tokens.shape, 8))
  cfg = sampling.SamplerConfig(length=L, block_size=LB, steps=1, entropy_window=8)
  prefix, prefix_len = sampling.prefix(jnp.zeros((1, 0), jnp.int32), jnp.zeros((1,), jnp.int32),
                                       L, bos_id=BOS, mask_id=MASK_ID)
  out, _ = sampling.sample_loop(sampling.DenseNetwork(fake_apply, L, LB), jax.random.key(0)[None],
                                prefix, prefix_len, cfg.n_blocks, cfg, eos_id=EOS, mask_id=MASK_ID)
  assert int(out.lengths_B[0]) == 12 - 8  # the reference drops the degenerate window
  assert int(out.forwards) == 3  # stopped after the third block (one step each)


@pytest.mark.parametrize("dtype,tolerance,attention", [
    ("float32", 1e-5, "dense"), ("bfloat16", 1e-2, "dense"), ("bfloat16", 1e-2, "pallas")])
def test_decode_reuses_the_parameters_and_equals_the_full_forward(dtype, tolerance, attention):
  """Also in bfloat16, where the cache holds bfloat16 keys and values as the full forward's
  attention reads them (equal on XLA:CPU; the tolerance is relative to the largest logit).
  The full forward uses dense attention; `attention` is the decoding model's."""
  _, params = model_and_params()
  tokens = jax.random.randint(jax.random.key(3), (2, L), 0, MASK_ID)
  full = apply_fn(tiny_model(dtype=dtype), params)(tokens, None,
                                                   AttentionMask(MaskKind.BLOCK_CAUSAL, L, LB))
  model = tiny_model(dtype=dtype, attention=attention)
  atol = tolerance * float(jnp.abs(full).max()) if dtype == "bfloat16" else tolerance
  decode = jax.jit(lambda cache, tokens_BK, start, select_B: model.apply(
      {"params": params, "cache": cache}, tokens_BK, None, start, select_B, method=DiT.decode,
      mutable=["cache"]))
  cache = init_cache(model.cfg, 2, L)
  select = jnp.array([3, 1])
  for start in range(0, L, LB):
    picked, _ = decode(cache, tokens[:, start:start + LB], start, select)
    logits, variables = decode(cache, tokens[:, start:start + LB], start, None)
    cache = variables["cache"]
    np.testing.assert_allclose(logits, full[:, start:start + LB], rtol=tolerance, atol=atol)
    np.testing.assert_allclose(picked[:, 0], logits[jnp.arange(2), select], rtol=tolerance,
                               atol=atol)
  with pytest.raises(ValueError, match="needs a KV cache"):
    model.apply({"params": params}, tokens[:, :LB], None, 0, method=DiT.decode, mutable=["cache"])


def test_inference_params_change_no_output_bit():
  """The sampler's parameters: matmul weights in the compute dtype, the rest float32."""
  _, params = model_and_params()
  model = tiny_model(dtype="bfloat16")
  cast = transformer.inference_params(model.cfg, params)
  dtypes = {"/".join(k.key for k in path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
  matmuls = {f"blocks_{i}/{layer}" for i in range(2)
             for layer in ("attn_qkv/kernel", "attn_out/kernel", "mlp_0/kernel", "mlp_0/bias",
                           "mlp_2/kernel", "mlp_2/bias")} | {"output_layer/linear/kernel",
                                                             "output_layer/linear/bias"}
  assert {name for name, dtype in dtypes.items() if dtype == jnp.bfloat16} == matmuls
  assert all(dtype == jnp.float32 for name, dtype in dtypes.items() if name not in matmuls)
  decode = jax.jit(lambda params, tokens_BK: model.apply(
      {"params": params, "cache": init_cache(model.cfg, 2, L)}, tokens_BK, jnp.ones((2,)), 0,
      method=DiT.decode, mutable=["cache"]))
  tokens = jax.random.randint(jax.random.key(4), (2, LB), 0, MASK_ID)
  out, out_cast = decode(params, tokens), decode(cast, tokens)
  jax.tree.map(np.testing.assert_array_equal, out, out_cast)
  # No parameter is cast to bfloat16 inside the pass any more (all matmul weights were found).
  shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
  assert shapes & bf16_casts(jax.make_jaxpr(decode)(params, tokens).jaxpr)
  assert not shapes & bf16_casts(jax.make_jaxpr(decode)(cast, tokens).jaxpr)


def bf16_casts(jaxpr) -> set:
  """Shapes of the float32 values a jaxpr (and its sub-jaxprs) casts to bfloat16."""
  return {eqn.invars[0].aval.shape for eqn in jax_helpers.equations(jaxpr)
          if eqn.primitive.name == "convert_element_type"
          and eqn.invars[0].aval.dtype == jnp.float32 and eqn.params["new_dtype"] == jnp.bfloat16}


class CheckedNetwork:
  """The cached network, comparing its logits at every pass with a full recompute."""
  commits = True

  def __init__(self, cached, dense):
    self.cached, self.dense = cached, dense

  def init(self, batch):
    return self.cached.init(batch), jnp.float32(0), jnp.int32(0)

  def forward(self, state, tokens_BS, start, width, sigma_B, select_B=None):
    cache, err, count = state
    logits, cache = self.cached.forward(cache, tokens_BS, start, width, sigma_B, select_B)
    reference, _ = self.dense.forward((), tokens_BS, start, width, sigma_B, select_B)
    return logits, (cache, jnp.maximum(err, jnp.abs(logits - reference).max()), count + 1)


def banded_attention(window_blocks, block_size):
  """Block-causal attention limited to the last `window_blocks` blocks: the sliding window."""
  def attend(q, k, v, mask, implementation):
    block = np.arange(q.shape[1]) // block_size
    diff = block[:, None] - block[None, :]
    return dense_attention(q, k, v, jnp.asarray((diff >= 0) & (diff < window_blocks)))
  return attend


@pytest.mark.parametrize("kind,attention", [
    ("bd3_ddpm", "dense"), ("bd3_first_hitting", "dense"), ("ar", "dense"), ("mdlm", "dense"),
    ("sliding_window", "dense"), ("bd3_first_hitting", "pallas"),
    ("sliding_window", "pallas")])
def test_cached_logits_equal_a_full_recompute_at_every_step(kind, attention, monkeypatch):
  """The recompute is always dense attention; `attention` is the cached network's (the decode
  kernel's AR and MDLM shapes, 1 and L queries, are checked in tests/test_kernels.py)."""
  ar = kind == "ar"
  cfg = {
      "bd3_ddpm": sampling.SamplerConfig(length=L, block_size=LB, steps=3),
      "bd3_first_hitting": sampling.SamplerConfig(length=L, block_size=LB, steps=1,
                                                  rule="first_hitting"),
      "ar": sampling.SamplerConfig(length=L, block_size=1, steps=1, autoregressive=True),
      "mdlm": sampling.SamplerConfig(length=L, block_size=L, steps=5, rule="entropy"),
      "sliding_window": sampling.SamplerConfig(length=L, block_size=LB, steps=2, context=12),
  }[kind]
  if kind == "sliding_window":
    # the full recompute's attention (the cached network decodes through cache_attention)
    monkeypatch.setattr(attention_lib, "attention", banded_attention(3, LB))
  model, params = model_and_params(ar)
  cached_model = tiny_model(adaln=not ar, attention=attention)
  network = CheckedNetwork(sampling.CachedNetwork(cached_model, params, cfg.cache_size),
                           sampling.DenseNetwork(apply_fn(model, params), L, cfg.block_size))
  prefix, prefix_len = sampling.prefix(jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS), L,
                                       bos_id=BOS, mask_id=MASK_ID)
  keys = jax.random.split(jax.random.key(1), 3)
  run = jax.jit(lambda keys: sampling.sample_loop(network, keys, prefix, prefix_len,
                                                  cfg.n_blocks, cfg, eos_id=None,
                                                  mask_id=MASK_ID))
  out, (_, err, count) = run(keys)
  assert int(count) == int(out.forwards) >= (L - 1 if ar else cfg.n_blocks)
  assert float(err) < 1e-4
  np.testing.assert_array_equal(out.lengths_B, L)
  assert not (out.tokens_BS == MASK_ID).any()


@functools.lru_cache(maxsize=None)
def first_hitting_cfg():
  return sampling.SamplerConfig(length=L, block_size=LB, steps=LB, rule="first_hitting")


def test_cached_sampler_equals_the_dense_sampler():
  cfg = first_hitting_cfg()
  keys = jax.random.split(jax.random.key(0), 3)
  cached = run_generate(cfg, keys)
  model, params = model_and_params()
  prefix, prefix_len = sampling.prefix(jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS), L,
                                       bos_id=BOS, mask_id=MASK_ID)
  dense, _ = jax.jit(lambda keys: sampling.sample_loop(
      sampling.DenseNetwork(apply_fn(model, params), L, LB), keys, prefix, prefix_len,
      cfg.n_blocks, cfg, eos_id=EOS, mask_id=MASK_ID))(keys)
  for field in ("tokens_BS", "lengths_B", "nfes_B", "entropy_B"):
    np.testing.assert_allclose(getattr(cached, field), getattr(dense, field), rtol=1e-6)
  blocks_run = -(-np.asarray(cached.lengths_B) // LB)
  np.testing.assert_array_equal(cached.nfes_B, blocks_run * LB - PROMPT_LENGTHS - 1)


def test_seeds_prompts_and_batch_independence():
  cfg = first_hitting_cfg()
  keys = jax.random.split(jax.random.key(0), 3)
  a, b = run_generate(cfg, keys), run_generate(cfg, keys)
  c = run_generate(cfg, jax.random.split(jax.random.key(1), 3))
  np.testing.assert_array_equal(a.tokens_BS, b.tokens_BS)
  assert not np.array_equal(a.tokens_BS, c.tokens_BS)
  tokens = np.asarray(a.tokens_BS)
  for i, n in enumerate(PROMPT_LENGTHS):
    np.testing.assert_array_equal(tokens[i, :n + 1], np.concatenate([[BOS], PROMPTS[i, :n]]))
    alone = run_generate(cfg, keys[i:i + 1], PROMPTS[i:i + 1], PROMPT_LENGTHS[i:i + 1])
    np.testing.assert_array_equal(alone.tokens_BS[0], tokens[i])
    assert int(alone.lengths_B[0]) == int(a.lengths_B[i])
    assert int(alone.nfes_B[0]) == int(a.nfes_B[i])


def test_one_and_thirty_blocks_share_one_compilation():
  model, params = model_and_params()
  cfg = sampling.SamplerConfig(length=60, block_size=2, steps=2, rule="first_hitting")
  seen = []
  def generate(num_blocks):
    return sampling.generate(model, params, jax.random.key(0), cfg, bos_id=BOS, mask_id=MASK_ID,
                             num_samples=2, num_blocks=num_blocks, on_block=seen.append)
  before = sampling._generate._cache_size()
  one = generate(1)
  jax.effects_barrier()
  assert sampling._generate._cache_size() == before + 1 and seen == [0]
  thirty = generate(30)
  jax.effects_barrier()
  assert sampling._generate._cache_size() == before + 1 and seen == [0] + list(range(30))
  np.testing.assert_array_equal(one.lengths_B, 2)
  np.testing.assert_array_equal(thirty.lengths_B, 60)
  np.testing.assert_array_equal(one.tokens_BS[:, :2], thirty.tokens_BS[:, :2])
  assert (one.tokens_BS[:, 2:] == MASK_ID).all() and not (thirty.tokens_BS == MASK_ID).any()


@pytest.mark.parametrize("rule", ["first_hitting", "threshold", "topk", "entropy"])
def test_the_only_loops_are_blocks_and_steps(rule):
  """A loop over blocks around a loop over steps, and no other loop or branch (the entropy stop
  included): on GPU, XLA launches each loop iteration from the host (loops stay out of its CUDA
  graphs) and reads a data-dependent loop's predicate back after each iteration, so a loop in a
  step (e.g. the nucleus search, unrolled) costs launches per NFE. First hitting's steps are a
  loop of fixed length L' (no predicate to read), under one branch per block."""
  model, params = model_and_params()
  cfg = sampling.SamplerConfig(length=L, block_size=LB, steps=LB, rule=rule, entropy_window=8)
  jaxpr = jax.make_jaxpr(lambda p, k: sampling._generate(
      p, k, jnp.zeros((2, 0), jnp.int32), jnp.zeros((2,), jnp.int32), jnp.int32(2),
      model=model, cfg=cfg, bos_id=BOS, eos_id=EOS, mask_id=MASK_ID, on_block=None))(
          params, jax.random.split(jax.random.key(0), 2))
  flow = [eqn for eqn in jax_helpers.equations(jaxpr.jaxpr) if jax_helpers.is_loop_or_branch(eqn)]
  if rule == "first_hitting":
    assert [eqn.primitive.name for eqn in flow] == ["while", "cond", "scan"]
    assert flow[2].params["length"] == LB
    assert jax_helpers.control_flow_depth(jaxpr.jaxpr) == 3
  else:
    assert [eqn.primitive.name for eqn in flow] == ["while", "while"]
    assert jax_helpers.control_flow_depth(jaxpr.jaxpr) == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=16, block_size=4, steps=0), "steps 0"),
    (dict(length=16, block_size=4, steps=2, nucleus_p=0.0), "nucleus_p 0.0"),
    (dict(length=16, block_size=4, steps=2, nucleus_p=1.5), "nucleus_p 1.5"),
    (dict(length=16, block_size=4, steps=2, nucleus_bits=7), "nucleus_bits 7"),
    (dict(length=18, block_size=4, steps=2), "not a multiple of block_size"),
    (dict(length=16, block_size=4, steps=2, rule="greedy"), "rule 'greedy'"),
    (dict(length=16, block_size=4, steps=2, autoregressive=True), "block_size 1"),
    (dict(length=16, block_size=4, steps=2, context=6), "context 6"),
])
def test_bad_sampler_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplerConfig(**kwargs)


@pytest.mark.parametrize("backend,nucleus_bits,expected", [
    ("gpu", None, 4), ("cpu", None, 1), ("tpu", None, 1), ("gpu", 2, 2), ("cpu", 3, 3)])
def test_nucleus_bits_default_by_backend(monkeypatch, backend, nucleus_bits, expected):
  monkeypatch.setattr(platform, "backend", lambda: backend)
  cfg = sampling.SamplerConfig(length=16, block_size=4, steps=2, nucleus_bits=nucleus_bits)
  assert cfg.nucleus_pass_bits == expected


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=np.ones((1, L), int), lengths=None), "does not fit"),
    (dict(prompts=np.full((1, 3), MASK_ID), lengths=None), "other than the mask id"),
    (dict(prompts=np.ones((2, 3), int), lengths=[1, 4]), "prompt_lengths"),
    (dict(num_blocks=0), "num_blocks 0"),
    (dict(num_blocks=1), "fewer than the longest prompt"),
])
def test_bad_generate_inputs_fail_before_compiling(kwargs, message):
  with pytest.raises(ValueError, match=message):
    run_generate(first_hitting_cfg(), jax.random.key(0), **kwargs)


def test_autoregressive_flag_must_match_the_model():
  model, params = model_and_params(autoregressive=True)
  cfg = sampling.SamplerConfig(length=L, block_size=1, steps=1)
  with pytest.raises(ValueError, match="AR model"):
    sampling.generate(model, params, jax.random.key(0), cfg, bos_id=BOS, mask_id=MASK_ID,
                      num_samples=1)
