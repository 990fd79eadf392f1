import numpy as np
import pytest

from bd3jax import config as config_lib
from configs import base


def make(**overrides):
  config = base.get_config()
  config.model = base.model_config("tiny")
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def test_base_config_is_valid():
  config_lib.validate(make())


@pytest.mark.parametrize("overrides,message", [
    ({"block_size": 5}, "block_size 5 does not divide length 1024"),
    ({"model.n_heads": 7}, "model.n_heads 7 does not divide model.d_model 256"),
    ({"algo": "sedd"}, "algo 'sedd'"),
    ({"algo": "ar"}, "block_size 16 must be 1 for algo 'ar'"),
    ({"model.attention": "flash"}, "model.attention 'flash'"),
    ({"noise.schedule": "quartic"}, "noise.schedule 'quartic'"),
    ({"noise.clip_min": 0.9, "noise.clip_max": 0.5}, "noise.clip_min 0.9"),
    ({"block_size": 1, "noise.clip_min": 0.3, "noise.clip_max": 0.8}, "no masked fraction k/1"),
    ({"model.time_conditioning": True}, "model.time_conditioning"),
    ({"train.grad_accum": 3}, "train.grad_accum 3 must divide train.batch_size 512"),
    ({"model.dtype": "int8"}, "model.dtype 'int8'"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
    config_lib.validate(make(**overrides))


def test_validate_tokens():
  tokens = np.array([[1, 2, 3]])
  config_lib.validate_tokens(tokens, vocab_size=10, mask_id=9)
  with pytest.raises(ValueError, match=r"span \[1, 12\] but the vocabulary has 10"):
    config_lib.validate_tokens(np.array([[1, 12]]), vocab_size=10, mask_id=9)
  with pytest.raises(ValueError, match="mask id 3 collides with a real token"):
    config_lib.validate_tokens(tokens, vocab_size=10, mask_id=3)
  with pytest.raises(ValueError, match="mask id 10 is outside"):
    config_lib.validate_tokens(tokens, vocab_size=10, mask_id=10)


@pytest.mark.parametrize("name", ["demo", "lm1b_bd3lm", "lm1b_mdlm", "lm1b_ar", "owt_bd3lm",
                                  "owt_mdlm", "owt_ar"])
def test_shipped_configs_are_valid(name):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)
  if name.endswith("_ar"):
    assert config.algo == "ar" and config.block_size == 1
  if name.endswith("_mdlm"):
    assert config.block_size == config.length
