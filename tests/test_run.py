import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config

from bd3jax import checkpoint, diffusion, metrics, run, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).with_name("tiny_config.py"))


def losses(workdir) -> dict[int, float]:
  return metrics.read_scalars(workdir, "train/loss")


def main_py(workdir, *overrides, **popen):
  cmd = [sys.executable, str(ROOT / "main.py"), f"--config={TINY}", f"--workdir={workdir}", *overrides]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


def finished_checkpoints(workdir) -> list[int]:
  root = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def wait_for_step(workdir, step, proc, *, checkpointed=False, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if ((Path(workdir) / "metrics.jsonl").exists() and max(losses(workdir), default=0) >= step
        and (finished_checkpoints(workdir) or not checkpointed)):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.02)
  raise TimeoutError(f"step {step} not reached")


def test_killed_run_resumes_bit_identically(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  search = "--config.noise.search_every=8"  # the resume crosses a noise-interval search
  a = main_py(full, "--config.train.num_steps=16", search)
  out, _ = a.communicate(timeout=600)
  assert a.returncode == 0, out
  assert "perplexity" in out and "samples written to" in out
  samples = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == tiny_config.get_config().sample.num_samples
  assert all(1 <= row["length"] <= 32 and row["tokens"][0] == 2 for row in samples)  # BOS first
  reference = losses(full)
  assert sorted(reference) == list(range(1, 17))
  assert list(metrics.read_scalars(full, "noise/clip_min")) == [8, 16]

  b = main_py(killed, "--config.train.num_steps=100000", search)
  wait_for_step(killed, 6, b, checkpointed=True)
  b.kill()
  b.wait()
  resumed_from = checkpoint.Checkpointer(str(killed)).latest_step
  assert resumed_from is not None and 4 <= resumed_from < 16
  c = main_py(killed, "--config.train.num_steps=16", search)
  out, _ = c.communicate(timeout=600)
  assert c.returncode == 0, out
  assert f"resumed from the checkpoint of step {resumed_from}" in out
  assert losses(killed) == reference  # exact float equality, step by step


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  p = main_py(tmp_path, "--config.train.num_steps=100000")
  wait_for_step(tmp_path, 3, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  saved = checkpoint.Checkpointer(str(tmp_path)).latest_step
  assert saved == max(losses(tmp_path)) and saved >= 3
  assert "preempted" in out


def test_main_help_and_overrides(tmp_path):
  help_out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert "--workdir" in help_out.stdout and "--mode" in help_out.stdout
  bad = main_py(tmp_path, "--config.block_size=5")
  out, _ = bad.communicate(timeout=300)
  assert bad.returncode != 0 and "block_size 5 does not divide length 32" in out
  assert "Traceback" not in out


def tiny(**train_overrides):
  config = tiny_config.get_config()
  config.train.update(**train_overrides)
  return config


def test_refuses_a_workdir_of_another_architecture(tmp_path):
  run.train_and_evaluate(tiny(num_steps=2, checkpoint_every=2), str(tmp_path))
  other = tiny(num_steps=4)
  other.model.d_model = 64
  with pytest.raises(checkpoint.CheckpointError, match=r"model.d_model: checkpoint 32, config 64"):
    run.train_and_evaluate(other, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step == 2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  original = ocp.CheckpointManager.save
  def failing_save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "No space left on device")
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(checkpoint.CheckpointError, match="step 4 failed .*step 2 is intact"):
    run.train_and_evaluate(tiny(num_steps=6, checkpoint_every=2), str(tmp_path))
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  result = run.train_and_evaluate(tiny(num_steps=6, checkpoint_every=2), str(tmp_path))
  assert result["step"] == 6 and np.isfinite(result["ppl"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  original = train.train_step
  def poisoned(task, state, batch):
    new_state, metrics = original(task, state, batch)
    return new_state, dict(metrics, loss=jnp.where(state.step >= 4, jnp.nan, metrics["loss"]))
  monkeypatch.setattr(train, "train_step", poisoned)
  with pytest.raises(run.NonFiniteLossError, match="at step 5; .*last good checkpoint is step 4"):
    run.train_and_evaluate(tiny(num_steps=8, checkpoint_every=4, log_every=2), str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step == 4


def test_init_from_takes_the_ema_parameters(tmp_path):
  source = tmp_path / "pretrain"
  run.train_and_evaluate(tiny(num_steps=2, checkpoint_every=2), str(source))
  config = tiny()
  config.block_size = 8
  config.init_from = str(source)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "finetune"))
  s = run.setup(config, str(tmp_path / "finetune"), ckpt)
  ckpt.close()
  assert s.start_step == 0 and int(s.state.step) == 0
  source_ckpt = checkpoint.Checkpointer(str(source))
  abstract = jax.eval_shape(lambda: s.state)
  saved = source_ckpt.restore(2, abstract, run.setup(tiny(), str(source), source_ckpt).train_iter)
  source_ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, s.state.params, saved.ema_params)


def test_eval_mode_is_deterministic(tmp_path):
  config = tiny(num_steps=2, checkpoint_every=2)
  run.train_and_evaluate(config, str(tmp_path))
  first = run.evaluate_workdir(config, str(tmp_path))
  second = run.evaluate_workdir(config, str(tmp_path))
  assert first.pop("tokens_per_s") > 0 and second.pop("tokens_per_s") > 0
  assert first == second and first["step"] == 2 and np.isfinite(first["nelbo"])
  assert first["nelbo_se"] == 0.0
  config.train.eval_draws = 3
  third = run.evaluate_workdir(config, str(tmp_path))
  assert third["nelbo_se"] > 0 and third["tokens"] == first["tokens"]
  assert abs(third["nelbo"] - first["nelbo"]) < 5 * third["nelbo_se"] * np.sqrt(3)


def test_train_step_follows_the_noise_interval(tmp_path, monkeypatch):
  """The loss's logits are sized for the state's noise interval: a train step compiled for the
  configured interval, and one more for each interval the search moves training to that needs
  another number of tokens per pair of rows."""
  built = []
  jit_train_step = train.jit_train_step

  def recording(task, *shardings):
    built.append(task.loss_cfg)
    return jit_train_step(task, *shardings)
  monkeypatch.setattr(train, "jit_train_step", recording)
  config = tiny(num_steps=12, eval_every=12, checkpoint_every=12)
  config.noise.update(search_every=4, clip_min=1e-3, clip_max=1.0)  # the grid's widest
  run.train_and_evaluate(config, str(tmp_path))
  lo, hi = (metrics.read_scalars(tmp_path, f"noise/{k}") for k in ("clip_min", "clip_max"))
  used = [(config.noise.clip_min, config.noise.clip_max)] + [(lo[s], hi[s]) for s in sorted(lo)]
  batch = config.train.batch_size
  capacity = lambda cfg: diffusion.masked_capacity(cfg, batch, interval_given=True)
  needed = [capacity(dataclasses.replace(built[0], logits_interval=i)) for i in used]
  assert len(set(needed)) >= 2  # the search moved training to an interval of another size
  assert [capacity(cfg) for cfg in built] == list(dict.fromkeys(needed))

