"""Per-device memory and collectives of the sharded train step, on 8 fake CPU devices.

  python benchmarks/scaling.py                      # small and medium, four meshes, batch 8
  python benchmarks/scaling.py --models=small --meshes=1x8x1 --batch_size=16

Prints one JSON line per (model, mesh). Nothing runs: each step is lowered and compiled from
abstract shapes (`jax.eval_shape`), so a model larger than this machine's memory is fine.
Conventions:
- model: the paper's OWT setting (configs/owt_bd3lm.py: L = 1024, L' = 16, bf16 compute, fp32
  parameters, AdamW, EMA), V = 50258, dense attention; `--models` picks sizes of configs/base.py.
- mesh: data x fsdp x tensor over 8 CPU devices (`bd3jax.parallel` rules); batch: the global
  batch of one step (grad_accum 1), split over data x fsdp.
- memory: XLA's buffer assignment for ONE device of the compiled step (`memory_analysis()`):
  arguments (state shard + batch shard), outputs, aliased (donated) bytes, temporaries
  (activations, gradients, gathered weights). The CPU backend's fusion decisions differ from
  GPU/TPU ones, and dense attention materialises [B, H, 2L, 2L] scores: treat temp as a
  conservative estimate for accelerators with fused attention.
- collectives: op counts and result bytes per device in the optimised, partitioned HLO of one
  step (static counts: the layers are unrolled, no loops).
- state_bytes: params + EMA + Adam moments over all devices; state_bytes_per_param = 16.
XLA_FLAGS is set here (8 host devices, LLVM optimisation level 0, which shortens compiles and
leaves partitioning and buffer assignment unchanged).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")

import collections  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bd3jax import parallel, train  # noqa: E402
from configs import base, owt_bd3lm  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["small", "medium"], "Model sizes (configs/base.py).")
_MESHES = flags.DEFINE_list("meshes", ["8x1x1", "1x8x1", "1x4x2", "1x2x4"],
                            "Meshes as DATAxFSDPxTENSOR over 8 devices.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch (sequences per step).")
_VOCAB = flags.DEFINE_integer("vocab_size", 50258, "Vocabulary size, [MASK] included.")
_LENGTH = flags.DEFINE_integer("length", 1024, "Sequence length L (block size stays 16).")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(\(.*?\)|\w+\[[\d,]*\]\S*)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict:
  """{op: {"count", "bytes"}} of the collective ops in an HLO module's text."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for result, op, _ in _OP.findall(hlo):
    out[op]["count"] += 1
    out[op]["bytes"] += sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[t]
                            for t, dims in _ARRAY.findall(result) if t in _DTYPE_BYTES)
  return out


def measure(size: str, mesh_shape: tuple[int, int, int], batch_size: int, vocab: int,
            length: int) -> dict:
  config = owt_bd3lm.get_config()
  config.length = length
  config.model = base.model_config(size)
  config.train.batch_size = batch_size
  config.mesh = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, mesh_shape)))
  task = train.Task.from_config(config, vocab, vocab - 1)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch(config, mesh)
  abstract = parallel.abstract_state(task, mesh)
  task = parallel.shard_task(task, abstract)
  sharding = parallel.batch_sharding(mesh, (batch_size, config.length))
  batch = {"tokens": jax.ShapeDtypeStruct((batch_size, config.length), jnp.int32,
                                          sharding=sharding)}
  step = train.jit_train_step(task, parallel.shardings(abstract), sharding)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  sharded = collections.Counter(any(e is not None for e in x.sharding.spec)
                                for x in jax.tree.leaves(abstract.params))
  gib = 2.0 ** 30
  return {
      "benchmark": "scaling", "model": size, "mesh": dict(mesh.shape),
      **common.config_summary(config, batch_size, vocab), **common.device_summary(),
      "params": n_params, "sharded_param_arrays": sharded[True],
      "replicated_param_arrays": sharded[False],
      "state_bytes": state_bytes, "state_bytes_per_param": state_bytes / n_params,
      "per_device": {
          "argument_gib": mem.argument_size_in_bytes / gib,
          "output_gib": mem.output_size_in_bytes / gib,
          "alias_gib": mem.alias_size_in_bytes / gib, "temp_gib": mem.temp_size_in_bytes / gib,
          "total_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib},
      "collectives": collectives(compiled.as_text()),
      "compile_s": compile_s,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for size in _MODELS.value:
    for mesh in _MESHES.value:
      shape = tuple(int(n) for n in mesh.split("x"))
      common.emit(measure(size, shape, _BATCH.value, _VOCAB.value, _LENGTH.value))


if __name__ == "__main__":
  app.run(main)
