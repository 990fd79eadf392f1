"""The benchmarks' own tools (the benchmarks themselves are run by hand; see benchmarks/)."""

import collections

import jax
import jax.numpy as jnp
import pytest

import tiny_config
from bd3jax import train
from benchmarks import common, hlo_traffic, trace_summary


def test_trace_summary_counts_every_op_of_every_call(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum(axis=0) * 2.0)
  x = jnp.ones((64, 64))
  f(x).block_until_ready()  # compiled before the trace
  seconds, _, timelines = trace_summary.trace(lambda: [f(x) for _ in range(3)], str(tmp_path))
  counts = collections.Counter()
  for timeline in timelines:
    assert 0 < timeline["busy_ms"] <= timeline["span_ms"] <= 1e3 * seconds
    assert sum(op["count"] for op in timeline["top"]) == timeline["events"]
    assert sum(k["count"] for k in timeline["kinds"]) == timeline["events"]
    assert sum(k["total_ms"] for k in timeline["kinds"]) == pytest.approx(
        sum(op["total_ms"] for op in timeline["top"]))
    counts.update({op["op"]: op["count"] for op in timeline["top"]})
  assert counts and set(counts.values()) == {3}, counts


def test_trace_summary_union_and_missing_trace(tmp_path):
  assert trace_summary._union_ns([(0, 10), (5, 12), (20, 21), (2, 3)]) == 13
  with pytest.raises(FileNotFoundError, match="no .*xplane.pb"):
    trace_summary.newest_trace(str(tmp_path))


@pytest.mark.parametrize("op,name,expected", [
    ("custom-call.317", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("cublas-lt-matmul.65", "Memset 3", "Memset"),
    ("cublas-lt-matmul.65", "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNN", "gemm"),
    ("custom-call.40", "cudnn_sdpa_sm90_flash_fprop_1", "cudnn_sdpa_sm90_flash_fprop"),
    ("custom-call.219", "Memset 3", "Memset"),
    ("gemm_fusion_dot.12", "gemm_fusion_dot_12", "gemm"),
    ("pallas_call.153", "bd3_attention_dkv", "bd3_attention_dkv"),
    ("command_buffer_1", "loop_add_fusion_137", "loop_add_fusion"),
    ("input_reduce_fusion.4", "input_reduce_fusion_4", "input_reduce_fusion"),
    ("while.5", "MemcpyD2H", "MemcpyD2H"),
    (None, "MemcpyH2D", "MemcpyH2D"),
    ("dot.3", "dot.3", "gemm"),
    ("wrapped_concatenate", "wrapped_concatenate", "wrapped_concatenate"),
])
def test_trace_summary_kinds(op, name, expected):
  assert trace_summary.kind(op, name) == expected


def test_trace_summary_sources(tmp_path):
  def loss(x, w):
    with jax.named_scope("layer"):
      y = jnp.tanh(x @ w)
    with jax.named_scope("head"):
      return jnp.sum(jnp.sin(y) ** 2)
  f = jax.jit(jax.grad(loss))
  x, w = jnp.ones((128, 128)), jnp.full((128, 128), 0.01)
  f(x, w).block_until_ready()
  hlo_text = f.lower(x, w).compile().as_text()
  _, _, timelines = trace_summary.trace(lambda: f(x, w), str(tmp_path), hlo_text=hlo_text)
  seen = set()
  for timeline in timelines:
    assert sum(s["count"] for s in timeline["sources"]) == timeline["events"]
    assert sum(s["total_ms"] for s in timeline["sources"]) == pytest.approx(
        sum(k["total_ms"] for k in timeline["kinds"]))
    seen.update(s["source"] for s in timeline["sources"])
  assert {"forward layer", "backward layer"} <= seen, seen
  assert seen <= {"forward layer", "backward layer", "forward head", "backward head",
                  "(top level)", "(no HLO op)"}, seen
  _, _, timelines = trace_summary.trace(lambda: f(x, w), str(tmp_path / "plain"))
  assert all("sources" not in t for t in timelines)


@pytest.mark.parametrize("op_name,expected", [
    ("jit(step)/transpose(jvp(DiT))/blocks_3/norm1/mul", "backward DiT/blocks_*/norm1"),
    ("jit(step)/jvp(DiT)/blocks_0/while/body/closed_call/add", "forward DiT/blocks_*"),
    ("jit(step)/jvp(DiT)/blocks_11/dropout/jit(_where)/select_n", "forward DiT/blocks_*/dropout"),
    ("jit(step)/jvp(DiT)/blocks_2/mlp_0/dot_general", "forward DiT/blocks_*/mlp_0"),
    ("jit(step)/transpose(jvp(loss))/mul", "backward loss"),
    ("jit(step)/optimizer/jit(clip)/min", "optimizer"),
    ("jit(step)/jvp()/lgamma", "forward"),
    ("jit(step)/add", "(top level)"),
    ("jit(step)/mul;jit(step)/ema/add", "(top level)"),
])
def test_trace_summary_source(op_name, expected):
  assert trace_summary.source(op_name) == expected


HLO = """HloModule m

%fused_computation (param_0: f32[64,64], param_1: f32[8]) -> f32[8] {
  %param_0 = f32[64,64]{1,0} parameter(0)
  %slice.1 = f32[1,8]{1,0} slice(%param_0), slice={[0:1], [0:8]}
  %bitcast.2 = f32[8]{0} bitcast(%slice.1)
  %param_1 = f32[8]{0} parameter(1)
  ROOT %add.3 = f32[8]{0} add(%bitcast.2, %param_1)
}

ENTRY %main (a: f32[64,64], b: f32[8], c: bf16[4,8]) -> (f32[8], bf16[4,4]) {
  %a = f32[64,64]{1,0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %c = bf16[4,8]{1,0} parameter(2)
  %fusion = f32[8]{0} fusion(%a, %b), kind=kLoop, calls=%fused_computation, FUSION_METADATA
  %gemm = (bf16[4,4]{1,0}, s8[16]{0}) custom-call(%c, %c), GEMM_TARGET_AND_METADATA
  %gte = bf16[4,4]{1,0} get-tuple-element(%gemm), index=0
  ROOT %tuple = (f32[8]{0}, bf16[4,4]{1,0}) tuple(%fusion, %gte)
}
""".replace("FUSION_METADATA", 'metadata={op_name="jit(f)/jvp(layer)/add"}').replace(
    "GEMM_TARGET_AND_METADATA", 'custom_call_target="__cublas$lt$matmul", '
    'metadata={op_name="jit(f)/transpose(jvp(layer))/dot_general"}')


def test_hlo_traffic_counts_each_kernels_bytes():
  assert hlo_traffic.nbytes("(f32[2,3]{1,0}, pred[4]{0})") == 28
  assert hlo_traffic.nbytes("bf16[]") == 2
  assert hlo_traffic.kernels(HLO) == [
      # the fusion reads only a [1, 8] slice of its first operand
      {"name": "fusion", "kind": "kLoop", "source": "forward layer", "read": 32 + 32,
       "written": 32},
      {"name": "gemm", "kind": "gemm", "source": "backward layer", "read": 2 * 64,
       "written": 32 + 16}]
  summary = hlo_traffic.summarize(hlo_traffic.kernels(HLO), top=5)
  assert summary["gb"] == pytest.approx(272e-9) and summary["other_gb"] == pytest.approx(96e-9)
  assert summary["sources"] == [{"source": "forward layer", "count": 1, "gb": 96e-9}]


def test_hlo_traffic_of_the_compiled_train_step():
  config = tiny_config.get_config()
  kernels = hlo_traffic.kernels(hlo_traffic.compiled_step_text(config, 2, 37, None))
  summary = hlo_traffic.summarize(kernels, top=1000)
  assert kernels and all(k["written"] > 0 for k in kernels)
  task = train.Task.from_config(config, 37, 36)
  params = jax.eval_shape(task.init_params, jax.random.key(0))
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  # AdamW reads the parameters, their gradients and both moments; EMA reads its copy
  assert sum(k["read"] for k in kernels) >= 5 * param_bytes
  assert sum(k["gb"] for k in summary["kinds"]) == pytest.approx(summary["gb"])
  sources = {s["source"] for s in summary["sources"]}
  assert {"optimizer", "ema", "forward loss"} <= sources, sources
  assert any(s.startswith("backward DiT/blocks_*") for s in sources), sources


def test_pipelined_steps_thread_the_state_through_every_call():
  step = jax.jit(lambda state, batch: (state + batch, {"state": state}), donate_argnums=(0,))
  state, _, dispatch_s, host_s = common.time_pipelined_steps(step, jnp.zeros(()), jnp.ones(()),
                                                             steps=5)
  assert float(state) == 15.0  # runs of 5 and 10 calls
  assert 0 < dispatch_s and 0 < host_s
  with pytest.raises(ValueError, match="at least 1"):
    common.time_pipelined_steps(step, state, jnp.ones(()), steps=0)


def test_host_threads_count_every_dispatch(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  trace_summary.trace(lambda: [f(x) for _ in range(3)], str(tmp_path))
  threads = trace_summary.host_threads(trace_summary.newest_trace(str(tmp_path)))
  assert [t["busy_ms"] for t in threads] == sorted((t["busy_ms"] for t in threads), reverse=True)
  for t in threads:
    assert 0 < t["busy_ms"] <= t["span_ms"]
    assert sum(e["count"] for e in t["top"]) <= t["events"]
  dispatches = sum(e["count"] for t in threads for e in t["top"]
                   if e["name"] == "PjitFunction(<lambda>)")
  assert dispatches and dispatches % 3 == 0, dispatches  # as many events for each of 3 calls
