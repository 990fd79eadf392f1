"""A tiny BD3-LM on the bundled Python documentation: trains on a laptop CPU in minutes."""

from configs import base


def get_config():
  config = base.get_config()
  config.length = 128
  config.block_size = 8
  # Smaller than the reference's "tiny" so that a 2-core CPU runs ~1.5 steps/s.
  config.model = base.model_config("tiny")
  config.model.update(n_layers=4, d_model=128, n_heads=4, cond_dim=64, dtype="float32")
  config.noise.clip_min = 0.3
  config.noise.clip_max = 0.8
  config.noise.search_every = 100   # re-tune the interval (bd3jax.clip_search) at each evaluation
  config.noise.search_batches = 4
  config.data.source = "demo"
  config.data.vocab_size = 2048
  config.data.wrap = "bos_eos"
  t = config.train
  t.batch_size = 16
  t.num_steps = 300
  t.lr = 1e-3
  t.warmup_steps = 100
  t.log_every = 20
  t.eval_every = 100
  t.eval_batches = 8
  t.checkpoint_every = 100
  t.keep_checkpoints = 2
  config.sample.steps = 8
  return config
