"""Token rows from documents (concatenate and wrap) and the grain iterators over them."""

import itertools
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags

WRAP_STYLES = ("bos_eos", "eos")


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
  if style not in WRAP_STYLES:
    raise ValueError(f"unknown wrap style {style!r}; config.data.wrap must be one of {WRAP_STYLES}")
  body_len = seq_len - 2 if style == "bos_eos" else seq_len
  if body_len < 1:
    raise ValueError(f"sequence length {seq_len} is too short for wrap style {style!r}")
  n_tokens = sum(len(doc) + 1 for doc in docs_tokens)
  n_rows = n_tokens // body_len
  if n_rows == 0:
    raise ValueError(f"the corpus has {n_tokens} tokens (an EOS after each document included) but one "
                     f"row of length {seq_len} with wrap {style!r} needs {body_len}; add text or lower "
                     "config.length")
  stream = np.fromiter(itertools.chain.from_iterable(itertools.chain(doc, (eos_id,)) for doc in docs_tokens),
                       dtype=np.int32, count=n_tokens)
  body_NL = stream[:n_rows * body_len].reshape(n_rows, body_len)
  if style == "eos":
    return body_NL
  return np.concatenate([np.full((n_rows, 1), bos_id, np.int32), body_NL,
                         np.full((n_rows, 1), eos_id, np.int32)], axis=1)


def _stack_tokens(rows_L: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": np.stack(rows_L)}


def make_train_iterator(tokens_NL: np.ndarray, *, batch_size: int, seed: int, shuffle: bool = True,
                        process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's batches `{"tokens": int32 [B/P, L]}`.

  Process p reads the rows p, p + P, p + 2P, ... of the first P * (N // P) rows
  (P = process_count), reshuffled each epoch with `seed`; batches may span epochs.
  `get_state()` / `set_state()` (or grain.checkpoint with orbax) resume it exactly.
  With `num_workers > 0` batches are assembled in that many worker processes, in the same order.
  """
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is not in [0, {process_count})")
  local_batch = batch_size // process_count
  rows_per_process = len(tokens_NL) // process_count
  if rows_per_process < local_batch:
    raise ValueError(f"{len(tokens_NL)} training rows give each of {process_count} process(es) "
                     f"{rows_per_process} rows, fewer than one batch of {local_batch}; add data "
                     "or lower config.train.batch_size")
  ds = grain.MapDataset.source(np.asarray(tokens_NL, np.int32))
  ds = ds[:rows_per_process * process_count][process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat().batch(local_batch, drop_remainder=True, batch_fn=_stack_tokens)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():   # outside absl.app (tests, notebooks); grain reads its flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def eval_batches(tokens_NL: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  """The full batches `int32 [batch_size, L]` of `tokens_NL`, in order; the last partial one is dropped."""
  n_batches = len(tokens_NL) // batch_size
  if n_batches == 0:
    raise ValueError(f"{len(tokens_NL)} validation rows are fewer than one evaluation batch of "
                     f"{batch_size}; hold out more text or lower the evaluation batch size")
  return (tokens_NL[i * batch_size:(i + 1) * batch_size] for i in range(n_batches))
