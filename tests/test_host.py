"""bd3jax.host: malloc keeps freed memory, so re-allocating a large buffer does not page-fault."""

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
from bd3jax import host
kept = host.keep_freed_memory() if sys.argv[1] == "keep" else None
import numpy as np
np.ones(1 << 23).sum()  # 64 MiB, allocated and freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  np.ones(1 << 23).sum()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(mode: str) -> tuple[str, int]:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True,
                       text=True).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_refaulting_large_buffers():
  _, default_faults = _faults("default")
  kept, kept_faults = _faults("keep")
  assert kept == "True"
  assert default_faults > 100  # fresh pages on every allocation with glibc's defaults
  assert kept_faults < default_faults // 20
