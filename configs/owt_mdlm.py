"""MDLM on OpenWebText: one block of L = 1024 tokens (also the BD3-LM pre-training stage)."""

from configs import owt_bd3lm


def get_config():
  config = owt_bd3lm.get_config()
  config.block_size = config.length
  config.noise.clip_min = 1e-3
  config.noise.clip_max = 1.0
  config.noise.search_every = 0   # the interval search is for block diffusion
  return config
