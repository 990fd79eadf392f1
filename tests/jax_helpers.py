"""Helpers shared by the test modules and tests/multidevice_checks.py."""

import jax


def value_and_grads(attend, q, k, v, do):
  """The output and (dq, dk, dv) of sum(attend(q, k, v) * do)."""
  o, vjp = jax.vjp(attend, q, k, v)
  return o, vjp(do)


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (loops, calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from equations(sub)
