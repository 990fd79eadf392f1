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
    counts.update({op["op"]: op["count"] for op in timeline["top"]})
  assert counts and set(counts.values()) == {3}, counts


def test_trace_summary_union_and_missing_trace(tmp_path):
  assert trace_summary._union_ns([(0, 10), (5, 12), (20, 21), (2, 3)]) == 13
  with pytest.raises(FileNotFoundError, match="no .*xplane.pb"):
    trace_summary.newest_trace(str(tmp_path))
