"""Orbax checkpoints: train state, data-iterator state, config and tokenizer travel together.

Layout: `WORKDIR/checkpoints/<step>/{state, data_iter, meta}`. Saves are asynchronous and
atomic (orbax writes a temporary directory and renames it), so a failed or interrupted save
leaves the previous checkpoint usable. `gs://` workdirs work where etils can reach GCS.
"""

import base64
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Config keys that change the parameters' shapes; a workdir refuses a run that differs in any.
ARCHITECTURE_KEYS = ("algo", "model.n_layers", "model.d_model", "model.n_heads", "model.cond_dim",
                     "model.mlp_ratio")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used or written, with what to do about it."""


def architecture(config, vocab_size: int) -> dict[str, Any]:
  out = {"vocab_size": vocab_size}
  for key in ARCHITECTURE_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]
    out[key] = node
  return out


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


class Checkpointer:
  """Saves and restores one run's checkpoints under `WORKDIR/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self._dir = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self._dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iter, config, tokenizer, extra: dict | None = None) -> None:
    """Starts an asynchronous save of everything needed to resume at `step`."""
    import grain  # only the training loop's checkpoints carry an iterator
    meta = {
        "config": config.to_dict(),
        "architecture": architecture(config, tokenizer.vocab_size),
        "tokenizer": base64.b64encode(tokenizer.serialize()).decode("ascii"),
        **(extra or {}),
    }
    previous = self._manager.latest_step()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax raises OSError, ValueError, ... depending on the cause
      raise CheckpointError(f"saving the checkpoint of step {step} failed ({e}); the checkpoint "
                            f"of step {previous} is intact") from e

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"finishing a checkpoint save failed ({e}); earlier checkpoints are "
                            "intact") from e

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state, data_iter):
    """Restores the state (onto `abstract_state`'s shapes and shardings, whatever mesh saved
    it) and the iterator in place. An iterator saved by another number of processes cannot be
    resumed: the data order then restarts, with a warning."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    process, count = jax.process_index(), jax.process_count()
    if (self._dir / str(step) / "data_iter" / f"process_{process}-of-{count}.json").exists():
      items["data_iter"] = _grain_restore(data_iter)
    else:
      logging.warning("the checkpoint of step %d holds no data-iterator state for %d processes; "
                      "the data order restarts from its beginning", step, count)
    return self._manager.restore(step, args=ocp.args.Composite(**items)).state

  def close(self) -> None:
    self._manager.close()


def _grain_restore(data_iter):
  import grain
  return grain.checkpoint.CheckpointRestore(data_iter)


def check_architecture(meta: dict, config, vocab_size: int, where: str) -> None:
  """Refuses a checkpoint whose parameter shapes differ from what `config` builds."""
  saved, current = meta["architecture"], architecture(config, vocab_size)
  diff = [f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
          for k in current if saved.get(k) != current[k]]
  if diff:
    raise CheckpointError(
        f"{where} holds a checkpoint of a different architecture ({'; '.join(diff)}); use another "
        "workdir, or --config.init_from to start from compatible parameters")


def tokenizer_from_meta(meta: dict):
  """The tokenizer saved with a checkpoint (any kind: sentencepiece, GPT-2 BPE, BERT WordPiece)."""
  from bd3jax.data import tokenizer_from_bytes
  return tokenizer_from_bytes(base64.b64decode(meta["tokenizer"]))


def _read_only_manager(path: str) -> ocp.CheckpointManager:
  root = epath.Path(path)
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  if not root.exists():
    raise CheckpointError(f"{path} does not exist; give a workdir or its checkpoints directory")
  return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0))


def _latest_step(manager, path) -> int:
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint found under {path}")
  return step


def read_meta(path: str) -> dict:
  """The metadata (config, architecture, tokenizer) of the latest checkpoint under `path`."""
  manager = _read_only_manager(path)
  try:
    step = _latest_step(manager, path)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()


def load_params(path: str, abstract_state, config, vocab_size: int, *, ema: bool = True):
  """Parameters (EMA by default) of the latest checkpoint under `path` (a workdir or its
  checkpoints directory). `abstract_state` gives the shapes (and shardings) of the TrainState
  that `config` builds; a checkpoint of another architecture is refused.
  """
  check_architecture(read_meta(path), config, vocab_size, where=str(path))
  manager = _read_only_manager(path)
  try:
    step = _latest_step(manager, path)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state
  finally:
    manager.close()
  logging.info("loaded the %s parameters of step %d from %s", "EMA" if ema else "raw", step, path)
  return state.ema_params if ema else state.params
