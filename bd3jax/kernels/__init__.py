"""Pallas kernels: attention for the BD3 masks and the fused residual LayerNorm (interpreted on
CPU, for tests)."""

from bd3jax.kernels.block_sparse import Launch, block_sparse_attention
from bd3jax.kernels.layer_norm import residual_layer_norm
from bd3jax.kernels.splash import splash_attention

__all__ = ["Launch", "block_sparse_attention", "residual_layer_norm", "splash_attention"]
