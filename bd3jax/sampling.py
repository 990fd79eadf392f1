"""Block-by-block sampling of BD3-LMs: one jit-compiled, batched, KV-cached, variable-length loop.

A sample is BOS, then its prompt, then generated tokens, up to `SamplerConfig.length` tokens.
Blocks of L' positions are produced in order by a `lax.while_loop` (how many is data, not
shape). In each block, denoising steps run the network on the block's L' tokens only, against
a pre-allocated KV cache (keys after rotary, absolute positions) and the block itself; then
one commit pass writes the finished block's keys and values. Every step reveals masked tokens
by one of `RULES`, independently in each sequence. A sequence stops at its first EOS after
the prompt, or when its text degenerates (low unigram entropy); the loop ends when all have
stopped or `num_blocks` blocks are done.

An autoregressive model (L' = 1) runs one pass per token on the token before it, which both
writes that token's keys and values and predicts the next one; MDLM is one block of length L.
`sample` is the dense reference: the same loop, recomputing the whole fixed-length sequence
under the block-causal mask at every step.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bd3jax.kernels import platform
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model.transformer import DiT, inference_params, init_cache

RULES = ("ddpm", "first_hitting", "threshold", "entropy", "topk")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What to sample; checked on construction, before anything compiles.

  Rules, applied per sequence to the masked positions of the current block:
  - ddpm: the reference's update on t = 1, 1 - 1/T, ..., 1/T: each masked token is revealed
    with probability (t - s) / t (all of them at the last step). A step that revealed nothing
    in a sequence leaves its prediction valid: it is reused, and is no NFE.
  - first_hitting: exactly one uniformly chosen masked token per step, so one NFE per token
    whatever `steps` (t <- t u^(1/#masked)); only that position is projected to logits.
  - threshold: every token whose proposal has probability > `threshold`, at least the most
    confident one.
  - entropy: tokens in increasing order of entropy while the entropies of those before sum
    to at most `entropy_bound` nats (at least one).
  - topk: the `tokens_per_step` most confident tokens.
  Proposals are drawn from SUBS p(x_0) at `temperature` (0: argmax) after nucleus (top-p)
  filtering; confidences (the proposal's probability) and entropies use p(x_0) itself.
  Past `context` tokens the KV cache is a ring buffer of the last `context` positions (keys
  keep their absolute rotary positions): the reference's sliding window.
  """
  length: int                   # maximum tokens per sample (BOS and prompt included)
  block_size: int               # L'
  steps: int                    # T: denoising steps per block of the ddpm rule
  nucleus_p: float = 0.9
  nucleus_bits: int | None = None  # bits per pass of the top-p search; None: by backend
  autoregressive: bool = False  # a causal model: the logits at position i predict token i + 1
  rule: str = "ddpm"
  temperature: float = 1.0
  threshold: float = 0.9
  entropy_bound: float = 1.0
  tokens_per_step: int = 2
  context: int | None = None    # KV window in tokens (the training length); None: `length`
  stop_entropy: float = 4.0     # stop below this unigram entropy of the last window; 0: never
  entropy_window: int = 256

  def __post_init__(self):
    if self.block_size < 1:
      raise ValueError(f"sample block_size {self.block_size} must be at least 1")
    if self.steps < 1:
      raise ValueError(f"sample.steps {self.steps} must be at least 1")
    if not 0.0 < self.nucleus_p <= 1.0:
      raise ValueError(f"sample.nucleus_p {self.nucleus_p} must be in (0, 1]")
    if self.nucleus_bits is not None and not 1 <= self.nucleus_bits <= 6:
      raise ValueError(f"sample nucleus_bits {self.nucleus_bits} must be in [1, 6]")
    if self.length < 1 or self.length % self.block_size:
      raise ValueError(f"sample length {self.length} is not a multiple of block_size "
                       f"{self.block_size}")
    if self.rule not in RULES:
      raise ValueError(f"sample rule {self.rule!r} is not one of {RULES}")
    if self.temperature < 0:
      raise ValueError(f"sample temperature {self.temperature} must be >= 0")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"sample threshold {self.threshold} must be in [0, 1]")
    if self.entropy_bound < 0:
      raise ValueError(f"sample entropy_bound {self.entropy_bound} must be >= 0")
    if self.tokens_per_step < 1:
      raise ValueError(f"sample tokens_per_step {self.tokens_per_step} must be at least 1")
    if self.autoregressive and self.block_size != 1:
      raise ValueError(f"an autoregressive model samples with block_size 1, not {self.block_size}")
    if self.context is not None and (self.context < self.block_size or
                                     self.context % self.block_size):
      raise ValueError(f"sample context {self.context} must be a positive multiple of "
                       f"block_size {self.block_size}")
    if self.entropy_window < 1:
      raise ValueError(f"sample entropy_window {self.entropy_window} must be at least 1")

  @property
  def n_blocks(self) -> int:
    return self.length // self.block_size

  @property
  def cache_size(self) -> int:
    """KV-cache slots: the window past which the cache slides (a ring buffer)."""
    return min(self.length, self.context or self.length)

  @property
  def nucleus_pass_bits(self) -> int:
    """`nucleus_bits`, or where it is None the backend's choice: 4 on GPU, where the sampler is
    bound by launches and 8 passes beat 30 (README), 1 elsewhere (plain bisection)."""
    if self.nucleus_bits is not None:
      return self.nucleus_bits
    return 4 if platform.backend() == "gpu" else 1

  @property
  def max_steps(self) -> int:
    """Denoising steps per block: T for ddpm; the other rules reveal >= 1 token per step."""
    return self.steps if self.rule == "ddpm" else self.block_size


class SampleOutput(NamedTuple):
  tokens_BS: jax.Array  # [B, length]: BOS, prompt, samples; mask_id from lengths_B on
  lengths_B: jax.Array  # tokens per sample (up to and including its EOS)
  nfes_B: jax.Array     # network evaluations whose prediction the sample used (no reuse, no commit)
  entropy_B: jax.Array  # unigram entropy (nats) of each sample's tokens
  forwards: jax.Array   # batched network passes run (denoising and commit)


class CachedNetwork:
  """The DiT on one block at a time, against a KV cache of `size` slots (the state); its
  matmul weights cast to the compute dtype once (`inference_params`), not on every pass."""
  commits = True

  def __init__(self, model: DiT, params, size: int):
    self.model, self.size = model, size
    self.params = inference_params(model.cfg, params)

  def init(self, batch: int):
    return init_cache(self.model.cfg, batch, self.size)

  def forward(self, cache, tokens_BS, start, width: int, sigma_B, select_B=None):
    """Logits [B, width, V] of positions start..start+width-1 (with `select_B`: [B, 1, V] of
    position start + select_B[b]); writes the positions' keys and values."""
    tokens_BW = jax.lax.dynamic_slice_in_dim(tokens_BS, start, width, axis=1)
    logits_BWV, variables = self.model.apply(
        {"params": self.params, "cache": cache}, tokens_BW, sigma_B, start, select_B,
        method=DiT.decode, mutable=["cache"])
    return logits_BWV, variables["cache"]


class DenseNetwork:
  """Full recompute: `apply_fn(tokens, sigma, mask, train)` over the whole sequence under the
  block-causal mask, logits sliced to the block. No state, no sliding window."""
  commits = False

  def __init__(self, apply_fn: Callable, length: int, block_size: int):
    self.apply_fn = apply_fn
    self.mask = AttentionMask(MaskKind.BLOCK_CAUSAL, length, block_size)

  def init(self, batch: int):
    return ()

  def forward(self, state, tokens_BS, start, width: int, sigma_B, select_B=None):
    logits_BSV = self.apply_fn(tokens_BS, sigma_B, self.mask, False)
    logits_BWV = jax.lax.dynamic_slice_in_dim(logits_BSV, start, width, axis=1)
    if select_B is not None:
      logits_BWV = jnp.take_along_axis(logits_BWV, select_B[:, None, None], axis=1)
    return logits_BWV, state


# Softmax probabilities are at most 1.0, whose float32 bit pattern 0x3F800000 is below 2**30.
_PROB_BITS = 30


def nucleus_filter(logits_BKV, p: float, bits_per_pass: int = 1):
  """Keeps the smallest set of most probable tokens whose probability reaches p (and any tied
  with the least probable of them).

  The cutoff probability is found without a sort, exactly, on its float32 bit pattern (order-
  preserving for non-negative floats): each pass over the vocabulary settles `bits_per_pass`
  bits of it with 2**bits_per_pass - 1 masked sums, so 30 passes of one sum (bisection) at 1,
  8 passes of 15 sums at 4: fewer dependent passes (kernels, on GPU) for more arithmetic in
  each. Unrolled: a loop inside a denoising step would run from the host on GPU, outside XLA's
  CUDA graphs.
  """
  if p >= 1.0:
    return logits_BKV
  probs = jax.nn.softmax(logits_BKV, axis=-1)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  steps_C = jnp.arange(1, 2 ** bits_per_pass, dtype=jnp.int32)
  cutoff = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # invariant: mass(bits >= cutoff) >= p
  for top in range(_PROB_BITS, 0, -bits_per_pass):  # the bits above `top` are settled
    shift = max(top - bits_per_pass, 0)
    candidates_C = cutoff + (steps_C << shift)
    mass_C = jnp.sum(jnp.where(bits[..., None, :] >= candidates_C[..., None], probs[..., None, :],
                               0.0), axis=-1)
    reached_C = (mass_C >= p).astype(jnp.int32)  # true for a prefix of the candidates
    # Elementwise adds, not a reduction: XLA can fuse them into the next pass's reduction.
    cutoff += sum(reached_C[..., j:j + 1] for j in range(len(steps_C))) << shift
  return jnp.where(bits >= cutoff, logits_BKV, -jnp.inf)


def propose(key, logits_KV, cfg: SamplerConfig):
  """Tokens [K] from SUBS logits: argmax at temperature 0, else drawn after top-p filtering."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_KV, axis=-1)
  logits_KV = nucleus_filter(logits_KV / cfg.temperature, cfg.nucleus_p, cfg.nucleus_pass_bits)
  return jax.random.categorical(key, logits_KV, axis=-1)


def first_hit_position(key, masked_K):
  """The position first hitting reveals with this key: uniform among the masked ones."""
  key_pick, _ = jax.random.split(key)
  return jnp.argmax(jnp.where(masked_K, jax.random.uniform(key_pick, masked_K.shape), -1.0))


def reveal(cfg: SamplerConfig, key, block_K, masked_K, logits_KV, t, s, *, mask_id: int):
  """One denoising step of one sequence's block: fills some `masked_K` positions (never
  [MASK]); the others keep their token. `t` > `s` are the ddpm rule's times. For first
  hitting, `logits_KV` is [1, V]: the logits of `first_hit_position(key, masked_K)`."""
  logits_KV = logits_KV.at[:, mask_id].set(-jnp.inf)
  key_pick, key_token = jax.random.split(key)
  if cfg.rule == "first_hitting":
    pick = first_hit_position(key, masked_K)
    token = propose(key_token, logits_KV, cfg)[0]
    return jnp.where(masked_K & (jnp.arange(block_K.shape[0]) == pick), token, block_K)
  proposal_K = propose(key_token, logits_KV, cfg)
  if cfg.rule == "ddpm":
    chosen_K = masked_K & (jax.random.uniform(key_pick, masked_K.shape) < (t - s) / t)
  else:
    chosen_K = masked_K & _parallel_choice(cfg, masked_K, logits_KV, proposal_K)
  return jnp.where(chosen_K, proposal_K, block_K)


def _parallel_choice(cfg: SamplerConfig, masked_K, logits_KV, proposal_K):
  """Which masked positions the threshold, entropy or top-k rule reveals (at least one)."""
  probs_KV = jax.nn.softmax(logits_KV, axis=-1)
  if cfg.rule == "entropy":
    log_probs_KV = jax.nn.log_softmax(logits_KV, axis=-1)
    entropy_K = -jnp.sum(jnp.where(probs_KV > 0, probs_KV * log_probs_KV, 0.0), axis=-1)
    order_K = jnp.argsort(jnp.where(masked_K, entropy_K, jnp.inf))
    sorted_K = jnp.where(masked_K[order_K], entropy_K[order_K], 0.0)
    before_K = jnp.cumsum(sorted_K) - sorted_K
    return (before_K <= cfg.entropy_bound)[jnp.argsort(order_K)]
  confidence_K = jnp.take_along_axis(probs_KV, proposal_K[:, None], axis=-1)[:, 0]
  rank_K = jnp.argsort(jnp.argsort(jnp.where(masked_K, -confidence_K, jnp.inf)))
  if cfg.rule == "topk":
    return rank_K < cfg.tokens_per_step
  return (confidence_K > cfg.threshold) | (rank_K == 0)


def unigram_entropy(tokens_BS, lengths_B):
  """Entropy (nats) of the token frequencies in each row's first lengths_B tokens."""
  valid_BS = jnp.arange(tokens_BS.shape[1]) < lengths_B[:, None]
  sorted_BS = jnp.sort(jnp.where(valid_BS, tokens_BS, -1), axis=-1)
  def counts(row_S):  # unrolled binary searches: no loop (see `nucleus_filter`)
    search = functools.partial(jnp.searchsorted, row_S, row_S, method="scan_unrolled")
    return search(side="right") - search(side="left")
  count_BS = jax.vmap(counts)(sorted_BS)
  n_B1 = jnp.maximum(lengths_B, 1)[:, None].astype(jnp.float32)
  log_freq_BS = jnp.log(jnp.maximum(count_BS, 1) / n_B1)
  return -jnp.sum(jnp.where(sorted_BS >= 0, log_freq_BS, 0.0), axis=-1) / n_B1[:, 0]


def _sigma(t_B):
  """The noise level the network is conditioned on at masking probability t (loglinear)."""
  return -jnp.log1p(-jnp.minimum(t_B, 1.0 - 1e-6))


class _Carry(NamedTuple):
  block: jax.Array       # index of the block to generate next
  tokens_BS: jax.Array
  net: Any               # the network's state (the KV cache)
  done_B: jax.Array
  lengths_B: jax.Array
  nfes_B: jax.Array
  forwards: jax.Array


class _StepCarry(NamedTuple):
  step: jax.Array
  tokens_BS: jax.Array
  net: Any
  logits_BKV: jax.Array | None  # the last prediction (ddpm only: reused when nothing changed)
  changed_B: jax.Array          # the block changed since the last prediction
  t_B: jax.Array                # first hitting's time
  nfes_B: jax.Array
  forwards: jax.Array


class _Loop:
  """The body functions of the sampling loop; all sizes static, all state in the carries."""

  def __init__(self, network, cfg: SamplerConfig, keys_B, prefix_len_B, *, eos_id, mask_id,
               stop: bool, on_block):
    self.net, self.cfg, self.keys_B, self.prefix_len_B = network, cfg, keys_B, prefix_len_B
    self.eos_id, self.mask_id, self.stop, self.on_block = eos_id, mask_id, stop, on_block

  def run(self, tokens_BS, num_blocks):
    b = tokens_BS.shape[0]
    zeros_B = jnp.zeros((b,), jnp.int32)
    carry = _Carry(block=jnp.int32(1 if self.cfg.autoregressive else 0), tokens_BS=tokens_BS,
                   net=self.net.init(b), done_B=jnp.zeros((b,), bool), lengths_B=zeros_B,
                   nfes_B=zeros_B, forwards=jnp.int32(0))
    carry = jax.lax.while_loop(lambda c: (c.block < num_blocks) & ~c.done_B.all(), self.block,
                               carry)
    lengths_B = jnp.where(carry.done_B, carry.lengths_B, carry.block * self.cfg.block_size)
    kept_BS = jnp.arange(tokens_BS.shape[1]) < lengths_B[:, None]
    tokens_BS = jnp.where(kept_BS, carry.tokens_BS, self.mask_id)
    out = SampleOutput(tokens_BS, lengths_B, carry.nfes_B, unigram_entropy(tokens_BS, lengths_B),
                       carry.forwards)
    return out, carry.net

  def block(self, c: _Carry) -> _Carry:
    start = c.block * self.cfg.block_size
    if self.cfg.autoregressive:
      c = self.next_token(c, start)
    else:
      c = self.denoise(c, start)
      if self.net.commits and self.cfg.n_blocks > 1:
        _, net = self.net.forward(c.net, c.tokens_BS, start, self.cfg.block_size, self.zero_sigma)
        c = c._replace(net=net, forwards=c.forwards + 1)
    c = self.check_stops(c, start)
    if self.on_block is not None:  # the block's tokens as an operand: called once they exist
      block_BK = jax.lax.dynamic_slice_in_dim(c.tokens_BS, start, self.cfg.block_size, axis=1)
      jax.debug.callback(lambda i, _: self.on_block(int(i)), c.block, block_BK, ordered=True)
    return c._replace(block=c.block + 1)

  @property
  def zero_sigma(self):
    return jnp.zeros(self.keys_B.shape, jnp.float32)

  def step_keys(self, block, step):
    fold = lambda k: jax.random.fold_in(jax.random.fold_in(k, block), step)
    return jax.vmap(fold)(self.keys_B)

  def masked(self, tokens_BS, start, done_B):
    block_BK = jax.lax.dynamic_slice_in_dim(tokens_BS, start, self.cfg.block_size, axis=1)
    return block_BK, (block_BK == self.mask_id) & ~done_B[:, None]

  def next_token(self, c: _Carry, start) -> _Carry:
    """Autoregressive: the pass on token start - 1 caches it and predicts token start."""
    logits_B1V, net = self.net.forward(c.net, c.tokens_BS, start - 1, 1, self.zero_sigma)
    block_B1, masked_B1 = self.masked(c.tokens_BS, start, c.done_B)
    rule = functools.partial(reveal, self.cfg, t=1.0, s=0.0, mask_id=self.mask_id)
    new_B1 = jax.vmap(rule)(self.step_keys(c.block, 0), block_B1, masked_B1, logits_B1V)
    return c._replace(tokens_BS=jax.lax.dynamic_update_slice_in_dim(c.tokens_BS, new_B1, start, 1),
                      net=net, nfes_B=c.nfes_B + masked_B1[:, 0], forwards=c.forwards + 1)

  def denoise(self, c: _Carry, start) -> _Carry:
    """Denoising steps until every live sequence's block is filled.

    First hitting fills one position of every live sequence per step, so its `max_steps` (L')
    steps fill any block: they run as a loop of fixed length (on GPU XLA then runs the steps
    back to back, where a data-dependent loop has the host read its predicate after each step),
    skipped for a block with nothing to fill. The other rules stop once every block is filled.
    """
    b, k = c.tokens_BS.shape[0], self.cfg.block_size
    logits = (jnp.zeros((b, k, self.net_vocab(c)), jnp.float32) if self.cfg.rule == "ddpm"
              else None)
    init = _StepCarry(step=jnp.int32(0), tokens_BS=c.tokens_BS, net=c.net, logits_BKV=logits,
                      changed_B=jnp.ones((b,), bool), t_B=jnp.ones((b,), jnp.float32),
                      nfes_B=c.nfes_B, forwards=c.forwards)
    step = lambda s: self.step(s, c.block, start, c.done_B)
    to_fill = lambda s: self.masked(s.tokens_BS, start, c.done_B)[1].any()
    if self.cfg.rule == "first_hitting":
      steps = lambda s: jax.lax.fori_loop(0, self.cfg.max_steps, lambda _, s: step(s), s)
      s = jax.lax.cond(to_fill(init), steps, lambda s: s, init)
    else:
      s = jax.lax.while_loop(lambda s: (s.step < self.cfg.max_steps) & to_fill(s), step, init)
    return c._replace(tokens_BS=s.tokens_BS, net=s.net, nfes_B=s.nfes_B, forwards=s.forwards)

  def net_vocab(self, c: _Carry) -> int:
    forward = lambda: self.net.forward(c.net, c.tokens_BS, 0, 1, self.zero_sigma)[0]
    return jax.eval_shape(forward).shape[-1]

  def step(self, s: _StepCarry, block, start, done_B) -> _StepCarry:
    cfg = self.cfg
    block_BK, masked_BK = self.masked(s.tokens_BS, start, done_B)
    needs_B = masked_BK.any(-1) & s.changed_B
    key_t_B, key_rule_B = jnp.moveaxis(jax.vmap(jax.random.split)(self.step_keys(block, s.step)),
                                       1, 0)
    t_B, s_B = self.times(s, masked_BK, key_t_B)
    select_B = (jax.vmap(first_hit_position)(key_rule_B, masked_BK)
                if cfg.rule == "first_hitting" else None)
    logits_BKV, net, forwards = self.predict(s, start, needs_B, _sigma(t_B), select_B)
    rule = functools.partial(reveal, cfg, mask_id=self.mask_id)
    new_BK = jax.vmap(rule)(key_rule_B, block_BK, masked_BK, logits_BKV, t_B, s_B)
    return _StepCarry(
        step=s.step + 1, net=net, forwards=forwards, nfes_B=s.nfes_B + needs_B, t_B=t_B,
        tokens_BS=jax.lax.dynamic_update_slice_in_dim(s.tokens_BS, new_BK, start, axis=1),
        logits_BKV=logits_BKV if cfg.rule == "ddpm" else None,
        changed_B=(new_BK != block_BK).any(-1))

  def times(self, s: _StepCarry, masked_BK, key_B):
    """(t, s) per sequence: the ddpm grid, first hitting's t u^(1/#masked), else the masked
    fraction (t only conditions a time-conditioned network)."""
    cfg = self.cfg
    n_B = masked_BK.sum(-1)
    if cfg.rule == "ddpm":
      t = jnp.full(n_B.shape, 1.0 - s.step / cfg.steps, jnp.float32)
      return t, jnp.full(n_B.shape, 1.0 - (s.step + 1) / cfg.steps, jnp.float32)
    if cfg.rule == "first_hitting":
      u_B = jax.vmap(jax.random.uniform)(key_B)
      t = s.t_B * u_B ** (1.0 / jnp.maximum(n_B, 1))
    else:
      t = n_B / cfg.block_size
    return t, t

  def predict(self, s: _StepCarry, start, needs_B, sigma_B, select_B):
    """(logits, network state, passes run): a new prediction (first hitting: of the selected
    positions only), or under ddpm the last one when no sequence's block changed."""
    def forward():
      return self.net.forward(s.net, s.tokens_BS, start, self.cfg.block_size, sigma_B, select_B)
    if self.cfg.rule != "ddpm":
      return *forward(), s.forwards + 1
    run = needs_B.any()
    logits_BKV, net = jax.lax.cond(run, forward, lambda: (s.logits_BKV, s.net))
    return logits_BKV, net, s.forwards + run

  def check_stops(self, c: _Carry, start) -> _Carry:
    """Stops sequences at an EOS generated in this block, or on low entropy."""
    cfg, done_B, lengths_B = self.cfg, c.done_B, c.lengths_B
    end = start + cfg.block_size
    block_BK = jax.lax.dynamic_slice_in_dim(c.tokens_BS, start, cfg.block_size, axis=1)
    if self.eos_id is not None:
      generated_BK = start + jnp.arange(cfg.block_size) >= self.prefix_len_B[:, None]
      eos_BK = (block_BK == self.eos_id) & generated_BK
      hit_B = eos_BK.any(-1) & ~done_B
      lengths_B = jnp.where(hit_B, start + jnp.argmax(eos_BK, axis=-1) + 1, lengths_B)
      done_B = done_B | hit_B
    window = cfg.entropy_window
    if self.stop and cfg.stop_entropy > 0 and window < cfg.length:
      tail_BW = jax.lax.dynamic_slice_in_dim(c.tokens_BS, jnp.maximum(end - window, 0), window, 1)
      full_B = jnp.full(done_B.shape, window)
      low_B = (~done_B & (end > window) & (end > self.prefix_len_B) &
               (unigram_entropy(tail_BW, full_B) < cfg.stop_entropy))
      lengths_B = jnp.where(low_B, jnp.maximum(end - window, self.prefix_len_B), lengths_B)
      done_B = done_B | low_B
    return c._replace(done_B=done_B, lengths_B=lengths_B)


def sample_loop(network, keys_B, prefix_BS, prefix_len_B, num_blocks, cfg: SamplerConfig, *,
                eos_id: int | None, mask_id: int, stop: bool = True,
                on_block: Callable[[int], None] | None = None):
  """The sampler over any network (`CachedNetwork`, `DenseNetwork`); traceable.

  `prefix_BS` holds each row's fixed first prefix_len_B tokens and mask_id elsewhere;
  `keys_B` one PRNG key per row (a row's samples do not depend on the other rows).
  Returns (SampleOutput, the network's final state).
  """
  loop = _Loop(network, cfg, keys_B, prefix_len_B, eos_id=eos_id, mask_id=mask_id, stop=stop,
               on_block=on_block)
  return loop.run(prefix_BS, num_blocks)


def prefix(prompt_BP, prompt_len_B, length: int, *, bos_id: int, mask_id: int):
  """([B, length] BOS + prompt + mask_id, [B] prefix lengths) from padded prompts."""
  b, p = prompt_BP.shape
  prompt_BP = jnp.where(jnp.arange(p) < prompt_len_B[:, None], prompt_BP, mask_id)
  tokens_BS = jnp.full((b, length), mask_id, jnp.int32).at[:, 0].set(bos_id)
  return tokens_BS.at[:, 1:p + 1].set(prompt_BP.astype(jnp.int32)), prompt_len_B + 1


@functools.partial(jax.jit, static_argnames=("model", "cfg", "bos_id", "eos_id", "mask_id",
                                             "on_block"))
def _generate(params, keys_B, prompt_BP, prompt_len_B, num_blocks, *, model, cfg, bos_id, eos_id,
              mask_id, on_block):
  prefix_BS, prefix_len_B = prefix(prompt_BP, prompt_len_B, cfg.length, bos_id=bos_id,
                                   mask_id=mask_id)
  network = CachedNetwork(model, params, cfg.cache_size)
  return sample_loop(network, keys_B, prefix_BS, prefix_len_B, num_blocks, cfg, eos_id=eos_id,
                     mask_id=mask_id, on_block=on_block)[0]


def generate(model: DiT, params, key, cfg: SamplerConfig, *, bos_id: int, mask_id: int,
             eos_id: int | None = None, num_samples: int | None = None, prompt_tokens=None,
             prompt_lengths=None, num_blocks: int | None = None,
             on_block: Callable[[int], None] | None = None) -> SampleOutput:
  """Samples a batch with the KV-cached sampler; compiled once per (model, cfg, ids, batch,
  prompt width, on_block).

  key: one PRNG key, or one per sequence ([B]; sequence i then samples as it would alone).
  prompt_tokens: [B, P] ids with prompt_lengths [B] (default all P); each sample starts with
  BOS and its prompt. num_blocks: blocks to run (prompt blocks included, default all); data,
  not shape. on_block: called on the host with each finished block's index.
  eos_id: stop each sequence at its first EOS after the prompt (None: never).
  """
  vocab = model.cfg.vocab_size
  if cfg.autoregressive == model.cfg.adaln:
    raise ValueError("autoregressive sampling needs an AR model (no adaLN) and the reverse; "
                     f"got autoregressive={cfg.autoregressive} for adaln={model.cfg.adaln}")
  for name, value in (("bos_id", bos_id), ("mask_id", mask_id), ("eos_id", eos_id)):
    if value is not None and not 0 <= value < vocab:
      raise ValueError(f"{name} {value} is not in the vocabulary [0, {vocab})")
  prompt_BP, prompt_len_B = _check_prompts(prompt_tokens, prompt_lengths, num_samples, cfg,
                                           vocab=vocab, mask_id=mask_id)
  keys_B = _row_keys(key, prompt_BP.shape[0])
  num_blocks = _check_num_blocks(num_blocks, int(prompt_len_B.max(initial=0)) + 1, cfg)
  return _generate(params, keys_B, jnp.asarray(prompt_BP), jnp.asarray(prompt_len_B),
                   jnp.int32(num_blocks), model=model, cfg=cfg, bos_id=bos_id, eos_id=eos_id,
                   mask_id=mask_id, on_block=on_block)


def _check_prompts(prompt_tokens, prompt_lengths, num_samples, cfg, *, vocab, mask_id):
  if prompt_tokens is None:
    if num_samples is None or num_samples < 1:
      raise ValueError(f"num_samples must be a positive number without prompts, not {num_samples}")
    return np.zeros((num_samples, 0), np.int32), np.zeros((num_samples,), np.int32)
  prompt_BP = np.asarray(prompt_tokens)
  if prompt_BP.ndim != 2 or not np.issubdtype(prompt_BP.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be a [batch, width] integer array, not "
                     f"{prompt_BP.dtype}{list(prompt_BP.shape)}")
  b, p = prompt_BP.shape
  if num_samples is not None and num_samples != b:
    raise ValueError(f"num_samples {num_samples} differs from the {b} prompts")
  prompt_len_B = np.full((b,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
  if prompt_len_B.shape != (b,) or (prompt_len_B < 0).any() or (prompt_len_B > p).any():
    raise ValueError(f"prompt_lengths must be [{b}] lengths in [0, {p}]")
  longest = int(prompt_len_B.max(initial=0))
  if longest + 1 > cfg.length:
    raise ValueError(f"a prompt of {longest} tokens does not fit with BOS in the sample length "
                     f"{cfg.length}")
  used_BP = np.arange(p) < prompt_len_B[:, None]
  if ((prompt_BP < 0) | (prompt_BP >= vocab) | (prompt_BP == mask_id))[used_BP].any():
    raise ValueError(f"prompt tokens must be ids in [0, {vocab}) other than the mask id {mask_id}")
  return prompt_BP.astype(np.int32), prompt_len_B.astype(np.int32)


def _check_num_blocks(num_blocks, longest_prefix: int, cfg: SamplerConfig) -> int:
  num_blocks = cfg.n_blocks if num_blocks is None else int(num_blocks)
  if not 1 <= num_blocks <= cfg.n_blocks:
    raise ValueError(f"num_blocks {num_blocks} must be in [1, {cfg.n_blocks}]")
  if num_blocks * cfg.block_size < longest_prefix:
    raise ValueError(f"num_blocks {num_blocks} covers {num_blocks * cfg.block_size} tokens, "
                     f"fewer than the longest prompt with BOS ({longest_prefix})")
  return num_blocks


def _row_keys(key, batch: int):
  """One typed PRNG key per row: `key` split, or `key` itself when it holds one per row."""
  key = jnp.asarray(key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f"key must be one PRNG key or {batch} keys, not shape {key.shape}")
  return key


def sample(apply_fn: Callable, key, num_samples: int, cfg: SamplerConfig, *, bos_id: int,
           mask_id: int):
  """[num_samples, length] token ids from the dense reference sampler (traceable).

  `apply_fn(tokens, sigma, mask, train) -> logits` runs the network over all positions; every
  step recomputes the whole sequence. Fixed length: no EOS or entropy stop, no prompt.
  """
  prefix_BS, prefix_len_B = prefix(jnp.zeros((num_samples, 0), jnp.int32),
                                   jnp.zeros((num_samples,), jnp.int32), cfg.length,
                                   bos_id=bos_id, mask_id=mask_id)
  network = DenseNetwork(apply_fn, cfg.length, cfg.block_size)
  out, _ = sample_loop(network, jax.random.split(key, num_samples), prefix_BS, prefix_len_B,
                       cfg.n_blocks, cfg, eos_id=None, mask_id=mask_id, stop=False)
  return out.tokens_BS


def rows(output: SampleOutput, decode: Callable[[list[int]], str] | None = None) -> list[dict]:
  """One JSON-ready dict per sample: tokens, length, nfes, entropy (and text with `decode`)."""
  out = jax.device_get(output)
  result = []
  for ids, n, nfes, entropy in zip(out.tokens_BS, out.lengths_B, out.nfes_B, out.entropy_B):
    row = {"tokens": ids[:n].tolist(), "length": int(n), "nfes": int(nfes),
           "entropy": float(entropy)}
    if decode is not None:
      row = {"text": decode(row["tokens"]), **row}
    result.append(row)
  return result
