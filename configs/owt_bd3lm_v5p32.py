"""BD3-LM on OpenWebText at the paper's scale on a TPU v5p-32 (16 chips on 4 hosts) or a v4-32.

  launch/tpu_vm.sh --name=bd3 --zone=us-east5-a --accelerator=v5p-32 --workdir=gs://BUCKET/owt \\
      -- --config=configs/owt_bd3lm_v5p32.py
  ... --config=configs/owt_bd3lm_v5p32.py:medium     # the 24-layer model

L = 1024, L' = 16, global batch 512, as configs/owt_bd3lm.py. The mesh is FSDP over all 16
chips: each holds 1/16 of the parameters, EMA and Adam moments. Each chip runs 32 sequences per
step, in micro-batches of 8 (small, about 62 GiB of the 95 GiB HBM) or 4 (medium, about 79 GiB);
the estimate is in launch/README.md. On a v4-32 (32 GiB per chip) use micro-batches of 2:
--config.train.grad_accum=16.
"""

from configs import base, owt_bd3lm

GRAD_ACCUM = {"small": 4, "medium": 8}


def get_config(size: str = "small"):
  config = owt_bd3lm.get_config()
  config.model = base.model_config(size)
  config.train.batch_size = 512
  config.train.grad_accum = GRAD_ACCUM[size]
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
