"""ArrayRecord files: writing records atomically, and token rows read back by random access."""

import os
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from array_record.python import array_record_module

# One record per group: random access reads exactly one record. Token ids hardly compress.
WRITER_OPTIONS = "group_size:1,uncompressed"


def write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes `records` to `path` through a temporary file renamed at the end; returns the count."""
  tmp = f"{path}.tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  n = 0
  try:
    for record in records:
      writer.write(record)
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


def count_records(path: str) -> int:
  """Number of records in the ArrayRecord file `path`, with a clear error for a missing or broken file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ArrayRecord file {path} is missing")
  try:
    reader = array_record_module.ArrayRecordReader(path)
    n = reader.num_records()
    reader.close()
  except (RuntimeError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable ArrayRecord file ({e})") from None
  return n


class RecordFiles:
  """Random access to the records (bytes) of ArrayRecord files, numbered across the files in order.

  Readers open lazily (so the object pickles into grain workers) and read with no read-ahead.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int], buffer_bytes: int = 4096):
    self._paths, self._buffer_bytes = list(paths), buffer_bytes
    self._ends = np.cumsum(counts, dtype=np.int64)
    self._readers = [None] * len(self._paths)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getstate__(self):
    return {"paths": self._paths, "ends": self._ends, "buffer_bytes": self._buffer_bytes}

  def __setstate__(self, state):
    self._paths, self._ends, self._buffer_bytes = state["paths"], state["ends"], state["buffer_bytes"]
    self._readers = [None] * len(self._paths)
    self._lock = threading.Lock()

  def _reader(self, i: int):
    with self._lock:
      if self._readers[i] is None:
        self._readers[i] = array_record_module.ArrayRecordReader(
            self._paths[i], options="readahead_buffer_size:0",
            file_reader_buffer_size=self._buffer_bytes)
      return self._readers[i]

  def read(self, indices: np.ndarray) -> list[bytes]:
    """The records at `indices` (in [0, len)), in that order."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and not 0 <= indices.min() <= indices.max() < len(self):
      raise IndexError(f"record indices span [{indices.min()}, {indices.max()}] outside [0, {len(self)})")
    files = np.searchsorted(self._ends, indices, side="right")
    out = [b""] * len(indices)
    for f in np.unique(files):
      where = np.flatnonzero(files == f)
      start = self._ends[f - 1] if f else 0
      for k, record in zip(where, self._reader(f).read((indices[where] - start).tolist())):
        out[k] = record
    return out

  def __getitem__(self, index: int) -> bytes:
    return self.read([index])[0]


def open_records(paths: Sequence[str], counts: Sequence[int] | None = None,
                 buffer_bytes: int = 4096) -> RecordFiles:
  """The records of `paths`; refuses a missing, unreadable or empty file, and a file whose
  record count differs from `counts` (when given)."""
  found = [count_records(p) for p in paths]
  for i, (path, n) in enumerate(zip(paths, found)):
    if counts is not None and n != counts[i]:
      raise ValueError(f"{path} holds {n} records but the manifest says {counts[i]}; the prepared "
                       "data is damaged: prepare it again into a new directory")
    if n == 0:
      raise ValueError(f"{path} holds no records; remove it or write it again")
  return RecordFiles(paths, found, buffer_bytes)


class TokenRows:
  """Rows of `length` token ids, one row per ArrayRecord record (little-endian `dtype` bytes).

  Random access like an int32 array `[N, L]`: `rows[i]`, `rows[a:b]`, `rows.take(indices)`;
  `np.asarray(rows)` reads them all.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int], length: int, dtype: str):
    self._length, self._dtype = length, np.dtype(dtype).newbyteorder("<")
    row_bytes = length * self._dtype.itemsize
    self._source = open_records(paths, counts, buffer_bytes=max(4096, 1 << (2 * row_bytes - 1).bit_length()))
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self._source)

  @property
  def shape(self) -> tuple[int, int]:
    return len(self), self._length

  dtype = np.dtype(np.int32)
  ndim = 2

  def take(self, indices) -> np.ndarray:
    """int32 [len(indices), L]: the rows at `indices`, read in one batched call."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    flat = np.frombuffer(b"".join(self._source.read(indices)), self._dtype)
    if flat.size != len(indices) * self._length:
      raise ValueError(f"a record of {', '.join(self.paths[:3])}... does not hold {self._length} "
                       f"{self._dtype.name} token ids; the prepared data is damaged, prepare it again")
    return flat.astype(np.int32).reshape(len(indices), self._length)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.take(range(*index.indices(len(self))))
    if not -len(self) <= index < len(self):
      raise IndexError(f"row {index} of {len(self)}")
    return self.take([index % len(self)])[0]

  def __array__(self, dtype=None, copy=None):
    rows = self.take(range(len(self)))
    return rows if dtype is None else rows.astype(dtype)
