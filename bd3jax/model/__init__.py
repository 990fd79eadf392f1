"""The BD3-LM network and its attention implementations."""

from bd3jax.model.attention import attention, dense_attention
from bd3jax.model.transformer import DiT, ModelConfig

__all__ = ["DiT", "ModelConfig", "attention", "dense_attention"]
