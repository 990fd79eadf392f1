"""Tokenizer files from the Hugging Face hub (online only; needs `pip install 'bd3jax[hf]'`)."""

import os
from collections.abc import Sequence


def download(repo_id: str, filenames: Sequence[str], optional: Sequence[str] = ()) -> str:
  """The local directory holding `filenames` (and whichever of `optional` exist) of `repo_id`."""
  hint = ("or set config.data.tokenizer_path to a local copy of the files "
          f"({', '.join(filenames)}) to work offline")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"config.data.tokenizer_path {repo_id!r} is not a local path; install "
                     f"huggingface_hub (pip install 'bd3jax[hf]') to download it from the hub, {hint}") from None
  paths = []
  for name in (*filenames, *optional):
    try:
      paths.append(huggingface_hub.hf_hub_download(repo_id, name))
    except Exception as e:  # offline, unknown repo, missing file, ...: all reported the same way
      if name in optional:
        continue
      raise ValueError(f"cannot get {name} of {repo_id!r} from the Hugging Face hub "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the "
                       f"name and the network, {hint}") from None
  return os.path.dirname(paths[0])
