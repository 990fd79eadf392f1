"""Pallas attention kernels for the BD3 masks (interpreted on CPU, for tests)."""

from bd3jax.kernels.block_sparse import Launch, block_sparse_attention
from bd3jax.kernels.splash import splash_attention

__all__ = ["Launch", "block_sparse_attention", "splash_attention"]
