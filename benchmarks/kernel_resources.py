"""Registers, spills and shared memory of the Pallas kernels built for a GPU, on any host.

  pip install triton      # not a bd3jax dependency; brings its own ptxas and cuobjdump
  python benchmarks/kernel_resources.py                    # head dim 64/128, bf16/f32, sm_90
  python benchmarks/kernel_resources.py --tiles=64x64,128x64 --num_warps=4,8 --dtypes=bfloat16

For each (head dim, dtype, tiles, warps) the forward, dq and dk/dv kernels are lowered to Triton
IR for CUDA exactly as `jax.jit` would on a GPU (`block_sparse_attention` at batch 1, one head,
the training mask of `--length`/`--block_size`), for each (head dim, dtype) those of the
training step's `packed_attention` (default launches: "packed_fwd", ...), for each (head dim,
dtype, warps) the sampler's KV-cache kernel (`kernels/decode.py`: `--block_size` queries over a
cache of `--length` slots, default tiles), and for each dtype the fused residual LayerNorm's
forward and backward kernels (`kernels/layer_norm.py`, with dropout, over 2L rows of
`--d_model`, the branch in that dtype); each is compiled to a cubin for `--sm` by the `triton`
package and described by cuobjdump's resource usage and SASS. One JSON line each:
registers per thread, stack_bytes and local_bytes (register spills: anything above 0 costs
memory traffic in the inner loop), shared_bytes (Triton's dynamic shared memory; 227 KiB is an
sm_90 block's limit), sass_instructions (the kernel's static instruction count) and
sass_ex2 (its MUFU.EX2, the hardware exponentials). No GPU is needed or used. The numbers are
those of the pip Triton, which can differ a little from the Triton inside jaxlib that compiles
the kernels for real.
"""

import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import export  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402

from benchmarks import common  # noqa: E402
from bd3jax.kernels import block_sparse, decode, layer_norm, platform  # noqa: E402
from bd3jax.masks import AttentionMask, MaskKind  # noqa: E402
from bd3jax.model.transformer import positions_for  # noqa: E402
from bd3jax.rotary import rotary_cos_sin  # noqa: E402

_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions K.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "q, k, v dtypes.")
_TILES = flags.DEFINE_list("tiles", ["64x64", "128x64", "64x32"], "block_q x block_k tiles.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4", "8"],
                               "Warps per program; 'default': default_num_warps.")
_LENGTH = flags.DEFINE_integer("length", 1024, "L; the kernels run over 2L tokens.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 16, "L'.")
_SM = flags.DEFINE_integer("sm", 90, "Compute capability to build for (90: H100/H200).")
_D_MODEL = flags.DEFINE_integer("d_model", 768, "D of the fused residual LayerNorm's rows.")

KERNELS = ("fwd", "dq", "dkv")
USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
# A SASS line: /*offset*/, an optional predicate (@P0, @!UPT), the opcode (e.g. MUFU.EX2).
SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                              re.M)


def lowered_triton(fn, *args) -> list[str]:
  """Triton IR text of every Pallas kernel in `jax.jit(fn)(*args)`, lowered for CUDA here."""
  modules = []
  lower = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with mock.patch.object(triton_lowering, "lower_jaxpr_to_triton_module", capture), \
       mock.patch.object(platform, "backend", lambda: "gpu"):
    export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=unchecked)(*args)
  return modules


def triton_modules(mask, head_dim, dtype, block_q, block_k, num_warps) -> list[str]:
  """Triton IR text of the forward, dq and dk/dv kernels."""
  x = jax.ShapeDtypeStruct((1, mask.num_tokens, 1, head_dim), dtype)
  attend = lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, mask, block_q=block_q, block_k=block_k, num_warps=num_warps, interpret=False)
  return _attention_kernels(lowered_triton(lambda q, k, v: jax.vjp(attend, q, k, v)[1](q),
                                           x, x, x))


def _attention_kernels(modules: list[str]) -> list[str]:
  """`modules`, checked to be the forward, dq and dk/dv kernels' (`KERNELS`)."""
  if len(modules) != len(KERNELS):
    raise RuntimeError(f"expected {len(KERNELS)} Triton kernels, lowered {len(modules)}")
  return modules


def packed_modules(mask, head_dim, dtype, queries: int | None = None) -> list[str]:
  """Triton IR text of the forward, dq and dk/dv kernels of `block_sparse.packed_attention`
  (the training step's path: v read from the packed projection, the rotary's backward in the
  backward kernels) for the first `queries` queries (default all), default launches."""
  qkv = jax.ShapeDtypeStruct((1, mask.num_tokens, 3, 1, head_dim), dtype)
  cos, sin = rotary_cos_sin(positions_for(mask), head_dim)
  attend = lambda qkv: block_sparse.packed_attention(qkv, cos, sin, mask, queries,
                                                     interpret=False)

  def forward_and_backward(qkv):
    o, vjp = jax.vjp(attend, qkv)
    return vjp(o)
  return _attention_kernels(lowered_triton(forward_and_backward, qkv))


def decode_module(queries: int, slots: int, head_dim, dtype, num_warps):
  """(Triton IR text, DecodeConfig) of the KV-cache kernel: `queries` tokens over `slots`."""
  q = jax.ShapeDtypeStruct((1, queries, 1, head_dim), dtype)
  cache = jax.ShapeDtypeStruct((1, 1, slots, head_dim), dtype)
  attend = lambda q, k, v, end: decode.cache_attention(q, k, v, end, num_warps=num_warps,
                                                       interpret=False)
  [module] = lowered_triton(attend, q, cache, cache, jax.ShapeDtypeStruct((), jnp.int32))
  # The tiles do not depend on interpret; interpret=True skips the GPU-backend check.
  return module, decode.decode_config(q, cache, cache, num_warps=num_warps, interpret=True)


def layer_norm_modules(tokens: int, d_model: int, dtype) -> list[str]:
  """Triton IR text of the fused residual LayerNorm's forward and backward kernels, with
  dropout, over `tokens` rows of `d_model` (branch and output in `dtype`)."""
  x = jax.ShapeDtypeStruct((1, tokens, d_model), jnp.float32)
  branch = jax.ShapeDtypeStruct((1, tokens, d_model), dtype)
  row = jax.ShapeDtypeStruct((1, 1, d_model), jnp.float32)
  weight = jax.ShapeDtypeStruct((d_model,), jnp.float32)
  keep = jax.ShapeDtypeStruct((1, tokens, d_model // 4), jnp.uint8)

  def forward_and_backward(x, branch, gate, keep, weight, shift, scale):
    fused = lambda x, branch, gate, weight, shift, scale: layer_norm.residual_layer_norm(
        x, branch, gate, weight, shift, scale, out_dtype=dtype, keep_BTM=keep, drop_scale=1.1,
        interpret=False)
    out, vjp = jax.vjp(fused, x, branch, gate, weight, shift, scale)
    return vjp(out)
  modules = lowered_triton(forward_and_backward, x, branch, row, keep, weight, row, row)
  if len(modules) != 2:
    raise RuntimeError(f"expected the forward and backward kernels, lowered {len(modules)}")
  return modules


def resources(triton, module: str, sm: int, num_warps: int) -> dict:
  """Registers, spills and shared memory of one Triton IR module built for `sm`."""
  from triton.backends.compiler import GPUTarget
  with tempfile.TemporaryDirectory() as tmp:
    ttir, cubin = os.path.join(tmp, "kernel.ttir"), os.path.join(tmp, "kernel.cubin")
    with open(ttir, "w") as f:
      f.write(module)
    kernel = triton.compile(ttir, target=GPUTarget("cuda", sm, 32), options=dict(
        num_warps=num_warps, num_stages=block_sparse.NUM_STAGES))
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    dump = lambda option: subprocess.run([cuobjdump, option, cubin], check=True,
                                         capture_output=True, text=True).stdout
    usage, instructions = dump("--dump-resource-usage"), SASS_INSTRUCTION.findall(dump("-sass"))
  registers, stack, local = map(int, USAGE.search(usage).groups())
  return {"registers": registers, "stack_bytes": stack, "local_bytes": local,
          "shared_bytes": kernel.metadata.shared, "sass_instructions": len(instructions),
          "sass_ex2": instructions.count("MUFU.EX2")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
  try:
    import triton
  except ImportError as e:
    raise app.UsageError("benchmarks/kernel_resources.py needs the triton package "
                         "(pip install triton)") from e
  mask = AttentionMask(MaskKind.TRAINING, _LENGTH.value, _BLOCK_SIZE.value)
  emit = lambda kernel, module, **fields: common.emit({
      "benchmark": "kernel_resources", "kernel": kernel, "sm": _SM.value, **fields,
      "num_stages": block_sparse.NUM_STAGES, "triton": triton.__version__,
      **resources(triton, module, _SM.value, fields["num_warps"])})
  for head_dim in map(int, _HEAD_DIMS.value):
    for dtype in _DTYPES.value:
      warp_counts = [block_sparse.default_num_warps(head_dim, dtype) if warps == "default"
                     else int(warps) for warps in _NUM_WARPS.value]
      for tile in _TILES.value:
        block_q, block_k = map(int, tile.split("x"))
        for warps in warp_counts:
          modules = triton_modules(mask, head_dim, jnp.dtype(dtype), block_q, block_k, warps)
          for kernel, module in zip(KERNELS, modules):
            emit(kernel, module, head_dim=head_dim, dtype=dtype, block_q=block_q,
                 block_k=block_k, num_warps=warps)
      warps = block_sparse.default_num_warps(head_dim, dtype)
      for kernel, module in zip(KERNELS, packed_modules(mask, head_dim, jnp.dtype(dtype))):
        emit(f"packed_{kernel}", module, head_dim=head_dim, dtype=dtype,
             block_q=block_sparse.BLOCK_Q, block_k=block_sparse.BLOCK_K, num_warps=warps)
      for warps in warp_counts:
        module, cfg = decode_module(_BLOCK_SIZE.value, _LENGTH.value, head_dim, jnp.dtype(dtype),
                                    warps)
        emit("decode", module, head_dim=head_dim, dtype=dtype, block_q=cfg.block_q,
             block_k=cfg.block_k, num_warps=warps)
  for dtype in _DTYPES.value:
    modules = layer_norm_modules(2 * _LENGTH.value, _D_MODEL.value, jnp.dtype(dtype))
    for kernel, module, warps in zip(("layer_norm_fwd", "layer_norm_bwd"), modules,
                                     (layer_norm.FORWARD_WARPS, layer_norm.BACKWARD_WARPS)):
      emit(kernel, module, d_model=_D_MODEL.value, dtype=dtype, num_warps=warps)


if __name__ == "__main__":
  app.run(main)
