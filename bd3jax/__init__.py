"""bd3jax: Block Diffusion language models (BD3-LM) in JAX."""

__version__ = "0.1.0"
