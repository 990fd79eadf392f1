import os
from pathlib import Path

import nbformat
import tiny_config
from nbclient import NotebookClient

from bd3jax import run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inference.ipynb"


def test_inference_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
  config = tiny_config.get_config()
  config.train.update(num_steps=4, checkpoint_every=4)
  workdir = tmp_path / "run"
  run.train_and_evaluate(config, str(workdir))
  monkeypatch.setenv("BD3JAX_MODEL", str(workdir))
  monkeypatch.setenv("BD3JAX_NUM_SAMPLES", "2")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                               os.environ.get("PYTHONPATH")])))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "perplexity <=" in outputs and "tokens/s" in outputs
  assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
