"""BD3-LM on LM1B as in the paper: L = 128, L' = 4 (override block_size for 8 / 16), small model.

Data: tfds `lm1b` (train / test) as ArrayRecord, read without TensorFlow; built once with
  tfds build lm1b --file_format=array_record    (tfds's LM1B builder needs tensorflow-cpu)
Tokenizer: bert-base-uncased WordPiece (mask id 103, V = 30522) from the hub, or offline from a
local copy: --config.data.tokenizer_path=DIR_WITH_VOCAB_TXT. LM1B chunks are [CLS] + 126 tokens + [SEP].
Tokenized on the fly in grain workers; or pre-tokenise once with
  python -m bd3jax.data.prepare --config=configs/lm1b_bd3lm.py --output=DIR
and train with --config.data.prepared_dir=DIR.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.length = 128
  config.block_size = 4
  config.model = base.model_config("small")
  config.noise.clip_min = 0.45   # the paper's tuned interval for L' = 4
  config.noise.clip_max = 0.95
  config.data.update(source="tfds", tfds_name="lm1b", train_split="train", valid_split="test",
                     tokenizer="bert", tokenizer_path="bert-base-uncased", wrap="bos_eos",
                     stream=True, num_workers=8)
  config.train.batch_size = 512
  config.noise.search_every = config.train.eval_every  # re-tune the interval at each evaluation
  return config
