"""Dropout from 16-bit random draws, four per Threefry evaluation.

`jax.random.bernoulli` (flax's `nn.Dropout`) spends one Threefry-2x32 evaluation (20 rounds of
integer mixing, most of dropout's arithmetic) on every element. Here each evaluation's 64 output
bits give four 16-bit draws, so the training pass hashes a quarter as often. The counters are
elementwise over the drawn shape, so the draws are the same under any sharding of it. What
the forward pass keeps for the backward is one byte per evaluation, the four draws' keep bits:
the hash and the comparisons run in one kernel, and the selects unpack the bits.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p, threefry_prng_impl

DRAW_BITS = 16
_LEVELS = 1 << DRAW_BITS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeepBits:
  """Dropout's mask, packed along the last axis: bit j of byte m keeps element m * lanes + j
  (4 lanes for Threefry keys, else 2); kept elements are multiplied by `scale`."""
  bits: jax.Array  # uint8 [..., ceil(last / lanes)]
  lanes: int = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))


def dropout(x, rate: float, key):
  """`x` with each element zeroed with probability `rate` and the others scaled to keep E[x].

  `rate` is rounded to a multiple of 2^-16 (0.1 -> 0.100006) and kept elements are multiplied
  by the inverse of that rounded keep probability (rounded to x's dtype). `key` is a typed
  key or raw uint32 key data; Threefry keys (JAX's default) draw four values per evaluation,
  other implementations (e.g. rbg) draw 32-bit words through `jax.random.bits`, two per word.
  """
  return apply_keep_bits(x, keep_bits(key, x.shape, rate))


def keep_bits(key, shape, rate: float) -> KeepBits | None:
  """`dropout`'s mask for an array of `shape`, packed (None where `rate` rounds to 0)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate} must be in [0, 1)")
  threshold = round(rate * _LEVELS)
  if threshold == 0:
    return None
  if threshold == _LEVELS:
    raise ValueError(f"dropout rate {rate} rounds to 1 at {DRAW_BITS}-bit resolution")
  with jax.named_scope("dropout"):
    lanes = _draws(key, shape)
    bits_M = sum((draws >= threshold).astype(jnp.uint8) << j for j, draws in enumerate(lanes))
    return KeepBits(bits_M, len(lanes), _LEVELS / (_LEVELS - threshold))


def apply_keep_bits(x, keep: KeepBits | None):
  """`x` with the elements that `keep` drops zeroed and the others scaled (None: x)."""
  if keep is None:
    return x
  with jax.named_scope("dropout"):
    keep_MN = (keep.bits[..., None] & (1 << jnp.arange(keep.lanes, dtype=jnp.uint8))) != 0
    kept = _along_last_axis(keep_MN, x.shape)
    return jnp.where(kept, x * jnp.asarray(keep.scale, x.dtype), jnp.zeros((), x.dtype))


def random_uint16(key, shape):
  """Uniform integers in [0, 2^16) of `shape` (as uint32), drawn along the last axis."""
  return _along_last_axis(jnp.stack(_draws(key, shape), axis=-1), shape)


def _draws(key, shape):
  """The 16-bit draws for `shape` as n = 4 (Threefry) or 2 arrays [..., ceil(last / n)]:
  draw i along the last axis is element i // n of array i % n."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  *lead, last = shape or (1,)
  if jax.random.key_impl(key) == threefry_prng_impl.name:
    words = _threefry_words(key, (*lead, -(-last // 4)))
  else:
    words = (jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32),)
  return [half for w in words for half in (w & (_LEVELS - 1), w >> DRAW_BITS)]


def _along_last_axis(lanes_MN, shape):
  """[..., M, n] (lane j of `_draws`'s last axis) in draw order along the last axis, cut to
  `shape`."""
  *lead, last = shape or (1,)
  return lanes_MN.reshape(*lead, -1)[..., :last].reshape(shape)


def _threefry_words(key, shape):
  """Both 32-bit outputs of Threefry-2x32 at one counter per element of `shape`: the index
  along the first axis and the element's flat index within the rest (unique while each
  row has < 2^32 elements)."""
  row_axes = range(1, len(shape)) if len(shape) > 1 else range(1)  # what `lo` indexes
  if math.prod(shape[a] for a in row_axes) >= 2 ** 32:
    raise ValueError(f"dropout draws of shape {shape}: rows of 2^32 or more elements")
  iota = lambda axis: jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  hi = iota(0) if len(shape) > 1 else jnp.zeros(shape, jnp.uint32)
  lo = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(row_axes):
    lo = lo + iota(axis) * jnp.uint32(stride)
    stride *= shape[axis]
  k1, k2 = jax.random.key_data(key)
  return tuple(threefry2x32_p.bind(k1, k2, hi, lo))
