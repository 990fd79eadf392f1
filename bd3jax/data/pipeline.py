"""Token rows from documents (concatenate and wrap) and the grain iterators over them."""

import dataclasses
import itertools
import sys
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from bd3jax.data import stream
from bd3jax.data.distributed import local_batch_size, process_shard
from bd3jax.data.records import TokenRows
from bd3jax.data.stream import WRAP_STYLES, TokenStream, body_length

__all__ = ["WRAP_STYLES", "eval_batches", "make_train_iterator", "tokenize_documents", "wrap_documents"]


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[list[int]]:
  """Token ids of each document, without BOS/EOS."""
  return [tokenizer.encode(doc) for doc in docs]


def wrap_documents(docs_tokens: Sequence[Sequence[int]], seq_len: int, *, bos_id: int,
                   eos_id: int, style: str) -> np.ndarray:
  """Concatenates documents, each followed by EOS, and cuts the stream into rows of `seq_len`.

  style "bos_eos" (the reference's LM1B): each row is [BOS] + seq_len - 2 stream tokens + [EOS].
  style "eos" (the reference's OpenWebText): each row is seq_len stream tokens.
  The tail that does not fill a row is dropped.

  Returns:
    tokens_NL, int32 [N, seq_len].
  """
  body_len = body_length(seq_len, style)
  n_tokens = sum(len(doc) + 1 for doc in docs_tokens)
  n_rows = n_tokens // body_len
  if n_rows == 0:
    raise ValueError(f"the corpus has {n_tokens} tokens (an EOS after each document included) but one "
                     f"row of length {seq_len} with wrap {style!r} needs {body_len}; add text or lower "
                     "config.length")
  ids = np.fromiter(itertools.chain.from_iterable(itertools.chain(doc, (eos_id,)) for doc in docs_tokens),
                    dtype=np.int32, count=n_tokens)
  body_NL = ids[:n_rows * body_len].reshape(n_rows, body_len)
  if style == "eos":
    return body_NL
  return np.concatenate([np.full((n_rows, 1), bos_id, np.int32), body_NL,
                         np.full((n_rows, 1), eos_id, np.int32)], axis=1)


def _stack_tokens(rows_L: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": np.stack(rows_L)}


@dataclasses.dataclass
class _RowBatches:
  """Batch number b -> `{"tokens": int32 [B, L]}`: rows `start + order_e[k mod n]` for the k-th
  of B consecutive positions k in the endless sequence of epochs e = k // n, where order_e is a
  permutation seeded by (seed, e) (or the identity without shuffling)."""
  rows: np.ndarray | TokenRows
  start: int
  n: int
  batch: int
  seed: int
  shuffle: bool
  _orders: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._orders[epoch]

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    epoch_B, j_B = np.divmod(np.arange(b * self.batch, (b + 1) * self.batch, dtype=np.int64), self.n)
    if self.shuffle:
      for epoch in np.unique(epoch_B):
        j_B[epoch_B == epoch] = self._order(int(epoch))[j_B[epoch_B == epoch]]
    if isinstance(self.rows, TokenRows):
      return {"tokens": self.rows.take(self.start + j_B)}
    return {"tokens": np.asarray(self.rows[self.start + j_B], np.int32)}


def make_train_iterator(tokens_NL: np.ndarray | TokenRows | TokenStream, *, batch_size: int, seed: int,
                        shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's batches `{"tokens": int32 [B/P, L]}`.

  `tokens_NL` is `DataBundle.train_tokens_NL`: rows in memory, pre-tokenised ArrayRecord rows,
  or a `TokenStream` of documents tokenized on the fly. Process p of P reads the p-th of P equal
  contiguous ranges of the rows (of the documents, for a stream; the remainder of fewer than P
  is dropped), reshuffled each epoch with `seed`; batches may span epochs. `get_state()` /
  `set_state()` (or grain.checkpoint with orbax, one state per process) resume it exactly.
  With `num_workers > 0`, batches are read (or documents tokenized) in that many worker
  processes, and come out the same as without.
  """
  local_batch = local_batch_size(batch_size, process_index, process_count)
  shard = process_shard(len(tokens_NL), process_index, process_count)
  what = "documents" if isinstance(tokens_NL, TokenStream) else "training rows"
  if len(shard) == 0 or (what == "training rows" and len(shard) < local_batch):
    raise ValueError(f"{len(tokens_NL)} {what} give each of {process_count} process(es) "
                     f"{len(shard)}, fewer than one batch of {local_batch}; add data "
                     "or lower config.train.batch_size")
  if isinstance(tokens_NL, TokenStream):
    docs = grain.MapDataset.source(tokens_NL.docs)[shard.start:shard.stop]
    chunks = stream.chunk_documents(docs.shuffle(seed=seed) if shuffle else docs)
    rows = stream.packed_rows(chunks.repeat(), tokens_NL.tokenizer, tokens_NL.seq_len, tokens_NL.style,
                              num_workers=num_workers, epoch_chunks=len(chunks))
    return iter(rows.batch(local_batch, batch_fn=_stack_tokens))
  batches = _RowBatches(tokens_NL, shard.start, len(shard), local_batch, seed, shuffle)
  ds = grain.MapDataset.range(sys.maxsize).map(batches)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  return iter(stream.prefetch(ds, num_workers))


def eval_batches(tokens_NL: np.ndarray | TokenRows, batch_size: int) -> Iterator[np.ndarray]:
  """The full batches `int32 [batch_size, L]` of `tokens_NL`, in order; the last partial one is dropped."""
  n_batches = len(tokens_NL) // batch_size
  if n_batches == 0:
    raise ValueError(f"{len(tokens_NL)} validation rows are fewer than one evaluation batch of "
                     f"{batch_size}; hold out more text or lower the evaluation batch size")
  return (np.asarray(tokens_NL[i * batch_size:(i + 1) * batch_size], np.int32) for i in range(n_batches))
