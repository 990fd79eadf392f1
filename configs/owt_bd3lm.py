"""BD3-LM on OpenWebText as in the paper: L = 1024, L' = 16 (override block_size for 4 / 8), small model.

Tokenizer: GPT-2 BPE with an appended mask id 50257 (V = 50258); an EOS after every document and
no extra BOS/EOS at chunk boundaries. Recipe: pre-train at block_size = length (owt_mdlm.py), then
fine-tune here with --config.init_from=PRETRAIN_WORKDIR.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.length = 1024
  config.block_size = 16
  config.model = base.model_config("small")
  config.noise.clip_min = 0.3    # the paper's tuned interval for L' = 16
  config.noise.clip_max = 0.8
  config.data.wrap = "eos"
  config.train.batch_size = 512
  return config
