"""Measurements of bd3jax.parallel and the attention kernels on 8 fake CPU devices, as JSON.

tests/test_parallel.py runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before jax is imported, and
the rest of the suite must keep its single device) and asserts on the numbers.

  python tests/multidevice_checks.py WORKDIR
"""

import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax_helpers  # noqa: E402
import tiny_config  # noqa: E402
from bd3jax import metrics, parallel, run, train  # noqa: E402
from bd3jax.data import demo_documents  # noqa: E402
from bd3jax.masks import AttentionMask, MaskKind  # noqa: E402
from bd3jax.model import layer_ops  # noqa: E402
from bd3jax.model.attention import attention, qkv_attention  # noqa: E402
from bd3jax.model.dropout import keep_bits  # noqa: E402
from bd3jax.rotary import rotary_cos_sin  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)]   # (data, fsdp, tensor)
BATCH, STEPS, VOCAB = 8, 3, 64


def mesh_config(shape):
  return ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape), dcn_data=1, dcn_fsdp=1))


def tiny(**train_overrides):
  config = tiny_config.get_config()
  config.model.n_heads = 4   # so that tensor = 2 or 4 splits the heads
  config.train.update(batch_size=BATCH, **train_overrides)
  return config


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sharded_steps(task, batches, shape):
  """Losses and final state of STEPS sharded steps, and the compiled step's memory analysis."""
  mesh = parallel.make_mesh(mesh_config(shape))
  abstract = parallel.abstract_state(task, mesh)
  task = parallel.shard_task(task, abstract)
  sharding = parallel.batch_sharding(mesh, (BATCH, batches[0]["tokens"].shape[1]))
  with jax.set_mesh(mesh):
    state = parallel.init_state(task, abstract, jax.random.key(0))
    placed = [parallel.global_batch(b, sharding, BATCH) for b in batches]
    compiled = train.jit_train_step(task, parallel.shardings(abstract), sharding).lower(
        state, placed[0]).compile()
    per_device = parallel.bytes_per_device(state)
    losses = []
    for batch in placed:
      state, m = compiled(state, batch)
      losses.append(float(m["loss"]))
  return losses, state, compiled.memory_analysis(), per_device


def unsharded_steps(task, batches):
  step = train.jit_train_step(task)
  state = jax.jit(lambda k: train.init_state(task, task.init_params(k)))(jax.random.key(0))
  losses = []
  for batch in batches:
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state)


def check_steps() -> dict:
  """Sharded against unsharded steps on every mesh of MESHES (and with 2 micro-batches on
  (2, 2, 2)), and FSDP=8 memory."""
  task = train.Task.from_config(tiny(), VOCAB, VOCAB - 1)
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, VOCAB - 1, (BATCH, 32), dtype=np.int32)}
             for _ in range(STEPS)]
  ref_losses, ref = unsharded_steps(task, batches)
  out = {"reference_losses": ref_losses, "meshes": {}}
  accum = train.Task.from_config(tiny(grad_accum=2), VOCAB, VOCAB - 1)
  accum_losses, accum_ref = unsharded_steps(accum, batches)
  losses, state, _, _ = sharded_steps(accum, batches, (2, 2, 2))
  out["grad_accum"] = {"reference_losses": accum_losses, "losses": losses,
                       "params_max_abs_diff": max_abs_diff(accum_ref.params, state.params)}
  for shape in MESHES:
    losses, state, memory, per_device = sharded_steps(task, batches, shape)
    out["meshes"][str(shape)] = {
        "losses": losses,
        "params_max_abs_diff": max_abs_diff(ref.params, state.params),
        "ema_max_abs_diff": max_abs_diff(ref.ema_params, state.ema_params),
        "opt_state_max_abs_diff": max_abs_diff(ref.opt_state, state.opt_state),
        "qkv_spec": str(state.params["blocks_0"]["attn_qkv"]["kernel"].sharding.spec),
        "pairs_fit": [run.pairs_stay_on_devices(
            parallel.batch_sharding(parallel.make_mesh(mesh_config(shape)), (b, 32)), b)
            for b in (BATCH, 2 * BATCH)]}
    if shape == (1, 8, 1):
      total = {k: sum(x.nbytes for x in jax.tree.leaves(getattr(state, k)))
               for k in ("params", "opt_state")}
      device = {k: max(parallel.bytes_per_device(getattr(state, k)).values()) for k in total}
      out["fsdp8"] = {
          "total_bytes": total, "max_device_bytes": device,
          "state_total_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
          "state_max_device_bytes": max(per_device.values()),
          "batch_device_bytes": BATCH * 32 * 4 // 8,
          "argument_bytes": memory.argument_size_in_bytes if memory else None,
          "alias_bytes": memory.alias_size_in_bytes if memory else None}
  return out


def kernel_operand_sizes(jaxpr) -> list[int]:
  """Element counts of the floating-point operands of every Pallas call, nested jaxprs too."""
  return [v.aval.size for eqn in jax_helpers.equations(jaxpr)
          if eqn.primitive.name == "pallas_call"
          for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)]


def check_kernels() -> dict:
  """The Pallas and splash kernels on the (2, 2, 2) mesh: output and gradients against dense
  attention on one device, the largest operand any kernel call sees (a q shard is 1/8 of q);
  the same for the fused residual LayerNorm against its XLA formulas (a shard of x is 1/4: the
  batch only); and a sharded train step with the Pallas kernels (attention and LayerNorm)
  against the unsharded dense and XLA step."""
  mesh = parallel.make_mesh(mesh_config((2, 2, 2)))
  mask = AttentionMask(MaskKind.TRAINING, 64, 16)   # T = 128: one splash block
  q, k, v, do = (jax.random.normal(key, (4, 128, 4, 16))
                 for key in jax.random.split(jax.random.key(0), 4))

  def value_and_grads(implementation, q, k, v, do):
    attend = functools.partial(attention, mask=mask, implementation=implementation)
    return jax_helpers.value_and_grads(attend, q, k, v, do)

  ref = jax.jit(functools.partial(value_and_grads, "dense"))(q, k, v, do)
  out = {"q_size": q.size}
  for implementation in ("pallas", "splash"):
    fn = jax.jit(functools.partial(value_and_grads, implementation))
    with jax.set_mesh(mesh):
      args = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
              for x in (q, k, v, do)]
      got = fn(*args)
      sizes = kernel_operand_sizes(jax.make_jaxpr(fn)(*args).jaxpr)
    out[implementation] = {"max_abs_diff": max_abs_diff(got, ref),
                           "max_operand_size": max(sizes, default=0)}

  out["layer_norm"] = check_layer_norm_kernel(mesh)
  out["packed"] = check_packed_attention(mesh)

  dense = train.Task.from_config(tiny(), VOCAB, VOCAB - 1)
  config = tiny()
  config.model.update(attention="pallas", layer_norm="pallas")
  pallas = train.Task.from_config(config, VOCAB, VOCAB - 1)
  rng = np.random.default_rng(1)
  batches = [{"tokens": rng.integers(0, VOCAB - 1, (BATCH, 32), dtype=np.int32)}
             for _ in range(2)]
  out["train_step"] = {"dense_unsharded": unsharded_steps(dense, batches)[0],
                       "pallas_sharded": sharded_steps(pallas, batches, (2, 2, 2))[0]}
  return out


def check_packed_attention(mesh) -> dict:
  """`qkv_attention` with "pallas" (`block_sparse.packed_attention`) on `mesh` (qkv batch- and
  head-sharded) against "dense" on one device: output and d qkv for all 2L queries and for the
  first L (the dq kernel's zeroed buffer), and the largest kernel operand."""
  mask = AttentionMask(MaskKind.TRAINING, 64, 16)   # T = 128: the default 64-row tiles divide
  keys = jax.random.split(jax.random.key(2), 3)
  qkv = jax.random.normal(keys[0], (4, 128, 3, 4, 16))
  cos, sin = rotary_cos_sin(jnp.arange(128) % 64, 16)
  diffs, sizes = [], []
  for queries in (None, 64):
    do = jax.random.normal(keys[1], (4, queries or 128, 4, 16))

    def value_and_grad(implementation, qkv, do):
      attend = lambda qkv: qkv_attention(qkv, cos, sin, mask, implementation, queries)
      return jax_helpers.value_and_grads(attend, qkv, do)

    ref = jax.jit(functools.partial(value_and_grad, "dense"))(qkv, do)
    fn = jax.jit(functools.partial(value_and_grad, "pallas"))
    with jax.set_mesh(mesh):
      placed = [jax.device_put(qkv, NamedSharding(mesh, P(("data", "fsdp"), None, None,
                                                          "tensor"))),
                jax.device_put(do, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))]
      diffs.append(max_abs_diff(fn(*placed), ref))
      sizes += kernel_operand_sizes(jax.make_jaxpr(fn)(*placed).jaxpr)
  return {"max_abs_diff": max(diffs), "max_operand_size": max(sizes, default=0),
          "qkv_size": qkv.size}


def check_layer_norm_kernel(mesh) -> dict:
  """`layer_ops.residual_layer_norm` with "pallas" on `mesh` (x, branch, gate, shift and scale
  batch-sharded, the weight replicated) against "xla" on one device: outputs and every
  gradient, and the largest kernel operand."""
  b, t, d = 8, 16, 32
  keys = iter(jax.random.split(jax.random.key(1), 10))
  x, branch = (jax.random.normal(next(keys), (b, t, d)) for _ in range(2))
  gate, shift, scale = (jax.random.normal(next(keys), (b, 1, d)) for _ in range(3))
  weight = 1 + 0.1 * jax.random.normal(next(keys), (d,))
  mask = keep_bits(next(keys), (b, t, d), 0.1)
  cotangents = tuple(jax.random.normal(next(keys), shape)
                     for shape in ((b, t, d), (b, t, d), (b, t, 1)))

  def value_and_grads(implementation, *args):
    fused = lambda x, branch, gate, weight, shift, scale: layer_ops.residual_layer_norm(
        x, branch, gate, mask, weight, shift, scale, None, out_dtype=jnp.float32,
        implementation=implementation)
    out, vjp = jax.vjp(fused, *args)
    return out, vjp(cotangents)

  args = (x, branch, gate, weight, shift, scale)
  ref = jax.jit(functools.partial(value_and_grads, "xla"))(*args)
  fn = jax.jit(functools.partial(value_and_grads, "pallas"))
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, NamedSharding(mesh, P() if a.ndim == 1 else P(("data", "fsdp"))))
              for a in args]
    got = fn(*placed)
    sizes = kernel_operand_sizes(jax.make_jaxpr(fn)(*placed).jaxpr)
  return {"max_abs_diff": max_abs_diff(got, ref), "max_operand_size": max(sizes, default=0),
          "x_size": x.size}


def check_restore(workdir: Path) -> dict:
  """Train 8 steps with FSDP = 8; resume its step-4 checkpoint on FSDP x tensor = 2 x 4."""
  first, second = workdir / "fsdp8", workdir / "fsdp2_tensor4"
  corpus = workdir / "corpus.txt"   # fixed text: both runs must see the same documents
  corpus.write_text("\n\n".join(demo_documents()))
  config = tiny(num_steps=8, checkpoint_every=4, eval_every=100, eval_batches=1, log_every=1)
  config.data.update(source="text", train_files=str(corpus))
  config.sample.num_samples = 0
  config.mesh = mesh_config((1, 8, 1))
  run.train_and_evaluate(config, str(first))
  shutil.copytree(first, second)
  shutil.rmtree(second / "checkpoints" / "8")
  (second / "metrics.jsonl").unlink()
  config.mesh = mesh_config((1, 2, 4))
  run.train_and_evaluate(config, str(second))
  return {"first_mesh": metrics.read_scalars(first, "train/loss"),
          "second_mesh": metrics.read_scalars(second, "train/loss")}


def main(workdir: str) -> None:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  out = {"steps": check_steps(), "kernels": check_kernels(),
         "restore": check_restore(Path(workdir))}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
