"""launch/: the dry runs print the exact commands; shellcheck passes on the scripts (and on
benchmarks/gpu.sh)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


# As outside a SLURM allocation, with JAX's default GPU memory fraction.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("SLURM_JOB_ID", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS")}


def dry_run(script: str, *args, env=None) -> list[str]:
  proc = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True,
                        text=True, timeout=60, env={**ENV, **(env or {})})
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def test_tpu_vm_creates_installs_trains_on_every_worker_and_tears_down():
  lines = dry_run("tpu_vm.sh", "--name=bd3", "--zone=us-east5-a", "--accelerator=v5p-32",
                  "--workdir=gs://bucket/owt", "--", "--config=configs/owt_bd3lm_v5p32.py",
                  "--config.data.train_files=a b.txt")
  assert lines[0] == ("gcloud compute tpus tpu-vm create bd3 --accelerator-type=v5p-32 "
                      "--version=v2-alpha-tpuv5 --zone=us-east5-a")
  assert lines[1].startswith("git -C ") and lines[1].endswith(" HEAD")
  assert lines[2].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[2]
  assert "--worker=all" in lines[3] and "pip install -q -e bd3jax" in lines[3]
  assert lines[4] == (
      "gcloud compute tpus tpu-vm ssh bd3 --worker=all --zone=us-east5-a '--command=cd bd3jax && "
      "python3 main.py --distributed=on --workdir=gs://bucket/owt "
      "--config=configs/owt_bd3lm_v5p32.py '\\''--config.data.train_files=a b.txt'\\'''")
  assert lines[5] == "gcloud compute tpus tpu-vm delete bd3 --quiet --zone=us-east5-a"
  assert len(lines) == 6


def test_tpu_queued_resource_steps():
  lines = dry_run("tpu_vm.sh", "--name=bd3", "--zone=us-central2-b", "--accelerator=v4-32",
                  "--workdir=gs://b/r", "--queued", "--spot", "--project=p", "create", "delete")
  assert lines[0] == ("gcloud compute tpus queued-resources create bd3 --node-id=bd3 "
                      "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot "
                      "--zone=us-central2-b --project=p")
  assert lines[-1] == ("gcloud compute tpus queued-resources delete bd3 --force --quiet "
                       "--zone=us-central2-b --project=p")


@pytest.mark.parametrize("args,message", [
    (["--name=a", "--zone=z", "--accelerator=v5p-32", "--workdir=/tmp/run"],
     "must be a gs:// path"),
    (["--name=a", "--zone=z", "--accelerator=v9-8", "--workdir=gs://b/r"], "pass --version"),
    (["--zone=z", "--accelerator=v5p-32", "--workdir=gs://b/r"], "--name is required"),
])
def test_tpu_vm_refuses_bad_arguments(args, message):
  proc = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", *args],
                        capture_output=True, text=True, timeout=60, env=ENV)
  assert proc.returncode == 2 and message in proc.stderr


def test_gpu_slurm_runs_one_process_per_gpu():
  lines = dry_run("gpu_slurm.sh", "--nodes=2", "--partition=gpu", "--time=24:00:00",
                  "--workdir=/shared/owt", "--", "--config=configs/owt_bd3lm_8xh100.py")
  srun = next(line for line in lines if line.startswith("srun "))
  assert srun.startswith("srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 --chdir=")
  assert (" --export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.9,"
          "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false " in srun)
  assert srun.endswith(" python3 main.py --distributed=on --workdir=/shared/owt "
                       "--config=configs/owt_bd3lm_8xh100.py")
  sbatch = next(line for line in lines if line.startswith("sbatch "))
  assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in sbatch
  assert "--partition=gpu" in sbatch and "--time=24:00:00" in sbatch
  assert sbatch.endswith("gpu_slurm.sh --nodes=2 --partition=gpu --time=24:00:00 "
                         "--workdir=/shared/owt -- --config=configs/owt_bd3lm_8xh100.py")


def test_gpu_slurm_keeps_the_users_xla_flags():
  lines = dry_run("gpu_slurm.sh", "--workdir=/shared/owt", env={"XLA_FLAGS": "--xla_dump_to=/d"})
  srun = next(line for line in lines if line.startswith("srun "))
  assert " --export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 " in srun


def test_gpu_slurm_needs_a_workdir():
  proc = subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sh"), "--dry-run"], capture_output=True,
                        text=True, timeout=60, env=ENV)
  assert proc.returncode == 2 and "--workdir is required" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS + [LAUNCH.parent / "benchmarks" / "gpu.sh"],
                         ids=lambda p: p.name)
def test_shellcheck(script):
  proc = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout
