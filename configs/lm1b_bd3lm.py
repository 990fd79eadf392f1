"""BD3-LM on LM1B as in the paper: L = 128, L' = 4 (override block_size for 8 / 16), small model.

Tokenizer: bert-base-uncased wordpiece (mask id 103); LM1B chunks are [CLS] + 126 tokens + [SEP].
The LM1B data source and BERT tokenizer are configured by data.source / data.tokenizer_path.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.length = 128
  config.block_size = 4
  config.model = base.model_config("small")
  config.noise.clip_min = 0.45   # the paper's tuned interval for L' = 4
  config.noise.clip_max = 0.95
  config.data.wrap = "bos_eos"
  config.train.batch_size = 512
  return config
