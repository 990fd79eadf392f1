"""Data: documents -> tokenizer -> concatenated-and-wrapped rows -> grain iterators."""

import dataclasses

import numpy as np
from absl import logging

from bd3jax.data.pipeline import eval_batches, make_train_iterator, tokenize_documents, wrap_documents
from bd3jax.data.sources import demo_documents, read_documents, split_documents
from bd3jax.data.tokenizers import SentencePieceTokenizer, load_or_train_tokenizer, train_sentencepiece

__all__ = [
    "DataBundle", "SentencePieceTokenizer", "build_data", "demo_documents", "eval_batches",
    "load_or_train_tokenizer", "make_train_iterator", "read_documents", "split_documents",
    "tokenize_documents", "train_sentencepiece", "wrap_documents",
]

# Fixed, so that runs with different config.seed share one validation set.
_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DataBundle:
  """What training needs from the data: the tokenizer and both splits as token rows."""
  tokenizer: SentencePieceTokenizer
  train_tokens_NL: np.ndarray   # int32 [N_train, L]
  valid_tokens_NL: np.ndarray   # int32 [N_valid, L]
  n_replaced_chars: int         # invalid UTF-8 sequences replaced while reading


def _documents(data) -> tuple[list[str], list[str], int]:
  """(train, valid, replaced characters) documents of `config.data`."""
  if data.source == "demo":
    return *split_documents(demo_documents(), data.valid_fraction, seed=_SPLIT_SEED), 0
  if data.source != "text":
    raise ValueError(f"unknown config.data.source {data.source!r}; use 'text' or 'demo'")
  train, n_replaced = read_documents(data.train_files, data.text_key)
  if not data.valid_files:
    return *split_documents(train, data.valid_fraction, seed=_SPLIT_SEED), n_replaced
  valid, n_valid_replaced = read_documents(data.valid_files, data.text_key)
  return train, valid, n_replaced + n_valid_replaced


def build_data(config, tokenizer: SentencePieceTokenizer | None = None) -> DataBundle:
  """Reads `config.data`, loads or trains the tokenizer (unless given) and wraps both splits.

  Pass the tokenizer restored from a checkpoint to resume a run without retraining it.
  """
  train_docs, valid_docs, n_replaced = _documents(config.data)
  tokenizer = tokenizer or load_or_train_tokenizer(config.data, train_docs)
  rows = {}
  for split, docs in (("training", train_docs), ("validation", valid_docs)):
    try:
      rows[split] = wrap_documents(tokenize_documents(docs, tokenizer), config.length,
                                   bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                   style=config.data.wrap)
    except ValueError as e:
      raise ValueError(f"{split} split: {e}") from None
    logging.info("%s: %d documents -> %d rows of %d tokens", split, len(docs), *rows[split].shape)
  return DataBundle(tokenizer, rows["training"], rows["validation"], n_replaced)
