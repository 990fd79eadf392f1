"""The benchmarks' own tools (the benchmarks themselves are run by hand; see benchmarks/)."""

import collections

import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary


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
