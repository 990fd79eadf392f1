"""Process-level settings of the host that runs XLA. Imports nothing heavy; call before jax."""

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_KEEP = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30),
         (_M_TOP_PAD, 1 << 28))


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

  XLA on CPU allocates and frees its large temporaries on every step. With glibc's defaults
  (one arena per thread, blocks above a dynamic threshold mmap-ed, freed tops trimmed) each
  step page-faults them back in: on the demo config, ~139k minor faults and a third of the
  step in the kernel. Here: one arena, no mmap below 1 GiB, no trimming below 1 GiB (a 256 MiB
  pad). The process then keeps its peak heap, and XLA compiles run slower (one arena for all
  compiler threads: the demo's train step compiles in ~15 s instead of ~11 s on 2 cores), so it
  pays for runs of many steps, not for compile-bound work such as a test suite. Call it first
  thing, before jax starts threads.
  Returns False (and changes nothing) where the C library is not glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl has no mallopt
    return False
  return all(mallopt(param, value) == 1 for param, value in _KEEP)
