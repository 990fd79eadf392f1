"""Mesh axes and logical-axis rules: which device-mesh axes a named array dimension splits over.

Shared by bd3jax.parallel (parameters, optimiser state, batches) and the attention kernels
(which run on each device's shard of batch and heads).
"""

import math

from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes) in order of precedence, as in flax's logical-axis rules: each array
# dimension takes the first rule for its name whose mesh axes (those larger than 1) are not used
# by another dimension of the array and whose product divides the dimension; dimensions that no
# rule fits are replicated (e.g. a 50258-entry vocabulary on 4 tensor shards).
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    # Tensor parallelism first: it decides which weight dimension is split across `tensor`.
    ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"), ("modulation", "tensor"),
    # FSDP on the model dimension; `tensor` too where no other dimension took it (norms, biases).
    ("embed", ("fsdp", "tensor")), ("embed", "fsdp"),
    ("timestep", "fsdp"), ("cond", "fsdp"), ("cond_in", "fsdp"),
    # Weights without a model dimension (biases) are still sharded under pure FSDP.
    ("mlp", "fsdp"), ("vocab", "fsdp"), ("modulation", "fsdp"), ("heads", "fsdp"),
)


def logical_to_mesh_spec(names, shape, axis_sizes, rules=LOGICAL_RULES) -> P:
  """The PartitionSpec of an array with logical axis `names` and `shape` (see LOGICAL_RULES)."""
  spec, used = [None] * len(names), set()
  for name, axes in rules:
    axes = (axes,) if isinstance(axes, str) else axes
    axes = tuple(a for a in axes if axis_sizes.get(a, 1) > 1)
    if not axes or used.intersection(axes):
      continue
    size = math.prod(axis_sizes[a] for a in axes)
    for i, n in enumerate(names):
      if n == name and spec[i] is None and shape[i] % size == 0:
        spec[i] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
  return P(*spec)
