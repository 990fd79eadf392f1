"""Running a Pallas kernel on each device's shard under a device mesh."""

import jax
from jax.sharding import PartitionSpec as P

from bd3jax.logical_axes import logical_to_mesh_spec


def per_shard(fn, args, names, out_names):
  """`fn(*args)` on each device's shard of its operands under the current mesh (`jax.set_mesh`).

  `names[i]` are the logical axis names of args[i] (`logical_axes`; None: replicated),
  `out_names` those of each output. A kernel is opaque to XLA's partitioner, which would
  otherwise gather its operands onto every device and repeat the whole computation there.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  sizes = dict(mesh.shape)
  spec = lambda n, shape: P() if n is None else logical_to_mesh_spec(n, shape, sizes)
  outs = jax.eval_shape(fn, *args)
  single = not isinstance(outs, (tuple, list))
  out_specs = [spec(n, o.shape) for n, o in zip(out_names, [outs] if single else outs)]
  # check_vma=False: the kernels' outputs carry no varying-axes annotation; devices along axes
  # the specs leave out hold equal inputs and so compute equal outputs.
  return jax.shard_map(fn, in_specs=tuple(spec(n, a.shape) for n, a in zip(names, args)),
                       out_specs=out_specs[0] if single else tuple(out_specs),
                       check_vma=False)(*args)
