"""Metric writing: TensorBoard event files and a metrics.jsonl, both in the workdir."""

import json

import numpy as np
from etils import epath

MAX_BLOCK_SCALARS = 64  # NELBO per block position is binned to at most this many curves


class MetricWriter:
  """Writes scalars to TensorBoard and one JSON line per write to `WORKDIR/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self._tb = SummaryWriter(str(workdir))
    self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")

  def write(self, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def block_scalars(prefix: str, block_nelbo_N) -> dict:
  """NELBO per block position as scalars, binned to at most MAX_BLOCK_SCALARS positions."""
  values = np.asarray(block_nelbo_N, np.float64)
  bins = np.array_split(values, min(len(values), MAX_BLOCK_SCALARS))
  width = len(str(len(values) - 1))
  out, start = {}, 0
  for b in bins:
    out[f"{prefix}/{start:0{width}d}"] = b.mean()
    start += len(b)
  return out


def read_scalars(workdir: str, name: str) -> dict[int, float]:
  """The last value logged for `name` at each step in WORKDIR/metrics.jsonl (a resumed run
  re-logs the steps it replays)."""
  out = {}
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    for row in map(json.loads, f):
      if name in row:
        out[row["step"]] = row[name]
  return out
