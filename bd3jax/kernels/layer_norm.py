"""The residual add, dropout and adaLN-modulated LayerNorm of a block's branch in one Pallas
kernel, forward and backward.

`residual_layer_norm(x, branch, gate, keep, ...)` computes, as `layer_ops.residual_layer_norm`
does with "xla" (its reference),
  x' = x + gate * dropout(branch);  y = LayerNorm(x') * weight * (1 + scale) + shift
and returns (x', y in `out_dtype`, the rows' mean). XLA runs those formulas as two kernels
forward (the add with the statistics, then the normalization, which reads x' back) and three
backward (the LayerNorm's input gradient, the modulation's sums over T, the dropout's and
gate's), each reading float32 [B, T, D] arrays again. Here each direction is one pass:
- forward, one program per `FORWARD_ROWS` rows: x' (written), the statistics (mean, then
  squared deviations, over the rows held in registers) and y;
- backward, one program per `BACKWARD_ROWS` rows of one sequence, `BACKWARD_TILE` at a time:
  the gradients of x (x' 's cotangent plus the LayerNorm's) and of the branch, and the sums over
  the program's rows for the shift, scale, weight and gate gradients (XLA adds the programs').
Rows are read in chunks of D's largest power-of-two divisor up to 256 (Triton's tensors have
power-of-two sizes). `keep` is dropout's packed mask (`dropout.KeepBits.bits`: bit j of byte m
keeps element m * lanes + j) or None. On GPU the kernels lower through Triton; on CPU they run
interpreted.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bd3jax.kernels import platform, sharding
from bd3jax.kernels.block_sparse import call_kernel

LN_EPS = 1e-5
MAX_CHUNK = 256
# Rows a program takes (and in the backward pass, rows at a time) and warps per program. Built
# for sm_90 (benchmarks/kernel_resources.py, bf16, triton 3.9.0), at D = 768 the forward kernel
# takes 92 registers a thread and the backward 128, at D = 1280 126 and 192, none spilling (at
# D = 768 the backward with 4 warps, or with 8 rows at a time, took 255 and spilled).
FORWARD_ROWS, FORWARD_WARPS = 8, 4
BACKWARD_ROWS, BACKWARD_TILE, BACKWARD_WARPS = 64, 4, 8


def residual_layer_norm(x_BTD, branch_BTD, gate_B1D, weight_D, shift_B1D, scale_B1D, *,
                        out_dtype, keep_BTM=None, lanes: int = 4, drop_scale: float = 1.0,
                        interpret: bool | None = None):
  """(x', y, mean [B, T, 1]) as above; x and the results float32 but y (`out_dtype`).

  `gate`, `shift` and `scale` broadcast to [B, 1, D]. Dropout: `keep_BTM`, [B, T, D / lanes]
  uint8 (None: no dropout), and `drop_scale`, what kept elements are multiplied by.
  Differentiable in x, branch, gate, weight, shift and scale. GPU only, or interpreted
  (`interpret`, default on CPU). Under a device mesh each device runs its rows of the batch;
  devices along other mesh axes repeat them. Programs take up to 8 rows forward and 64
  backward and rows in chunks of up to 256, as far as powers of two divide T and D: T or D with
  a small power-of-two factor make small, slow programs.
  """
  b, t, d = x_BTD.shape
  if keep_BTM is not None and keep_BTM.shape != (b, t, d // lanes):
    raise ValueError(f"residual_layer_norm: keep of shape {keep_BTM.shape} does not pack "
                     f"{lanes} elements of [B, T, D] = {list(x_BTD.shape)} per byte")
  if branch_BTD.shape != x_BTD.shape:
    raise ValueError(f"branch of shape {branch_BTD.shape} is not x's {x_BTD.shape}")
  interpret = platform.interpret_by_default() if interpret is None else interpret
  if not interpret and platform.backend() != "gpu":
    raise ValueError(f"model.layer_norm 'pallas' compiles for GPU only (backend is "
                     f"{platform.backend()!r}); use 'xla'")
  row = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32), (b, 1, d))
  cfg = _Config(t, d, forward_rows=_divisor(t, FORWARD_ROWS), rows=_divisor(t, BACKWARD_ROWS),
                tile=_divisor(t, BACKWARD_TILE), lanes=lanes,
                drop_scale=float(drop_scale), out_dtype=jnp.dtype(out_dtype), interpret=interpret)
  x_new, y, mean_BT = _fused(x_BTD.astype(jnp.float32), branch_BTD, row(gate_B1D), keep_BTM,
                             weight_D.astype(jnp.float32), row(shift_B1D), row(scale_B1D), cfg)
  return x_new, y, mean_BT[..., None]


def _divisor(t: int, most: int) -> int:
  """The largest power of two <= `most` that divides t."""
  return min(t & -t, most)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static arguments of the kernels: T, D, rows per program (`forward_rows`; `rows` backward,
  `tile` at a time), dropout's packing and scale."""
  t: int
  d: int
  forward_rows: int
  rows: int
  tile: int
  lanes: int
  drop_scale: float
  out_dtype: jnp.dtype
  interpret: bool


def _chunks(d):
  """The chunks of a row the kernels load at once: D's largest power-of-two divisor <= 256."""
  c = _divisor(d, MAX_CHUNK)
  return [pl.ds(i * c, c) for i in range(d // c)]


def _keep(keep_ref, rows, col, cfg):
  """Dropout's keep mask of one [rows, chunk] tile (bool), or None without dropout."""
  if keep_ref is None:
    return None
  c = col.size
  packed = keep_ref[rows, pl.ds(col.start // cfg.lanes, c // cfg.lanes)]
  shifts = jnp.arange(cfg.lanes, dtype=jnp.uint8)
  return ((packed[:, :, None] >> shifts[None, None, :]) & 1).reshape(packed.shape[0], c) != 0


def _drop(a, keep, cfg):
  """dropout of a float32 tile given its keep mask (None: no dropout)."""
  return a if keep is None else jnp.where(keep, a * jnp.float32(cfg.drop_scale), 0.0)


def _forward_kernel(x_ref, branch_ref, gate_ref, *refs, cfg, dropout):
  keep_ref, refs = (refs[0], refs[1:]) if dropout else (None, refs)
  weight_ref, shift_ref, scale_ref, xn_ref, y_ref, mean_ref, rstd_ref = refs
  rows, cols = pl.ds(0, cfg.forward_rows), _chunks(cfg.d)
  xn = []
  for col in cols:
    keep = _keep(keep_ref, rows, col, cfg)
    xn_c = x_ref[rows, col] + gate_ref[col] * _drop(branch_ref[rows, col].astype(jnp.float32),
                                                     keep, cfg)
    xn_ref[rows, col] = xn_c
    xn.append(xn_c)
  mean = sum(xn_c.sum(axis=1) for xn_c in xn) / cfg.d
  var = sum(jnp.square(xn_c - mean[:, None]).sum(axis=1) for xn_c in xn) / cfg.d
  rstd = jax.lax.rsqrt(var + LN_EPS)
  for col, xn_c in zip(cols, xn):
    gain = weight_ref[col] * (1 + scale_ref[col])
    y_c = (xn_c - mean[:, None]) * rstd[:, None] * gain + shift_ref[col]
    y_ref[rows, col] = y_c.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _backward_kernel(xn_ref, mean_ref, rstd_ref, dy_ref, dxn_ref, dmean_ref, branch_ref, gate_ref,
                     *refs, cfg, dropout):
  keep_ref, refs = (refs[0], refs[1:]) if dropout else (None, refs)
  weight_ref, scale_ref, dx_ref, dbranch_ref, dshift_ref, dyxhat_ref, dgate_ref = refs
  cols, bt = _chunks(cfg.d), cfg.tile
  gain = [weight_ref[col] * (1 + scale_ref[col]) for col in cols]

  def tile(i, sums):
    rows = pl.ds(pl.multiple_of(i * bt, bt), bt)
    mean, rstd = mean_ref[rows], rstd_ref[rows]
    xhat, dy = [], []
    for col in cols:
      xhat.append((xn_ref[rows, col] - mean[:, None]) * rstd[:, None])
      dy.append(dy_ref[rows, col].astype(jnp.float32))
    g = [dy_c * gain_c for dy_c, gain_c in zip(dy, gain)]
    g_mean = sum(g_c.sum(axis=1) for g_c in g) / cfg.d
    gx_mean = sum((g_c * x_c).sum(axis=1) for g_c, x_c in zip(g, xhat)) / cfg.d
    out = []
    for n, col in enumerate(cols):
      dx_c = rstd[:, None] * (g[n] - g_mean[:, None] - xhat[n] * gx_mean[:, None])
      dx_c = dx_c + dxn_ref[rows, col] + dmean_ref[rows][:, None] / cfg.d
      dx_ref[rows, col] = dx_c
      keep = _keep(keep_ref, rows, col, cfg)
      dropped = _drop(branch_ref[rows, col].astype(jnp.float32), keep, cfg)
      dbranch_ref[rows, col] = _drop(dx_c * gate_ref[col], keep, cfg).astype(dbranch_ref.dtype)
      dshift, dyxhat, dgate = sums[3 * n:3 * n + 3]
      out += [dshift + dy[n].sum(axis=0), dyxhat + (dy[n] * xhat[n]).sum(axis=0),
              dgate + (dx_c * dropped).sum(axis=0)]
    return tuple(out)

  zeros = tuple(jnp.zeros((col.size,), jnp.float32) for col in cols for _ in range(3))
  sums = jax.lax.fori_loop(0, cfg.rows // bt, tile, zeros)
  for n, col in enumerate(cols):
    dshift_ref[col], dyxhat_ref[col], dgate_ref[col] = sums[3 * n:3 * n + 3]


_ROW_NAMES = ("batch", None, None)  # logical axes of [B, T, D], [B, 1, D], [B, T, M] operands
_STAT_NAMES = ("batch", None)       # and of [B, T] statistics


def _launch(kernel, name, warps, rows, cfg, args, names, outputs):
  """`kernel` over grid (batch, T / rows) on each device's rows. `args` are the operands, None
  for an absent dropout mask; `names[i]` says what args[i] is: "rows" [B, T, D], "seq" [B, 1, D],
  "keep" [B, T, D / lanes], "stat" [B, T], "weight" [D]; `outputs` (name, dtype) likewise."""
  d = cfg.d
  specs = {"rows": pl.BlockSpec((None, rows, d), lambda b, i: (b, i, 0)),
           "seq": pl.BlockSpec((None, None, d), lambda b, i: (b, 0, 0)),
           "keep": pl.BlockSpec((None, rows, d // cfg.lanes), lambda b, i: (b, i, 0)),
           "stat": pl.BlockSpec((None, rows), lambda b, i: (b, i)),
           "sums": pl.BlockSpec((None, None, d), lambda b, i: (b, i, 0)),
           "weight": pl.BlockSpec((d,), lambda b, i: (0,))}
  logical = {"rows": _ROW_NAMES, "seq": _ROW_NAMES, "keep": _ROW_NAMES, "stat": _STAT_NAMES,
             "sums": _ROW_NAMES, "weight": None}
  given = [(a, n) for a, n in zip(args, names) if a is not None]
  dropout = any(n == "keep" for _, n in given)

  def run(*operands):
    b, programs = operands[0].shape[0], cfg.t // rows
    shapes = {"rows": (b, cfg.t, d), "stat": (b, cfg.t), "sums": (b, programs, d)}
    return call_kernel(
        functools.partial(kernel, cfg=cfg, dropout=dropout), (b, programs),
        [specs[n] for _, n in given], [specs[n] for n, _ in outputs],
        [jax.ShapeDtypeStruct(shapes[n], dtype) for n, dtype in outputs], name,
        num_warps=warps, interpret=cfg.interpret)(*operands)

  return sharding.per_shard(run, [a for a, _ in given], [logical[n] for _, n in given],
                            [logical[n] for n, _ in outputs])


def _forward(x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D, shift_B1D, scale_B1D, cfg):
  """(x', y, mean [B, T], rstd [B, T]) through the forward kernel."""
  f32 = jnp.float32
  return _launch(
      _forward_kernel, "residual_layer_norm_fwd", FORWARD_WARPS, cfg.forward_rows, cfg,
      [x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D, shift_B1D, scale_B1D],
      ["rows", "rows", "seq", "keep", "weight", "seq", "seq"],
      [("rows", f32), ("rows", cfg.out_dtype), ("stat", f32), ("stat", f32)])


def _backward(xn_BTD, mean_BT, rstd_BT, dy_BTD, dxn_BTD, dmean_BT, branch_BTD, gate_B1D, keep_BTM,
              weight_D, scale_B1D, cfg):
  """(dx, dbranch, and the sums over each program's rows of dy, dy * x̂ and dx * dropout(branch),
  each [B, T / rows, D]) through the backward kernel."""
  f32 = jnp.float32
  return _launch(
      _backward_kernel, "residual_layer_norm_bwd", BACKWARD_WARPS, cfg.rows, cfg,
      [xn_BTD, mean_BT, rstd_BT, dy_BTD, dxn_BTD, dmean_BT, branch_BTD, gate_B1D, keep_BTM,
       weight_D, scale_B1D],
      ["rows", "stat", "stat", "rows", "rows", "stat", "rows", "seq", "keep", "weight", "seq"],
      [("rows", f32), ("rows", branch_BTD.dtype), ("sums", f32), ("sums", f32), ("sums", f32)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D, shift_B1D, scale_B1D, cfg):
  return _forward(x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D, shift_B1D, scale_B1D, cfg)[:3]


def _fused_fwd(x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D, shift_B1D, scale_B1D, cfg):
  xn_BTD, y_BTD, mean_BT, rstd_BT = _forward(x_BTD, branch_BTD, gate_B1D, keep_BTM, weight_D,
                                             shift_B1D, scale_B1D, cfg)
  residuals = (xn_BTD, mean_BT, rstd_BT, branch_BTD, gate_B1D, keep_BTM, weight_D, scale_B1D)
  return (xn_BTD, y_BTD, mean_BT), residuals


def _fused_bwd(cfg, residuals, cotangents):
  xn_BTD, mean_BT, rstd_BT, branch_BTD, gate_B1D, keep_BTM, weight_D, scale_B1D = residuals
  dxn_BTD, dy_BTD, dmean_BT = cotangents
  dx_BTD, dbranch_BTD, dshift_BND, dyxhat_BND, dgate_BND = _backward(
      xn_BTD, mean_BT, rstd_BT, dy_BTD, dxn_BTD, dmean_BT, branch_BTD, gate_B1D, keep_BTM,
      weight_D, scale_B1D, cfg)
  dyxhat_B1D = dyxhat_BND.sum(1, keepdims=True)
  dweight_D = (dyxhat_B1D * (1 + scale_B1D)).sum((0, 1))
  return (dx_BTD, dbranch_BTD, dgate_BND.sum(1, keepdims=True), None, dweight_D,
          dshift_BND.sum(1, keepdims=True), dyxhat_B1D * weight_D)


_fused.defvjp(_fused_fwd, _fused_bwd)
