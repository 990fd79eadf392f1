"""Helpers shared by the test modules and tests/multidevice_checks.py."""

from benchmarks.common import value_and_grads  # noqa: F401  (the benchmarks' own, shared)


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (loops, calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from equations(sub)
