"""`build_data`: from `config.data` to the tokenizer and both splits, ready for the iterators."""

import dataclasses

import numpy as np
from absl import logging

from bd3jax.data import prepared, stream
from bd3jax.data.documents import load_documents
from bd3jax.data.pipeline import tokenize_documents, wrap_documents
from bd3jax.data.records import TokenRows
from bd3jax.data.stream import TokenStream
from bd3jax.data.tokenizers import Tokenizer, resolve_tokenizer


@dataclasses.dataclass(frozen=True)
class DataBundle:
  """What training needs from the data: the tokenizer and both splits.

  `train_tokens_NL` goes to `make_train_iterator`; `valid_tokens_NL` to `eval_batches`. Rows are
  int32 `[N, L]` arrays (text read at start-up), `TokenRows` (pre-tokenised ArrayRecord shards,
  read on demand) or, for training with `config.data.stream`, a `TokenStream` tokenized on the
  fly. Every id is below `tokenizer.vocab_size` and none is the mask id: build_data checks
  prepared data against its manifest, and tokenizers never produce special ids.
  """
  tokenizer: Tokenizer
  train_tokens_NL: np.ndarray | TokenRows | TokenStream
  valid_tokens_NL: np.ndarray | TokenRows
  n_replaced_chars: int         # invalid UTF-8 sequences replaced while reading text files


def build_data(config, tokenizer: Tokenizer | None = None) -> DataBundle:
  """Reads `config.data`, loads (or trains) the tokenizer unless given, and prepares both splits.

  Pass the tokenizer restored from a checkpoint to resume a run: it is used as is, after a check
  that the config's tokenizer files (or the prepared data) were made with it.
  """
  data = config.data
  if data.prepared_dir:
    tokenizer, train, valid = prepared.load(data.prepared_dir, length=config.length, wrap=data.wrap,
                                            tokenizer=tokenizer)
    logging.info("prepared data %s: %d training and %d validation rows of %d tokens",
                 data.prepared_dir, len(train), len(valid), config.length)
    return DataBundle(tokenizer, train, valid, 0)
  train_docs, valid_docs, n_replaced = load_documents(data)
  tokenizer = resolve_tokenizer(data, train_docs, tokenizer)
  if data.stream:
    stream.body_length(config.length, data.wrap)
    try:
      valid = stream.collect_rows(valid_docs, tokenizer, config.length, data.wrap,
                                  num_workers=data.num_workers)
    except ValueError as e:
      raise ValueError(f"validation split: {e}") from None
    logging.info("streaming %d training documents; %d validation documents -> %d rows of %d tokens",
                 len(train_docs), len(valid_docs), *valid.shape)
    return DataBundle(tokenizer, TokenStream(train_docs, tokenizer, config.length, data.wrap), valid,
                      n_replaced)
  rows = {}
  for split, docs in (("training", train_docs), ("validation", valid_docs)):
    try:
      rows[split] = wrap_documents(tokenize_documents(docs, tokenizer), config.length,
                                   bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, style=data.wrap)
    except ValueError as e:
      raise ValueError(f"{split} split: {e}") from None
    logging.info("%s: %d documents -> %d rows of %d tokens", split, len(docs), *rows[split].shape)
  return DataBundle(tokenizer, rows["training"], rows["validation"], n_replaced)
