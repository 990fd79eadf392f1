"""Pre-tokenised data: a directory of ArrayRecord shards of packed rows, a manifest and the tokenizer.

Layout of DIR (written by `python -m bd3jax.data.prepare`):
  manifest.json     format, length, wrap, dtype, tokenizer summary, source settings, and per split
                    its shards (file, rows, min/max id), documents, rows, tokens, resume state
  tokenizer.bin     the serialized tokenizer (`tokenizer_from_bytes`), so no tokenizer files are needed
  train-00000.array_record, ..., validation-00000.array_record   one row of `length` ids per record
"""

import json
import os

from bd3jax.data.records import TokenRows
from bd3jax.data.tokenizers import Tokenizer, tokenizer_from_bytes

FORMAT = "bd3jax-prepared/1"
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.bin"
SPLITS = ("train", "validation")


def read_manifest(directory: str) -> dict | None:
  """The manifest of `directory`, or None if it has none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path} ({e}); prepare the data again into a new directory") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} manifest")
  return manifest


def write_manifest(directory: str, manifest: dict) -> None:
  """Replaces the manifest atomically (a crash leaves the old or the new one)."""
  path = os.path.join(directory, MANIFEST)
  with open(f"{path}.tmp", "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(f"{path}.tmp", path)


def _prepare_hint(directory: str) -> str:
  return f"python -m bd3jax.data.prepare --config=CONFIG --output={directory}"


def load(directory: str, *, length: int, wrap: str,
         tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenRows, TokenRows]:
  """(tokenizer, train rows, validation rows) of the prepared `directory` (config.data.prepared_dir).

  Refuses an incomplete preparation, another length or wrap style, and a `tokenizer` (e.g. a
  checkpoint's) that is not the one the data was made with.
  """
  manifest = read_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f"config.data.prepared_dir {directory!r} holds no {MANIFEST}; prepare the "
                            f"data first: {_prepare_hint(directory)}")
  if not manifest["complete"]:
    raise ValueError(f"the preparation in {directory} is incomplete (interrupted?); run the same "
                     "prepare command again to finish it")
  if (manifest["length"], manifest["wrap"]) != (length, wrap):
    raise ValueError(f"{directory} holds rows of length {manifest['length']} wrapped {manifest['wrap']!r} "
                     f"but config.length is {length} and config.data.wrap {wrap!r}; prepare the data "
                     "for this config into another directory")
  with open(os.path.join(directory, TOKENIZER), "rb") as f:
    stored = tokenizer_from_bytes(f.read())
  if tokenizer is not None and tokenizer.fingerprint() != stored.fingerprint():
    raise ValueError(f"{directory} was tokenized with a {stored.describe()}, not the checkpoint's "
                     f"{tokenizer.describe()}; prepare the data with the checkpoint's tokenizer or use "
                     "a new workdir")
  rows = []
  for split in SPLITS:
    shards = [s for s in manifest["splits"][split]["shards"] if s["rows"]]
    if not shards:
      raise ValueError(f"the {split} split of {directory} has no rows; prepare it again with more "
                       "text or a shorter config.length")
    if max(s["max_id"] for s in shards) >= stored.vocab_size:
      raise ValueError(f"the {split} split of {directory} holds ids beyond the tokenizer's "
                       f"{stored.vocab_size}; the preparation is damaged: prepare it again")
    rows.append(TokenRows([os.path.join(directory, s["file"]) for s in shards],
                          [s["rows"] for s in shards], manifest["length"], manifest["dtype"]))
  return stored, rows[0], rows[1]
