"""The held-out NELBO estimator: unbiased against quadrature over t and exact sums over masks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import MASK_ID, apply_fn, random_params, random_tokens, tiny_model

from bd3jax import diffusion, evaluate
from bd3jax.masks import AttentionMask, MaskKind

L, BLOCK = 4, 2


def test_nelbo_estimator_is_unbiased(rng):
  """E_t,mask[estimate] with t ~ U[1e-3, 1] per block equals the NELBO computed exactly: a sum
  over every mask pattern of each block, times its probability integrated over t on a fine grid."""
  model = tiny_model()  # no time conditioning: the network's output does not depend on t
  x0_1L = random_tokens(rng, 1, L)
  mask = AttentionMask(MaskKind.TRAINING, L, BLOCK)
  params = random_params(model, jnp.concatenate([x0_1L, x0_1L], 1), mask)
  fn = apply_fn(model, params)
  lo, hi = evaluate.EVAL_CLIP
  cfg = diffusion.LossConfig("bd3lm", L, BLOCK, MASK_ID, clip_min=lo, clip_max=hi, resample=False)

  # Exact: a block's loss depends only on its own mask (earlier blocks are seen clean).
  patterns = np.array(list(itertools.product([0, 1], repeat=L)), bool)
  xt = jnp.where(patterns, MASK_ID, x0_1L)
  logits = diffusion.diffusion_logits(fn, xt, jnp.repeat(x0_1L, len(patterns), 0),
                                      jnp.zeros(len(patterns)), cfg)
  nll_PL = -np.asarray(diffusion.subs_log_prob(logits, jnp.repeat(x0_1L, len(patterns), 0),
                                               jnp.asarray(patterns), MASK_ID))
  t = np.linspace(lo, hi, 400_001)
  def weight_integral(k):  # E_t[w(t) t^k (1 - t)^(L' - k)], w = 1/t (loglinear)
    return np.trapezoid(t ** (k - 1) * (1 - t) ** (BLOCK - k), t) / (hi - lo)
  exact = 0.0
  for b in range(L // BLOCK):
    cols = slice(b * BLOCK, (b + 1) * BLOCK)
    # patterns agreeing outside block b give the same block-b loss; take those with no others masked
    own = [p for p in range(len(patterns)) if not patterns[p][np.r_[0:b * BLOCK, (b + 1) * BLOCK:L]].any()]
    for p in own:
      k = int(patterns[p][cols].sum())
      if k:
        exact += weight_integral(k) * nll_PL[p, cols].sum()
  exact /= L

  n = 8192
  x0_NL = jnp.repeat(x0_1L, n, 0)
  token_loss = jax.jit(lambda key: diffusion.nelbo(fn, x0_NL, key, cfg, train=False)[1]["token_loss"])
  per_seq = np.concatenate([np.asarray(token_loss(jax.random.key(s))).mean(1) for s in range(4)])
  mc, se = per_seq.mean(), per_seq.std() / np.sqrt(len(per_seq))
  assert abs(mc - exact) < 4 * se, (mc, exact, se)
  assert se < 0.02 * exact  # the test can tell a biased estimator apart
