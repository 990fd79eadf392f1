"""Bytes each kernel of the compiled train step reads and writes, by part of the step.

  python benchmarks/hlo_traffic.py                      # for this machine's default backend
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
      python benchmarks/hlo_traffic.py --target=h100 --config.model.attention=pallas

A static count, not a timing: it shows what XLA's fusions move through memory, e.g. to compare
two versions of the model without a GPU. `--target=h100` compiles for one H100 without any
GPU present (XLA's deviceless compilation): it needs the CUDA plugin (`pip install
"jax[cuda13]"`, matching jax's version) and, on a machine without a CUDA driver,
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 so that the plugin loads. GEMM autotuning is skipped there.

Prints one JSON line: per kind of kernel and per part of the step (trace_summary.source of the
kernel's op metadata; GEMMs and Pallas kernels apart) the kernel count and GB moved. A kernel
moves its operands' bytes plus its results'; a fusion operand read only through slices counts
the slices. Operands read in part otherwise (gathers, broadcasts in a loop, Pallas kernels' block
specs: the attention kernels read only v of the packed projection, and the dk/dv kernel writes
two of the three slots of its aliased d qkv) count whole, so the figures are upper bounds of
what each kernel must move. A conditional counts as one kernel reading its operands and
writing its results; the kernels of its branches are not counted.
"""

import collections
import contextlib
import os
import re
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common, trace_summary  # noqa: E402
from bd3jax import train  # noqa: E402
from bd3jax.kernels import platform  # noqa: E402

# XLA's GpuTargetConfig for an H100 SXM (80 GB, HBM3), as its device query reports it.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100_TARGET}

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.ROOT, "configs", "base.py"),
    "Config file; override fields with --config.KEY=VALUE.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 50258, "Vocabulary size, [MASK] included.")
_TARGET = flags.DEFINE_enum("target", None, list(TARGETS),
                            "Compile for this GPU without one (default: this machine).")
_TOP = flags.DEFINE_integer("top", 30, "Parts of the step listed, largest first.")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def nbytes(type_text: str) -> int:
  """Bytes of every array in an HLO type, tuples included: "(f32[2,3], pred[4])" -> 28."""
  return sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in _ARRAY.findall(type_text))


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
  """Computation name -> its instructions (name, type, opcode, rest of line); the entry's name."""
  computations, body, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if header and line.rstrip().endswith("{"):
      body = computations.setdefault(header[2], [])
      entry = header[2] if header[1] else entry
    elif line.startswith("}"):
      body = None
    elif body is not None and (match := _INSTRUCTION.match(line)):
      body.append(match.groups())
  return computations, entry


def _operands(rest: str) -> list[str]:
  return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _fusion_reads(body, operand_bytes: list[int]) -> int:
  """Bytes a fusion reads: each parameter whole, or its slices where only slices use it."""
  total = 0
  for name, _, opcode, rest in body:
    if opcode != "parameter":
      continue
    index = int(re.match(r"(\d+)\)", rest)[1])
    users = [(t, op) for _, t, op, r in body if name in _operands(r) and op != "parameter"]
    sliced = users and all(op in ("slice", "dynamic-slice") for _, op in users)
    total += sum(nbytes(t) for t, _ in users) if sliced else operand_bytes[index]
  return total


def kernels(hlo_text: str) -> list[dict]:
  """The entry computation's kernels in order: name, kind, source, bytes read and written.

  kind: "gemm" (cuBLAS calls), "pallas" (Triton or Mosaic custom calls), a fusion's kind
  ("kLoop", "kInput", "kCustom", ...), else the opcode."""
  computations, entry = _computations(hlo_text)
  types, out = {}, []
  sources = trace_summary.hlo_sources(hlo_text)
  for name, type_text, opcode, rest in computations[entry]:
    types[name] = type_text
    if opcode in _NO_KERNEL:
      continue
    operand_bytes = [nbytes(types.get(o, "")) for o in _operands(rest)]
    read, kind = sum(operand_bytes), opcode
    if opcode == "fusion":
      kind = re.search(r"kind=(\w+)", rest)[1]
      read = _fusion_reads(computations[re.search(r"calls=%([\w.\-]+)", rest)[1]], operand_bytes)
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)[1]
      kind = "gemm" if "cublas" in target else "pallas" if re.search(
          "triton|mosaic", target) else target
    out.append({"name": name, "kind": kind, "source": sources.get(name, "(top level)"),
                "read": read, "written": nbytes(type_text)})
  return out


def summarize(kernel_list: list[dict], top: int) -> dict:
  """GB moved and kernel counts per kind, and per source for kernels other than GEMMs and
  Pallas calls (the elementwise and reduction work around them), the `top` largest."""
  def table(key, rows):
    count, moved = collections.Counter(), collections.Counter()
    for k in rows:
      count[k[key]] += 1
      moved[k[key]] += k["read"] + k["written"]
    return [{key: name, "count": count[name], "gb": moved[name] / 1e9}
            for name, _ in moved.most_common(top)]
  other = [k for k in kernel_list if k["kind"] not in ("gemm", "pallas")]
  gb = lambda rows: sum(k["read"] + k["written"] for k in rows) / 1e9
  return {"kernels": len(kernel_list), "gb": gb(kernel_list), "other_gb": gb(other),
          "kinds": table("kind", kernel_list), "sources": table("source", other)}


def compiled_step_text(config, batch_size: int, vocab: int, target: str | None) -> str:
  """The optimized HLO of `train.jit_train_step` for `config` (abstract inputs, nothing run)."""
  config.train.batch_size = batch_size
  task = train.Task.from_config(config, vocab, vocab - 1)
  state = jax.eval_shape(lambda k: train.init_state(task, task.init_params(k)), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((batch_size, config.length), np.int32)
  args, context = (state, {"tokens": tokens}), contextlib.nullcontext()
  if target:
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                            topology="1x1x1")
    replicated = NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), P())
    args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        args)
    # The kernels choose how to lower from the default backend (here a CPU): make it a GPU's.
    context = mock.patch.object(platform, "backend", lambda: "gpu")
  with context:
    return train.jit_train_step(task).lower(*args).compile().as_text()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  text = compiled_step_text(config, _BATCH.value, _VOCAB.value, _TARGET.value)
  common.emit({"benchmark": "hlo_traffic", "target": _TARGET.value or jax.default_backend(),
               **common.config_summary(config, _BATCH.value, _VOCAB.value),
               **summarize(kernels(text), _TOP.value)})


if __name__ == "__main__":
  app.run(main)
