"""Scale-out: the device mesh, shardings and multi-host start-up.

Mesh axes (`config.mesh`):
- `data`: data parallelism, parameters replicated;
- `fsdp`: data parallelism with parameters, gradients and optimiser state sharded (ZeRO-3);
- `tensor`: Megatron-style tensor parallelism over attention heads, MLP units and vocabulary.
The batch is split over data x fsdp. Every parameter carries logical axis names (see
`Task.param_axes`); `logical_axes.LOGICAL_RULES` maps them onto the mesh. The state is created
directly in its shards (`jax.jit(init, out_shardings=...)`), so no device ever holds the whole
model; for the forward and backward passes the weights are gathered over `fsdp` (`shard_task`).
"""

import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bd3jax import train
from bd3jax.config import ConfigError
from bd3jax.logical_axes import MESH_AXES, logical_to_mesh_spec


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for `num_devices`, resolving the one -1 ("the rest")."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  for axis, size in sizes.items():
    if size < 1 and size != -1:
      raise ConfigError(f"mesh.{axis} {size} must be a positive size or -1 (the rest of the "
                        "devices)")
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f"mesh.{' and mesh.'.join(rest)} are both -1; at most one axis may take "
                      "the rest of the devices")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  product = " x ".join(f"mesh.{a} {s}" for a, s in sizes.items() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(f"{product} = {fixed} does not divide the {num_devices} devices; "
                        f"mesh.{rest[0]}=-1 needs a divisor of {num_devices}")
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"{product} = {fixed} devices, but there are {num_devices}; make the "
                      "product match, or set one axis to -1")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all of them).

  On multi-slice TPUs `mesh.dcn_data` / `mesh.dcn_fsdp` say how many slices the data / fsdp
  axis spans: those axes cross the slower data-centre network, the rest stays within a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = (int(mesh_cfg.get("dcn_data", 1)), int(mesh_cfg.get("dcn_fsdp", 1)), 1)
  # Auto axes: the model annotates only its parameters, so XLA's sharding propagation chooses
  # the activations' layouts from the parameter and batch shardings pinned at the jit
  # boundary. Explicit axes would need a sharding rule on every activation op.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if math.prod(dcn) != n_slices:
    raise ConfigError(f"the devices span {n_slices} slice(s) but mesh.dcn_data x mesh.dcn_fsdp = "
                      f"{math.prod(dcn)}; make the product equal the number of slices")
  if n_slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  for axis, size, n in zip(MESH_AXES, shape, dcn):
    if size % n:
      raise ConfigError(f"mesh.dcn_{axis} {n} does not divide mesh.{axis} {size}")
  from jax.experimental import mesh_utils
  ici = tuple(size // n for size, n in zip(shape, dcn))
  return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES,
              axis_types=axis_types)


def _state_logical_axes(task: train.Task, abstract_params):
  """Logical names of every TrainState leaf: params, EMA and Adam moments share the params'."""
  boxed = jax.tree.map(lambda spec, x: nn.LogicallyPartitioned(x, tuple(spec)),
                       task.param_axes(), abstract_params, is_leaf=lambda x: isinstance(x, P))
  state = jax.eval_shape(lambda p: train.init_state(task, p), boxed)
  return jax.tree.map(lambda x: P(*x.names) if isinstance(x, nn.LogicallyPartitioned) else P(),
                      state, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_state(task: train.Task, mesh: Mesh) -> train.TrainState:
  """The TrainState's shapes, dtypes and shardings on `mesh`, with nothing allocated."""
  abstract_params = jax.eval_shape(task.init_params, jax.random.key(0))
  state = jax.eval_shape(lambda p: train.init_state(task, p), abstract_params)
  names = _state_logical_axes(task, abstract_params)
  def with_sharding(names, x):
    spec = logical_to_mesh_spec(tuple(names), x.shape, dict(mesh.shape))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(with_sharding, names, state, is_leaf=lambda x: isinstance(x, P))


def _without(spec: P, axis: str) -> P:
  entries = []
  for entry in spec:
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != axis)
    entries.append(axes[0] if len(axes) == 1 else axes or None)
  return P(*entries)


def shard_task(task: train.Task, abstract: train.TrainState) -> train.Task:
  """`task` keeping parameters and gradients in `abstract`'s shardings, and gathering the
  parameters over `fsdp` for the forward and backward passes (ZeRO-3: all-gather before use,
  gradients reduce-scattered). Without this, XLA's propagation may shard activations along the
  model dimension instead of the batch."""
  stored = shardings(abstract.params)
  compute = jax.tree.map(lambda s: NamedSharding(s.mesh, _without(s.spec, "fsdp")), stored)
  return dataclasses.replace(task, param_sharding=stored, compute_sharding=compute)


def shardings(tree):
  """The `.sharding` of every leaf of an abstract (or concrete) pytree."""
  return jax.tree.map(lambda x: x.sharding, tree)


def init_state(task: train.Task, abstract: train.TrainState, key) -> train.TrainState:
  """A fresh TrainState created directly in the shards `abstract` gives."""
  init = jax.jit(lambda k: train.init_state(task, task.init_params(k)),
                 out_shardings=shardings(abstract))
  return init(key)


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
  """Rows split over data x fsdp (replicated if they do not divide), the rest whole."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_mesh_spec(names, shape, dict(mesh.shape)))


def check_batch(config, mesh: Mesh) -> None:
  """Every data x fsdp shard must get whole sequences of every micro-batch."""
  t = config.train
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.batch_size % (shards * t.grad_accum):
    raise ConfigError(
        f"train.batch_size {t.batch_size} is not divisible by mesh.data x mesh.fsdp = {shards}"
        + (f" x train.grad_accum {t.grad_accum}" if t.grad_accum > 1 else "")
        + f"; use a multiple of {shards * t.grad_accum}")


def process_batch_shard(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(index, count): which of `count` equal row blocks of the global batch this process feeds.

  Processes whose devices hold the same rows (e.g. `tensor` spanning hosts) get the same index,
  so they read identical batches, as `jax.make_array_from_process_local_data` requires.
  """
  blocks = {}
  for device, index in sharding.devices_indices_map((batch_size,)).items():
    rows = range(batch_size)[index[0]]
    lo, hi = blocks.get(device.process_index, (batch_size, 0))
    blocks[device.process_index] = (min(lo, rows.start), max(hi, rows.stop))
  starts = sorted({lo for lo, _ in blocks.values()})
  lo, hi = blocks[jax.process_index()]
  uneven = any(b_hi - b_lo != hi - lo for b_lo, b_hi in blocks.values())
  if uneven or len(starts) * (hi - lo) != batch_size:
    raise ValueError(f"the batch sharding {sharding.spec} does not give each process one "
                     "contiguous block of rows; put the data-parallel axes first in the mesh")
  return starts.index(lo), len(starts)


def global_batch(local_batch: dict, sharding: NamedSharding, batch_size: int) -> dict:
  """Assembles each process's rows `[B / count, ...]` into global `[B, ...]` jax.Arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in local_batch.items()}


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array that every process holds in full."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def bytes_per_device(tree) -> dict:
  """Bytes each device holds of the jax.Arrays in `tree` (its addressable shards)."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


# Environment variables that mark a multi-process launch JAX can configure itself from.
_CLUSTER_SIZE_VARS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")  # an srun step, mpirun
_TPU_HOSTS_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def spans_several_processes(env=os.environ) -> bool:
  """Whether the environment describes a launch of several processes (SLURM, Open MPI, TPU
  hosts listed by GKE, multi-slice TPUs). Cloud TPU VMs expose their workers only through the
  metadata server: pass --distributed=on there (launch/tpu_vm.sh does)."""
  if any(int(env.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS):
    return True
  if any("," in env.get(v, "") for v in _TPU_HOSTS_VARS):
    return True
  return "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           env=os.environ) -> bool:
  """Starts JAX's distributed runtime before any computation; returns whether it did.

  mode "on": always (unset arguments are detected by JAX on TPU VMs, SLURM, Open MPI, GKE);
  "off": never; "auto": when an argument is given or `spans_several_processes(env)`.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r} is not one of auto, on, off")
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if mode == "off" or (mode == "auto" and not (explicit or spans_several_processes(env))):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d: %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
