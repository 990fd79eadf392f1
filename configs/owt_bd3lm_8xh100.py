"""BD3-LM on OpenWebText at the paper's scale on one node of 8 H100 GPUs (or several nodes).

  launch/gpu_slurm.sh --nodes=1 --workdir=/shared/owt -- --config=configs/owt_bd3lm_8xh100.py
  ... --config=configs/owt_bd3lm_8xh100.py:medium     # the 24-layer model

L = 1024, L' = 16, global batch 512, as configs/owt_bd3lm.py, with cuDNN fused attention. The
mesh is FSDP over the 8 GPUs of a node (NVLink) and data parallelism across nodes (data = -1:
one per node). On one node each GPU runs 64 sequences per step, in micro-batches of 16 (small,
about 58 GiB) or 4 (medium, about 38 GiB); the estimate is in launch/README.md. With N nodes,
divide train.grad_accum by N.
"""

from configs import base, owt_bd3lm

GRAD_ACCUM = {"small": 4, "medium": 16}


def get_config(size: str = "small"):
  config = owt_bd3lm.get_config()
  config.model = base.model_config(size)
  config.model.attention = "cudnn"
  config.train.batch_size = 512
  config.train.grad_accum = GRAD_ACCUM[size]
  config.mesh.update(data=-1, fsdp=8, tensor=1)
  return config
