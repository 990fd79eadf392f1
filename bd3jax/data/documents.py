"""The training and held-out documents of `config.data.source`, as random-access sequences of str.

Sources: `demo` (bundled), `text` (.txt / .jsonl files, read into memory), `arrayrecord`
(ArrayRecord files of UTF-8 documents), `tfds` (`tfds.data_source`) and `hf` (Hugging Face
`datasets`). The last three are read lazily, record by record, so that grain workers share them.
"""

import glob
import os
from collections.abc import Sequence

import numpy as np

from bd3jax.data import hf_source, records, sources, tfds_source

SOURCES = ("demo", "text", "arrayrecord", "tfds", "hf")
# Fixed, so that runs with different config.seed share one validation set.
_SPLIT_SEED = 0


class TextRecords:
  """Documents of a random-access source of bytes, str or dicts (field `key`); invalid UTF-8 is replaced."""

  def __init__(self, records_source, key: str | None = None):
    self._source, self._key = records_source, key

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> str:
    record = self._source[int(index)]
    if self._key is not None:
      record = record[self._key]
    return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else record


class Subset:
  """The documents of `docs` at `indices`."""

  def __init__(self, docs: Sequence[str], indices: np.ndarray):
    self._docs, self._indices = docs, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> str:
    return self._docs[int(self._indices[index])]


def hold_out(docs: Sequence[str], valid_fraction: float) -> tuple[Sequence[str], Sequence[str]]:
  """Splits off a random `valid_fraction` of `docs` without reading them."""
  if isinstance(docs, list):
    return sources.split_documents(docs, valid_fraction, seed=_SPLIT_SEED)
  if not 0 < valid_fraction < 1:
    raise ValueError(f"valid_fraction {valid_fraction} must be in (0, 1), or name a held-out split")
  n_valid = max(1, round(len(docs) * valid_fraction))
  if n_valid >= len(docs):
    raise ValueError(f"cannot hold out {valid_fraction:.0%} of {len(docs)} document(s) for validation")
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(docs))
  return Subset(docs, np.sort(order[n_valid:])), Subset(docs, np.sort(order[:n_valid]))


def _arrayrecord_files(patterns: str, key: str) -> list[str]:
  paths = sorted({p for pattern in patterns.split(",") if pattern.strip()
                  for p in glob.glob(os.path.expanduser(pattern.strip()), recursive=True)})
  if not paths:
    raise FileNotFoundError(f"config.data.{key} {patterns!r} matches no ArrayRecord file")
  return paths


def _split(data, split: str, split_key: str) -> Sequence[str]:
  if data.source == "tfds":
    return TextRecords(tfds_source.data_source(data.tfds_name, split, data_dir=data.data_dir,
                                               split_key=split_key), data.text_key)
  if data.source == "hf":
    return TextRecords(hf_source.load_split(data.hf_path, data.hf_name, split, cache_dir=data.data_dir,
                                            text_key=data.text_key, split_key=split_key), data.text_key)
  return TextRecords(records.open_records(_arrayrecord_files(split, split_key)))


def load_documents(data) -> tuple[Sequence[str], Sequence[str], int]:
  """(train, valid, replaced characters) documents of `config.data` (`data`).

  The held-out documents come from `valid_files` / `valid_split`, or else a random
  `valid_fraction` of the training documents. Replaced characters are counted for text files only.
  """
  if data.source not in SOURCES:
    raise ValueError(f"unknown config.data.source {data.source!r}; use one of {SOURCES}")
  if data.source == "demo":
    return *hold_out(sources.demo_documents(), data.valid_fraction), 0
  if data.source == "text":
    train, n_replaced = sources.read_documents(data.train_files, data.text_key)
    if not data.valid_files:
      return *hold_out(train, data.valid_fraction), n_replaced
    valid, n_valid_replaced = sources.read_documents(data.valid_files, data.text_key)
    return train, valid, n_replaced + n_valid_replaced
  name_key = {"tfds": "tfds_name", "hf": "hf_path"}.get(data.source)
  if name_key and not data[name_key]:
    raise ValueError(f"config.data.source {data.source!r} needs config.data.{name_key}")
  by_name = name_key is not None
  train_key, valid_key = ("train_split", "valid_split") if by_name else ("train_files", "valid_files")
  if not data[train_key]:
    raise ValueError(f"config.data.source {data.source!r} needs config.data.{train_key}")
  train = _split(data, data[train_key], train_key)
  if len(train) == 0:
    raise ValueError(f"config.data.{train_key} {data[train_key]!r} holds no documents")
  if not data[valid_key]:
    return *hold_out(train, data.valid_fraction), 0
  valid = _split(data, data[valid_key], valid_key)
  if len(valid) == 0:
    raise ValueError(f"config.data.{valid_key} {data[valid_key]!r} holds no documents")
  return train, valid, 0
