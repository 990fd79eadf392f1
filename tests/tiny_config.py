"""A tiny, fast config for the training-system tests (bundled demo corpus)."""

from configs import demo


def get_config():
  config = demo.get_config()
  config.length = 32
  config.block_size = 4
  config.model.update(n_layers=2, d_model=32, n_heads=2, cond_dim=16)
  config.data.vocab_size = 512
  t = config.train
  t.update(batch_size=4, num_steps=8, warmup_steps=2, log_every=1, eval_every=4,
           eval_batches=2, checkpoint_every=4, keep_checkpoints=10)
  config.noise.update(search_every=0, search_batches=2, search_widths=(0.8, 0.9))  # 9 intervals
  return config
