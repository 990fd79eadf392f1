"""BD3-LM on OpenWebText as in the paper: L = 1024, L' = 16 (override block_size for 4 / 8), small model.

Data: Hugging Face OpenWebText, the last 100K documents held out as in the reference
(`pip install 'bd3jax[hf,gpt2]'`). Tokenizer: GPT-2 BPE with an appended mask id 50257
(V = 50258) from the hub, or offline from a directory with vocab.json + merges.txt (or a
gpt2.tiktoken file) via --config.data.tokenizer_path; an EOS after every document and no extra
BOS/EOS at chunk boundaries. Tokenized on the fly in grain workers; or pre-tokenise once with
  python -m bd3jax.data.prepare --config=configs/owt_bd3lm.py --output=DIR
and train with --config.data.prepared_dir=DIR.
Recipe: pre-train at block_size = length (owt_mdlm.py), then fine-tune here with
--config.init_from=PRETRAIN_WORKDIR.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.length = 1024
  config.block_size = 16
  config.model = base.model_config("small")
  config.noise.clip_min = 0.3    # the paper's tuned interval for L' = 16
  config.noise.clip_max = 0.8
  config.data.update(source="hf", hf_path="Skylion007/openwebtext", train_split="train[:-100000]",
                     valid_split="train[-100000:]", tokenizer="gpt2", tokenizer_path="gpt2",
                     wrap="eos", stream=True, num_workers=8)
  config.train.batch_size = 512
  config.noise.search_every = config.train.eval_every  # re-tune the interval at each evaluation
  return config
