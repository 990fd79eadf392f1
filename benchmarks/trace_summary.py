"""Where a traced run's time goes: XLA ops and device events by total time, per timeline.

  python benchmarks/trace_summary.py TRACE_DIR [--top=20]   # one JSON line per timeline

`trace(fn, directory)` times `fn()` under `jax.profiler.trace` and summarizes what it wrote:
`newest_trace(directory)` finds the XSpace file, `summarize(path)` reads it with
`jax.profiler.ProfileData`; `host_threads(path)` gives each host thread's busiest events. A
timeline is one line of the trace: a GPU stream or TPU core (planes named /device:...), or a
host thread that ran XLA's CPU thunks. Counted: every event of a device plane, and on host
planes the events that carry an `hlo_op` stat. Events are grouped by that stat (the HLO
instruction, e.g. a fusion) or else by their name (a memcpy, a kernel of no HLO op, each kernel
of an XLA command buffer, i.e. a CUDA graph, whose events all carry the command buffer's op); a
group's `kernel` is its events' name where that differs (e.g. the GPU kernel of a fusion).
Per timeline:
- busy_ms: the union of its events' intervals; span_ms: its first start to its last end, so
  busy / span below 1 is time the timeline sat idle (launches, host syncs) within the trace;
- top: the `top` groups by total time: count, total_ms, mean_us;
- kinds: every event counted once by `kind` (matrix multiplies, each Pallas kernel, each
  fusion kind, memcpy/memset), by total time: count, total_ms. Where the time goes, when the
  top groups are each layer's copy of the same op;
- sources (when the compiled programs' HLO text is given, e.g. `compiled.as_text()`): every
  event counted once by the part of the program its op comes from, `source(op_name)` of the
  op's metadata ("backward DiT/blocks_*/norm1": the named scopes, i.e. Flax modules and
  `jax.named_scope`s, layers merged, and whether it runs under the gradient's forward or
  backward pass), by total time: count, total_ms.
"""

import argparse
import collections
import glob
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trace(fn, directory: str, top: int = 20, hlo_text: str | None = None):
  """(wall seconds, result, `summarize` of the trace) of `fn()` run under the profiler, ended
  by block_until_ready; the trace is written under `directory`."""
  with jax.profiler.trace(directory):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds = time.perf_counter() - t0
  return seconds, out, summarize(newest_trace(directory), top, hlo_text)


def newest_trace(directory: str) -> str:
  """The most recently written XSpace file (`*.xplane.pb`) under `directory`."""
  paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb trace under {directory}")
  return max(paths, key=os.path.getmtime)


def _union_ns(intervals) -> float:
  """Total length of the union of (start, end) intervals."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def _extent(intervals) -> dict:
  """events, busy_ms (the union of the (start, end) intervals in ns) and span_ms (first start
  to last end) of a timeline's events."""
  return {"events": len(intervals), "busy_ms": _union_ns(intervals) / 1e6,
          "span_ms": (max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1e6}


_GEMM = re.compile(r"gemm|xmma|nvjet|matmul|cutlass|cublas|^dot\b", re.IGNORECASE)


def kind(op: str | None, name: str) -> str:
  """The coarse class of an event of HLO op `op` (None: none) named `name`: "Memcpy..." or
  "Memset" for copies, "gemm" for matrix multiplies (cuBLAS, CUTLASS, Triton GEMM fusions,
  XLA:CPU dots), the kernel's name for Pallas and other custom calls, else the op's name
  without its number ("loop_add_fusion_137" -> "loop_add_fusion")."""
  if name.startswith(("Memcpy", "Memset")):
    return name.split()[0]
  if _GEMM.search(name) or (op and _GEMM.search(op)):
    return "gemm"
  by_kernel = op is None or op.startswith(("pallas_call", "command_buffer", "custom-call"))
  return re.sub(r"[._]\d+$", "", name if by_kernel else op)


_WRAPPED = re.compile(r"^(\w+)\((.*)\)$")
_LAYER = re.compile(r"^(blocks|layers)_\d+$")
_NOT_A_SCOPE = {"while", "body", "cond", "closed_call"}


def source(op_name: str) -> str:
  """Where an op with metadata `op_name` comes from: "forward" or "backward" (under a jvp or
  its transpose; neither for ops outside differentiation), then its named scopes without the
  outer jit, nested jits, control flow and the primitive, layer numbers as "*":
  "jit(step)/transpose(jvp(DiT))/blocks_3/norm1/mul" -> "backward DiT/blocks_*/norm1"."""
  parts = op_name.split(";")[0].split("/")[1:-1]
  scopes, passes = [], set()
  for part in parts:
    while (match := _WRAPPED.match(part)) and match[1] in ("jvp", "transpose", "vmap"):
      passes.add(match[1])
      part = match[2]
    if part and part not in _NOT_A_SCOPE and not part.startswith(("jit(", "branch_")):
      scopes.append("blocks_*" if _LAYER.match(part) else part)
  direction = "backward" if "transpose" in passes else "forward" if "jvp" in passes else ""
  return " ".join(x for x in (direction, "/".join(scopes)) if x) or "(top level)"


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """Instruction name -> `source` of its op_name metadata, for every instruction of an HLO
  module's text that has one; each name also with "." and "-" as "_", as GPU kernels of
  fusions are named."""
  sources = {}
  for name, op_name in re.findall(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text):
    sources[name] = sources[re.sub(r"[.\-]", "_", name)] = source(op_name)
  return sources


def summarize(path: str, top: int = 20, hlo_text: str | None = None) -> list[dict]:
  """One dict per timeline that holds counted events (see the module docstring)."""
  sources = hlo_sources(hlo_text) if hlo_text else None
  timelines = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      total_ns, count, kernel, intervals = collections.Counter(), collections.Counter(), {}, []
      kind_ns, kind_count = collections.Counter(), collections.Counter()
      source_ns, source_count = collections.Counter(), collections.Counter()
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op is None and not on_device:
          continue
        key = event.name if op is None or op.startswith("command_buffer") else op
        total_ns[key] += event.duration_ns
        count[key] += 1
        kernel.setdefault(key, event.name)
        event_kind = kind(op, event.name)
        kind_ns[event_kind] += event.duration_ns
        kind_count[event_kind] += 1
        if sources is not None:
          where = sources.get(key, sources.get(event.name, "(no HLO op)"))
          source_ns[where] += event.duration_ns
          source_count[where] += 1
        intervals.append((event.start_ns, event.end_ns))
      if not intervals:
        continue
      timelines.append({
          "plane": plane.name, "line": line.name, **_extent(intervals),
          "top": [{"op": key, **({"kernel": kernel[key]} if kernel[key] != key else {}),
                   "count": count[key], "total_ms": ns / 1e6, "mean_us": ns / count[key] / 1e3}
                  for key, ns in total_ns.most_common(top)],
          "kinds": [{"kind": k, "count": kind_count[k], "total_ms": ns / 1e6}
                    for k, ns in kind_ns.most_common()],
          **({"sources": [{"source": k, "count": source_count[k], "total_ms": ns / 1e6}
                          for k, ns in source_ns.most_common()]} if sources is not None else {})})
  return timelines


def host_threads(path: str, top: int = 20) -> list[dict]:
  """One dict per host thread of a trace (lines of planes not named /device:...), busiest
  first: events, busy_ms and span_ms (as in `summarize`) and the `top` event names by total
  time (count, total_ms, mean_us). Nested events each count (a call's time includes its
  callees'). On an accelerator, where the host's time goes: dispatch (PjitFunction), the
  runtime's launches and waits (on a GPU, the CUDA API calls), Python."""
  threads = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    if plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      total_ns, count, intervals = collections.Counter(), collections.Counter(), []
      for event in line.events:
        total_ns[event.name] += event.duration_ns
        count[event.name] += 1
        intervals.append((event.start_ns, event.end_ns))
      if intervals:
        threads.append({
            "plane": plane.name, "line": line.name, **_extent(intervals),
            "top": [{"name": name, "count": count[name], "total_ms": ns / 1e6,
                     "mean_us": ns / count[name] / 1e3} for name, ns in total_ns.most_common(top)]})
  return sorted(threads, key=lambda t: -t["busy_ms"])


if __name__ == "__main__":
  from benchmarks import common
  parser = argparse.ArgumentParser(description="Summarize the newest jax.profiler trace.")
  parser.add_argument("trace_dir", help="The directory given to jax.profiler.trace.")
  parser.add_argument("--top", type=int, default=20, help="Groups listed per timeline.")
  args = parser.parse_args()
  for timeline in summarize(newest_trace(args.trace_dir), args.top):
    common.emit(timeline)
