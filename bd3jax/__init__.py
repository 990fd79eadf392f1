"""bd3jax: Block Diffusion language models (BD3-LM) in JAX."""

__version__ = "0.1.0"
__all__ = ["BD3LM"]


def __getattr__(name):
  # Imported on first use, so that `import bd3jax` stays light.
  if name == "BD3LM":
    from bd3jax.api import BD3LM
    return BD3LM
  raise AttributeError(f"module 'bd3jax' has no attribute {name!r}")
