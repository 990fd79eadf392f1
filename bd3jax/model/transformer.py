"""The reference BD3-LM network (a DiT with rotary attention), in Flax Linen.

Parameters are float32 and carry logical axis names; matmuls run in `dtype`; the
residual stream, LayerNorms and softmax stay in float32, as in the reference under
autocast. Module and parameter names follow the reference's state dict. `DiT.decode` runs the
same parameters on a few tokens against a KV cache (the "cache" collection), for sampling.
"""

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model.attention import cache_attention, qkv_attention, update_kv_cache
from bd3jax.model.dropout import KeepBits, keep_bits
from bd3jax.model.layer_ops import gelu_tanh, linear, modulated_layer_norm, residual_layer_norm
from bd3jax.rotary import rotary_cos_sin, rotary_qkv

TIMESTEP_DIM = 256


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Network hyperparameters. `adaln=False` is the AR variant (no conditioning at all)."""
  vocab_size: int
  n_layers: int
  d_model: int
  n_heads: int
  cond_dim: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  adaln: bool = True
  time_conditioning: bool = False
  dtype: str = "float32"
  attention: str = "dense"
  layer_norm: str = "xla"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def _torch_linear_init(fan_in: int):
  """torch.nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features, names, fan_in, *, use_bias=True, zero=False, axis=-1, dtype, name):
  init = nn.initializers.zeros_init() if zero else _torch_linear_init(fan_in)
  n_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(
      features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(init, names),
      bias_init=nn.with_logical_partitioning(init, names[n_in:]),
      name=name)


class Residual(NamedTuple):
  """A residual branch not yet added to the stream: x + gate * dropout(branch), added by the
  next LayerNorm (in one kernel with it where `ModelConfig.layer_norm` says so)."""
  gate_B1D: jax.Array | float
  branch_BTD: jax.Array
  dropout_mask: KeepBits | None


class LayerNorm(nn.Module):
  """Weight-only LayerNorm computed in float32 (eps 1e-5), then adaLN's modulation if given.

  Given a `Residual`, adds it to x first (`layer_ops.residual_layer_norm`). Returns the stream
  x, the normalized rows in `cfg.dtype` and the rows' mean, which centers the next
  LayerNorm's statistics (`layer_ops`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, shift_B1D=None, scale_B1D=None, center_BT1=None,
               residual: Residual | None = None):
    ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
    weight_D = self.param("weight", ones, (x_BTD.shape[-1],), jnp.float32)
    dtype = jnp.dtype(self.cfg.dtype)
    if residual is None:
      y_BTD, mean_BT1 = modulated_layer_norm(x_BTD, weight_D, shift_B1D, scale_B1D, center_BT1)
      return x_BTD, y_BTD.astype(dtype), mean_BT1
    return residual_layer_norm(x_BTD, residual.branch_BTD, residual.gate_B1D, residual.dropout_mask,
                               weight_D, shift_B1D, scale_B1D, center_BT1, out_dtype=dtype,
                               implementation=self.cfg.layer_norm)


def timestep_embedding(sigma_B, dim: int = TIMESTEP_DIM, max_period: float = 10_000.0):
  """[cos(sigma f), sin(sigma f)] with f_i = exp(-ln(max_period) i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BF = sigma_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)


@dataclasses.dataclass(frozen=True)
class DecodeAt:
  """Decoding against a KV cache: the T input tokens sit at absolute positions start..start+T-1.

  Passed in place of the mask. Each block writes the tokens' keys (after rotary) and values
  into its "cache" collection at ring slots (start + i) mod S, then the tokens attend to every
  slot that holds one of the last min(start + T, S) positions: the cached prefix and the tokens
  themselves, bidirectionally. `start` may be traced; (start mod S) + T must not exceed S.
  With `select` ([B] indices), only token select[b] of each row is projected to logits
  (`selected_rows_head`).
  """
  start: jax.Array | int
  select: jax.Array | None = None


def init_cache(cfg: ModelConfig, batch: int, size: int) -> dict:
  """An empty KV cache of `size` slots: {"blocks_i": {"key", "value": [B, H, S, K]}}."""
  shape = (batch, cfg.n_heads, size, cfg.head_dim)
  return {f"blocks_{i}": {"key": jnp.zeros(shape, cfg.dtype), "value": jnp.zeros(shape, cfg.dtype)}
          for i in range(cfg.n_layers)}


_MATMUL_LAYERS = ("attn_qkv", "attn_out", "mlp_0", "mlp_2")  # a Block's layers run in cfg.dtype


def inference_params(cfg: ModelConfig, params):
  """`params` with the weights that only feed `cfg.dtype` matmuls (the blocks' attention and MLP
  layers, the output projection) cast to that dtype: every output stays the same bit for bit.

  For a loop that applies the network many times (the sampler): the cast happens once instead
  of on every pass, which then reads half the weight bytes in bfloat16.
  """
  dtype = jnp.dtype(cfg.dtype)

  def cast(path, leaf):  # path: (outer module, layer, parameter) of an unboxed leaf
    names = [getattr(key, "key", None) for key in path]
    in_matmul = len(names) == 3 and (
        (str(names[0]).startswith("blocks_") and names[1] in _MATMUL_LAYERS) or
        names[:2] == ["output_layer", "linear"])
    return leaf.astype(dtype) if in_matmul else leaf
  return jax.tree_util.tree_map_with_path(cast, nn.unbox(params))


class TimestepEmbedder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, sigma_B):
    cond = self.cfg.cond_dim
    h = _dense(cond, ("timestep", "cond"), TIMESTEP_DIM, dtype=jnp.float32, name="mlp_0")(
        timestep_embedding(sigma_B))
    return _dense(cond, ("cond_in", "cond"), cond, dtype=jnp.float32, name="mlp_2")(nn.silu(h))


class Block(nn.Module):
  """One transformer block: attention and MLP branches, adaLN-zero modulated.

  With `keep`, only the first `keep` tokens go on after the keys and values: their queries
  alone attend and only their outputs are returned (the training pass's last block, whose x_0
  half nothing reads). `residual`, the previous block's MLP branch, joins x in norm1. Returns
  the stream before this block's own MLP branch, that branch (a `Residual`, for the next
  LayerNorm to add) and the rows' mean before it (norm2's); the next block passes the mean
  back as `center_BT1`, near its input rows' mean, so that its first LayerNorm's statistics
  take one pass (`layer_ops.modulated_layer_norm`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, c_BC, rope, mask: AttentionMask, train: bool,
               keep: int | None = None, center_BT1=None, residual: Residual | None = None):
    cfg = self.cfg
    d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
    dt = jnp.dtype(cfg.dtype)
    if cfg.adaln:
      mod_B6D = _dense(6 * d, ("cond", "modulation"), cfg.cond_dim, zero=True, dtype=jnp.float32,
                       name="adaLN_modulation")(c_BC)
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
          mod_B6D[:, None, :], 6, axis=-1)
    else:
      shift_msa = scale_msa = shift_mlp = scale_mlp = None
      gate_msa = gate_mlp = 1.0
    dropout_mask = lambda x: (keep_bits(self.make_rng("dropout"), x.shape, cfg.dropout)
                              if train and cfg.dropout > 0 else None)

    x_BTD, h_BTD, mean_BT1 = LayerNorm(cfg, name="norm1")(x_BTD, shift_msa, scale_msa, center_BT1,
                                                         residual)
    qkv_BT3HK = _dense((3, h, k), ("embed", "qkv", "heads", "head_dim"), d, use_bias=False,
                       dtype=dt, name="attn_qkv")(h_BTD)
    cos_TK, sin_TK = rope
    if isinstance(mask, DecodeAt):
      o_BQHK = self._attend_with_cache(*rotary_qkv(qkv_BT3HK, cos_TK, sin_TK), mask.start)
    else:  # the first Q = keep (default: all T) tokens' queries
      o_BQHK = qkv_attention(qkv_BT3HK, cos_TK, sin_TK, mask, cfg.attention, keep)
    o_BTD = _dense(d, ("heads", "head_dim", "embed"), d, use_bias=False, axis=(-2, -1), dtype=dt,
                   name="attn_out")(o_BQHK)

    x_BTD, h_BTD, mean_BT1 = LayerNorm(cfg, name="norm2")(
        x_BTD[:, :keep], shift_mlp, scale_mlp, mean_BT1[:, :keep],
        Residual(gate_msa, o_BTD, dropout_mask(o_BTD)))
    h_BTF = _dense(cfg.mlp_ratio * d, ("embed", "mlp"), d, dtype=dt, name="mlp_0")(h_BTD)
    h_BTF = gelu_tanh(h_BTF)
    h_BTD = _dense(d, ("mlp", "embed"), cfg.mlp_ratio * d, dtype=dt, name="mlp_2")(h_BTF)
    return x_BTD, Residual(gate_mlp, h_BTD, dropout_mask(h_BTD)), mean_BT1

  def _attend_with_cache(self, q_BTHK, k_BTHK, v_BTHK, start):
    """Writes the tokens' keys and values into this layer's cache, then attends over it."""
    if not self.has_variable("cache", "key"):
      raise ValueError("decoding needs a KV cache: apply with {'cache': init_cache(...)} and "
                       "mutable=['cache']")
    k_BHSK = update_kv_cache(self.get_variable("cache", "key"), k_BTHK, start)
    v_BHSK = update_kv_cache(self.get_variable("cache", "value"), v_BTHK, start)
    self.put_variable("cache", "key", k_BHSK)
    self.put_variable("cache", "value", v_BHSK)
    return cache_attention(q_BTHK, k_BHSK, v_BHSK, start + q_BTHK.shape[1], self.cfg.attention)


def selected_rows_head(select_B):
  """A head (see `DiT`) projecting token select_B[b] of each row b: logits [B, 1, V]."""
  return lambda x_BTD, kernel_DV, bias_V: linear(
      jnp.take_along_axis(x_BTD, select_B[:, None, None], axis=1), kernel_DV, bias_V)


class FinalLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, c_BC, center_BT1=None, head=None, residual: Residual | None = None):
    cfg = self.cfg
    shift = scale = None
    if cfg.adaln:
      mod_B2D = _dense(2 * cfg.d_model, ("cond", "modulation"), cfg.cond_dim, zero=True,
                       dtype=jnp.float32, name="adaLN_modulation")(c_BC)
      shift, scale = jnp.split(mod_B2D[:, None, :], 2, axis=-1)
    _, x_BTD, _ = LayerNorm(cfg, name="norm_final")(x_BTD, shift, scale, center_BT1, residual)
    return OutputLinear(cfg, name="linear")(x_BTD, head).astype(jnp.float32)


class OutputLinear(nn.Module):
  """The logits' projection: `nn.Dense`'s parameters (zero-initialized) and values, run in
  `cfg.dtype` through `layer_ops.linear`, or through `head` (see `DiT`)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, head=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    zeros = nn.initializers.zeros_init()
    kernel_DV = self.param("kernel", nn.with_logical_partitioning(zeros, ("embed", "vocab")),
                           (cfg.d_model, cfg.vocab_size), jnp.float32)
    bias_V = self.param("bias", nn.with_logical_partitioning(zeros, ("vocab",)),
                        (cfg.vocab_size,), jnp.float32)
    return (head or linear)(x_BTD.astype(dtype), kernel_DV.astype(dtype), bias_V.astype(dtype))


def positions_for(mask: AttentionMask):
  """Rotary positions: 0..L-1 on both halves of the training sequence, else 0..T-1."""
  positions_L = jnp.arange(mask.seq_len)
  if mask.kind is MaskKind.TRAINING:
    return jnp.concatenate([positions_L, positions_L])
  return positions_L


class DiT(nn.Module):
  """The BD3-LM backbone. Returns float32 logits for the x_t half (training) or all tokens.

  `sigma_B` is the noise level per sequence, used only with time conditioning (None: zeros).
  With a `DecodeAt` in place of the mask it decodes against the "cache" collection (`decode`).
  `head(x, kernel, bias)`, if given, replaces the output projection and its result is
  returned: it gets the final LayerNorm's output [B, T, D] and the projection's kernel [D, V]
  and bias [V], all in `cfg.dtype` (e.g. `diffusion.masked_log_prob_head`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, sigma_B, mask: AttentionMask | DecodeAt,
               train: bool = False, head=None):
    cfg = self.cfg
    decoding = isinstance(mask, DecodeAt)
    if not decoding and tokens_BT.shape[1] != mask.num_tokens:
      raise ValueError(f"{tokens_BT.shape[1]} tokens given for a {mask.kind.value} mask of "
                       f"{mask.num_tokens} tokens")
    if decoding and mask.select is not None:
      if head is not None:
        raise ValueError("DecodeAt.select and head both replace the output projection; pass one")
      head = selected_rows_head(mask.select)
    embedding_VD = self.param(  # kaiming_uniform(a=sqrt(5)) on [V, d]: U(+-1/sqrt(d))
        "vocab_embed", nn.with_logical_partitioning(_torch_linear_init(cfg.d_model), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
    c_BC = None
    if cfg.adaln:
      if sigma_B is None or not cfg.time_conditioning:
        sigma_B = jnp.zeros((tokens_BT.shape[0],), jnp.float32)
      c_BC = nn.silu(TimestepEmbedder(cfg, name="sigma_map")(sigma_B))
    if decoding:
      positions_T = mask.start + jnp.arange(tokens_BT.shape[1])
    else:
      positions_T = positions_for(mask)
    rope = rotary_cos_sin(positions_T, cfg.head_dim)
    x_t_only = not decoding and mask.kind is MaskKind.TRAINING  # the logits cover x_t alone
    center_BT1 = residual = None
    for i in range(cfg.n_layers):
      keep = mask.seq_len if x_t_only and i == cfg.n_layers - 1 else None
      x_BTD, residual, center_BT1 = Block(cfg, name=f"blocks_{i}")(
          x_BTD, c_BC, rope, mask, train, keep, center_BT1, residual)
    return FinalLayer(cfg, name="output_layer")(x_BTD, c_BC, center_BT1, head, residual)

  def decode(self, tokens_BT, sigma_B, start, select_B=None):
    """Logits [B, T, V] of T tokens at absolute positions start.. (see `DecodeAt`); with
    `select_B`, [B, 1, V] of token select_B[b] of each row.

    Use as `model.apply({"params": p, "cache": cache}, tokens, sigma, start,
    method=DiT.decode, mutable=["cache"])`, which also returns the updated cache.
    """
    return self(tokens_BT, sigma_B, DecodeAt(start, select_B))
