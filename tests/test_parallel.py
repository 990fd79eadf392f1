"""bd3jax.parallel: mesh, rules and start-up in this process (one device); sharded training,
memory, the attention kernels on device shards and cross-mesh restore on 8 fake CPU devices in
a subprocess (multidevice_checks.py)."""

import importlib
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from bd3jax import checkpoint, logical_axes, parallel, train
from bd3jax.config import ConfigError
from bd3jax.data import make_train_iterator

ROOT = Path(__file__).resolve().parents[1]
MESHES = ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 8, 1)"]


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
  """The measurements of tests/multidevice_checks.py, run once on 8 fake devices."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_checks.py"),
                         str(tmp_path_factory.mktemp("multidevice"))],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-6000:]
  return json.loads(results[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_matches_the_unsharded_step(multidevice, mesh):
  steps = multidevice["steps"]
  got = steps["meshes"][mesh]
  np.testing.assert_allclose(got["losses"], steps["reference_losses"], rtol=2e-6)
  assert got["params_max_abs_diff"] < 2e-6
  assert got["ema_max_abs_diff"] < 2e-6
  assert got["opt_state_max_abs_diff"] < 1e-7


def test_pairs_of_rows_fit_where_each_device_holds_an_even_count(multidevice):
  """8 or 16 rows over 8 batch shards (one or two a device), or over 4 (two or four)."""
  fit = {mesh: multidevice["steps"]["meshes"][mesh]["pairs_fit"] for mesh in MESHES}
  assert fit == {"(8, 1, 1)": [False, True], "(2, 4, 1)": [False, True],
                 "(2, 2, 2)": [True, True], "(1, 8, 1)": [False, True]}


def test_sharded_gradient_accumulation(multidevice):
  got = multidevice["steps"]["grad_accum"]
  np.testing.assert_allclose(got["losses"], got["reference_losses"], rtol=2e-6)
  assert got["params_max_abs_diff"] < 2e-6


@pytest.mark.parametrize("implementation", ["pallas", "splash"])
def test_kernels_run_on_each_devices_shard(multidevice, implementation):
  kernels = multidevice["kernels"]
  got = kernels[implementation]
  assert got["max_abs_diff"] < 1e-5   # output and q, k, v gradients against dense attention
  # Kernel calls happen (0 otherwise), each on batch / (2 x 2) and heads / 2.
  assert got["max_operand_size"] == kernels["q_size"] // 8


def test_packed_attention_runs_on_each_devices_shard(multidevice):
  got = multidevice["kernels"]["packed"]
  assert got["max_abs_diff"] < 1e-5   # output and d qkv against dense attention, Q = T and L
  assert got["max_operand_size"] == got["qkv_size"] // 8   # batch / (2 x 2), heads / 2


def test_fused_layer_norm_runs_on_each_devices_shard(multidevice):
  got = multidevice["kernels"]["layer_norm"]
  assert got["max_abs_diff"] < 1e-5   # outputs and gradients against the XLA formulas
  assert got["max_operand_size"] == got["x_size"] // 4   # the batch over data x fsdp = 2 x 2


def test_sharded_train_step_with_the_pallas_kernels(multidevice):
  got = multidevice["kernels"]["train_step"]
  np.testing.assert_allclose(got["pallas_sharded"], got["dense_unsharded"], rtol=2e-6)


def test_the_meshes_really_split_the_weights(multidevice):
  specs = {mesh: multidevice["steps"]["meshes"][mesh]["qkv_spec"] for mesh in MESHES}
  assert specs == {"(8, 1, 1)": "P(None, None, None, None)",
                   "(2, 4, 1)": "P('fsdp', None, None, None)",
                   "(2, 2, 2)": "P('fsdp', None, 'tensor', None)",
                   "(1, 8, 1)": "P('fsdp', None, None, None)"}


def test_fsdp8_holds_an_eighth_of_the_state_per_device(multidevice):
  m = multidevice["steps"]["fsdp8"]
  for part in ("params", "opt_state"):
    assert m["max_device_bytes"][part] <= 1.1 * m["total_bytes"][part] / 8, part
  eighth = m["state_total_bytes"] / 8
  assert m["state_max_device_bytes"] <= 1.1 * eighth
  if m["argument_bytes"] is not None:   # the compiled step's inputs on one device
    assert m["argument_bytes"] <= 1.1 * eighth + m["batch_device_bytes"]
    assert m["alias_bytes"] >= 0.9 * m["state_max_device_bytes"]   # the state is donated


def test_restore_on_another_mesh_continues_identically(multidevice):
  first, second = multidevice["restore"]["first_mesh"], multidevice["restore"]["second_mesh"]
  assert sorted(second, key=int) == ["5", "6", "7", "8"]
  np.testing.assert_allclose([second[s] for s in second], [first[s] for s in second], rtol=2e-6)


def mesh_cfg(**sizes):
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1,
                                    "dcn_fsdp": 1, **sizes})


@pytest.mark.parametrize("sizes,devices,shape", [
    ({}, 8, (8, 1, 1)),
    ({"fsdp": 4}, 8, (2, 4, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 16, (1, 8, 2)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
])
def test_mesh_shape_resolves_the_rest(sizes, devices, shape):
  assert parallel.mesh_shape(mesh_cfg(**sizes), devices) == shape


@pytest.mark.parametrize("sizes,devices,message", [
    ({"fsdp": 3}, 8, r"mesh.fsdp 3 x mesh.tensor 1 = 3 does not divide the 8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, r"= 4 devices, but there are 8"),
    ({"fsdp": -1}, 8, r"mesh.data and mesh.fsdp are both -1"),
    ({"tensor": 0}, 8, r"mesh.tensor 0 must be a positive size or -1"),
])
def test_bad_mesh_settings_name_the_key(sizes, devices, message):
  with pytest.raises(ConfigError, match=message):
    parallel.mesh_shape(mesh_cfg(**sizes), devices)


def test_multi_slice_settings_need_several_slices():
  with pytest.raises(ConfigError, match=r"span 1 slice\(s\) but mesh.dcn_data x mesh.dcn_fsdp = 2"):
    parallel.make_mesh(mesh_cfg(dcn_data=2))


def test_single_device_default_mesh():
  mesh = parallel.make_mesh(mesh_cfg())
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("names,shape,sizes,spec", [
    # Megatron tensor parallelism, FSDP on the model dimension.
    (("embed", "qkv", "heads", "head_dim"), (768, 3, 12, 64), (1, 2, 4),
     P("fsdp", None, "tensor", None)),
    (("embed", "mlp"), (768, 3072), (1, 8, 1), P("fsdp", None)),
    (("mlp", "embed"), (3072, 768), (1, 2, 4), P("tensor", "fsdp")),
    # A vocabulary of 50258 does not split 4 ways: the model dimension takes `tensor` too.
    (("vocab", "embed"), (50258, 768), (1, 2, 4), P(None, ("fsdp", "tensor"))),
    (("vocab", "embed"), (50304, 768), (1, 2, 4), P("tensor", "fsdp")),
    # Norms and biases are sharded as far as they divide.
    (("embed",), (768,), (1, 2, 4), P(("fsdp", "tensor"))),
    (("mlp",), (3072,), (1, 8, 1), P("fsdp")),
    (("vocab",), (50258,), (1, 8, 1), P(None)),
    (("cond", "modulation"), (128, 4608), (1, 8, 1), P("fsdp", None)),
    # Pure data parallelism replicates every weight; the batch takes data x fsdp.
    (("embed", "mlp"), (768, 3072), (8, 1, 1), P(None, None)),
    (("batch", None), (512, 1024), (2, 4, 1), P(("data", "fsdp"), None)),
    (("batch", None), (7, 1024), (2, 4, 1), P(None, None)),
])
def test_logical_rules(names, shape, sizes, spec):
  axis_sizes = dict(zip(logical_axes.MESH_AXES, sizes))
  assert logical_axes.logical_to_mesh_spec(names, shape, axis_sizes) == spec


def test_every_parameter_name_has_a_rule():
  import tiny_config
  task = train.Task.from_config(tiny_config.get_config(), 64, 63)
  names = {n for spec in jax.tree.leaves(task.param_axes(), is_leaf=lambda x: isinstance(x, P))
           for n in spec}
  ruled = {name for name, _ in logical_axes.LOGICAL_RULES}
  assert names - ruled <= {"qkv", "head_dim"}   # never split: too small to be worth it


@pytest.mark.parametrize("batch,accum,message", [
    (12, 1, r"train.batch_size 12 is not divisible by mesh.data x mesh.fsdp = 8; use a multiple "
            r"of 8"),
    (16, 4, r"mesh.data x mesh.fsdp = 8 x train.grad_accum 4; use a multiple of 32"),
])
def test_batch_must_split_over_the_data_axes(batch, accum, message):
  config = ml_collections.ConfigDict({"train": {"batch_size": batch, "grad_accum": accum}})
  with pytest.raises(ConfigError, match=message):
    parallel.check_batch(config, AbstractMesh((2, 4, 1), parallel.MESH_AXES))


def test_one_process_feeds_the_whole_batch():
  mesh = parallel.make_mesh(mesh_cfg())
  assert parallel.process_batch_shard(parallel.batch_sharding(mesh, (8, 4)), 8) == (0, 1)


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7"}, False),
    ({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}, False),   # a batch script, not an srun step
    ({"SLURM_STEP_NUM_TASKS": "16", "SLURM_JOB_ID": "7"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, True),
])
def test_detects_multi_process_launches(env, expected):
  assert parallel.spans_several_processes(env) is expected


def test_single_process_runs_do_not_start_the_distributed_runtime():
  assert not parallel.initialize_distributed("auto", env={})
  assert not parallel.initialize_distributed("off", env={"SLURM_STEP_NUM_TASKS": "4"})
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    parallel.initialize_distributed("maybe")


@pytest.mark.parametrize("size,d_model", [("small", 768), ("medium", 1024)])
@pytest.mark.parametrize("name,devices,mesh", [
    ("owt_bd3lm_v5p32", 16, (1, 16, 1)),
    ("owt_bd3lm_8xh100", 8, (1, 8, 1)),
    ("owt_bd3lm_8xh100", 32, (4, 8, 1)),   # four nodes
])
def test_paper_scale_configs(name, devices, mesh, size, d_model):
  from bd3jax import config as config_lib
  config = importlib.import_module(f"configs.{name}").get_config(size)
  config_lib.validate(config)
  assert config.train.batch_size == 512 and config.model.d_model == d_model
  assert parallel.mesh_shape(config.mesh, devices) == mesh
  parallel.check_batch(config, AbstractMesh(mesh, parallel.MESH_AXES))


def test_iterator_saved_by_another_process_count_restarts_the_data(tmp_path, caplog):
  """Moving to a slice with more hosts: the state restores, the data order restarts."""
  import tiny_config
  task = train.Task.from_config(tiny_config.get_config(), 64, 63)
  state = jax.jit(lambda k: train.init_state(task, task.init_params(k)))(jax.random.key(0))
  data = make_train_iterator(np.arange(64 * 32).reshape(64, 32) % 63, batch_size=4, seed=0)
  next(data)
  tokenizer = types.SimpleNamespace(vocab_size=64, serialize=lambda: b"tokenizer")
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, state, data, tiny_config.get_config(), tokenizer)
  ckpt.close()
  saved = tmp_path / "checkpoints" / "1" / "data_iter"
  (saved / "process_0-of-1.json").rename(saved / "process_0-of-2.json")
  fresh = make_train_iterator(np.arange(64 * 32).reshape(64, 32) % 63, batch_size=4, seed=0)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(1, jax.eval_shape(lambda: state), fresh)
  ckpt.close()
  assert "no data-iterator state for 1 processes" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert fresh.get_state() == make_train_iterator(
      np.zeros((64, 32), np.int32), batch_size=4, seed=0).get_state()
