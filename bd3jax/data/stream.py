"""On-the-fly tokenisation: documents -> (grain worker processes) token chunks -> packed rows.

Workers tokenize chunks of documents into one id stream each (an EOS after every document);
the main process cuts the stream into rows exactly as `wrap_documents` does. Rows therefore do
not depend on the number of workers, and the iterator state (a position in the document order
plus a token offset) resumes exactly.
"""

import collections
import dataclasses
import itertools
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from bd3jax.data.tokenizers import Tokenizer

DOCS_PER_CHUNK = 64
WRAP_STYLES = ("bos_eos", "eos")


def body_length(seq_len: int, style: str) -> int:
  """Stream tokens per row: L - 2 for "bos_eos" (BOS and EOS added), L for "eos"."""
  if style not in WRAP_STYLES:
    raise ValueError(f"unknown wrap style {style!r}; config.data.wrap must be one of {WRAP_STYLES}")
  body = seq_len - 2 if style == "bos_eos" else seq_len
  if body < 1:
    raise ValueError(f"sequence length {seq_len} is too short for wrap style {style!r}")
  return body


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Training rows made on the fly from `docs`: what `make_train_iterator` reads for streamed sources.

  It has no array form: its token ids come from `tokenizer`, which never produces the mask id.
  """
  docs: Sequence[str]
  tokenizer: Tokenizer
  seq_len: int
  style: str

  def __len__(self) -> int:
    """Number of documents (rows are unknown until tokenized)."""
    return len(self.docs)

  def __array__(self, dtype=None, copy=None):
    raise TypeError("a TokenStream tokenizes on the fly and has no array form; read it with "
                    "make_train_iterator (its ids come from the tokenizer and need no check)")


@dataclasses.dataclass(frozen=True)
class _TokenizeChunk:
  """Documents -> int32 stream with an EOS after each (runs in the grain workers)."""
  tokenizer: Tokenizer

  def __call__(self, docs: list[str]) -> np.ndarray:
    eos = (self.tokenizer.eos_id,)
    ids = itertools.chain.from_iterable(itertools.chain(self.tokenizer.encode(d), eos) for d in docs)
    return np.fromiter(ids, np.int32)


class _PackIterator(grain.DatasetIterator):
  """Cuts the token chunks of `chunks` into rows. State: the chunk holding the next row's first
  token and the offset in it; restoring restarts the chunk pipeline there (any worker count)."""

  def __init__(self, chunks: grain.MapDataset, *, num_workers: int, seq_len: int, style: str,
               bos_id: int, eos_id: int, epoch_chunks: int):
    super().__init__()
    self._chunks, self._num_workers = chunks, num_workers
    self._body = body_length(seq_len, style)
    self._style, self._bos, self._eos, self._epoch_chunks = style, bos_id, eos_id, epoch_chunks
    self._inner = None
    self._restart(0)

  def _restart(self, chunk_index: int) -> None:
    """Reads from chunk `chunk_index` on; the chunk pipeline (and its workers) starts on demand."""
    if self._inner is not None:
      self._inner.close()
    self._inner = None
    self._next_chunk = chunk_index
    self._pending = collections.deque()   # (chunk index, chunk) of chunks with unread tokens
    self._offset = self._buffered = self._pulls_since_row = 0

  def _pull(self) -> None:
    if self._inner is None:
      ds = self._chunks[self._next_chunk:].to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
      self._inner = iter(prefetch(ds, self._num_workers))
    chunk = next(self._inner)
    self._pulls_since_row += 1
    if self._pulls_since_row > self._epoch_chunks:
      raise ValueError(
          f"a whole pass over this process's documents gives fewer than {self._body} tokens, less "
          "than one row; add documents or lower config.length")
    self._pending.append((self._next_chunk, chunk))
    self._next_chunk += 1
    self._buffered += len(chunk)

  def __next__(self) -> np.ndarray:
    while self._buffered < self._body:
      self._pull()
    parts, need = [], self._body
    while need:
      chunk = self._pending[0][1]
      part = chunk[self._offset:self._offset + need]
      parts.append(part)
      need -= len(part)
      self._offset += len(part)
      if self._offset == len(chunk):
        self._pending.popleft()
        self._offset = 0
    self._buffered -= self._body
    self._pulls_since_row = 0
    if self._style == "eos":
      return np.concatenate(parts)
    return np.concatenate([[self._bos], *parts, [self._eos]]).astype(np.int32)

  def get_state(self) -> dict:
    chunk = self._pending[0][0] if self._pending else self._next_chunk
    return {"chunk": int(chunk), "offset": int(self._offset)}

  def set_state(self, state: dict) -> None:
    self._restart(state["chunk"])
    if state["offset"]:
      self._pull()
      self._offset = state["offset"]
      self._buffered -= self._offset

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
    super().close()


class _PackDataset(grain.IterDataset):

  def __init__(self, chunks: grain.MapDataset, **kwargs):
    super().__init__()
    self._chunks, self._kwargs = chunks, kwargs

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._chunks, **self._kwargs)


def prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """`ds` read ahead by `num_workers` grain worker processes (none: `ds` itself)."""
  if num_workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():   # outside absl.app (tests, notebooks); grain reads its flags
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def chunk_documents(docs: grain.MapDataset) -> grain.MapDataset:
  """Lists of `DOCS_PER_CHUNK` consecutive documents (the last one of each epoch may be shorter)."""
  return docs.batch(DOCS_PER_CHUNK, batch_fn=list)


def packed_rows(doc_chunks: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, style: str, *,
                num_workers: int, epoch_chunks: int) -> grain.IterDataset:
  """Rows int32 [L] of the documents of `doc_chunks` (`chunk_documents`, maybe repeated), in
  order, tokenized in `num_workers` processes.

  `epoch_chunks` is the number of chunks in one pass: a pass that fills no row is an error.
  """
  return _PackDataset(doc_chunks.map(_TokenizeChunk(tokenizer)), num_workers=num_workers,
                      seq_len=seq_len, style=style, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      epoch_chunks=epoch_chunks)


def one_pass(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, style: str, *,
             num_workers: int = 0) -> grain.IterDataset:
  """The rows of one in-order pass over `docs` (the tail that fills no row is dropped)."""
  chunks = chunk_documents(grain.MapDataset.source(docs))
  return packed_rows(chunks, tokenizer, seq_len, style, num_workers=num_workers, epoch_chunks=len(chunks))


def collect_rows(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, style: str, *,
                 num_workers: int = 0) -> np.ndarray:
  """All rows int32 [N, L] of one in-order pass over `docs` (the tail that fills no row is dropped)."""
  it = iter(one_pass(docs, tokenizer, seq_len, style, num_workers=num_workers))
  try:
    out = list(it)
  finally:
    it.close()
  if not out:
    raise ValueError(f"{len(docs)} documents give fewer tokens than one row of length {seq_len} "
                     f"with wrap {style!r}; add text or lower config.length")
  return np.stack(out)
