"""Autoregressive baseline on LM1B: causal next-token prediction, no adaLN."""

from configs import lm1b_bd3lm


def get_config():
  config = lm1b_bd3lm.get_config()
  config.algo = "ar"
  config.block_size = 1
  config.noise.clip_min = 1e-3
  config.noise.clip_max = 1.0
  config.noise.search_every = 0   # the interval search is for block diffusion
  return config
