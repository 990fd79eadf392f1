"""Helpers shared by the test modules and tests/multidevice_checks.py."""

import jax
from jax import export

from benchmarks.common import value_and_grads  # noqa: F401  (the benchmarks' own, shared)

TRITON_CALL = "__gpu$xla.gpu.triton"


def lowered_for(platform_name, fn, *args) -> str:
  """The StableHLO module of jit(fn) lowered for another platform (no device of it needed)."""
  unchecked = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  return export.export(jax.jit(fn), platforms=[platform_name],
                       disabled_checks=unchecked)(*args).mlir_module()


def sub_jaxprs(eqn):
  """The jaxprs nested in one equation (loop bodies, branches, called functions)."""
  for param in eqn.params.values():
    for sub in param if isinstance(param, (tuple, list)) else (param,):
      sub = getattr(sub, "jaxpr", sub)
      if hasattr(sub, "eqns"):
        yield sub


def equations(jaxpr, branches: bool = True):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (loops, calls; the
  branches of a cond unless `branches` is False)."""
  for eqn in jaxpr.eqns:
    yield eqn
    if branches or eqn.primitive.name != "cond":
      for sub in sub_jaxprs(eqn):
        yield from equations(sub, branches)


def is_loop_or_branch(eqn) -> bool:
  """A `while`, a `cond`, or a `scan` that stays a loop (not fully unrolled when lowered)."""
  if eqn.primitive.name == "scan":
    return eqn.params["unroll"] < eqn.params["length"]
  return eqn.primitive.name in ("while", "cond")


def control_flow_depth(jaxpr) -> int:
  """How deeply loops and branches nest in `jaxpr` (0: none; a loop in a loop: 2)."""
  deepest = 0
  for eqn in jaxpr.eqns:
    own = is_loop_or_branch(eqn)
    inner = max((control_flow_depth(sub) for sub in sub_jaxprs(eqn)), default=0)
    deepest = max(deepest, own + inner)
  return deepest
