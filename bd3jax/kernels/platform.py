"""Which way a Pallas kernel runs on the current backend."""

import jax


def backend() -> str:
  """The default backend's platform: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


def interpret_by_default() -> bool:
  """Kernels run interpreted (a plain XLA program) on CPU, compiled elsewhere."""
  return backend() == "cpu"
