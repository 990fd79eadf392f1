"""Tokenizers behind one interface: sentencepiece (train or load), GPT-2 BPE, BERT WordPiece.

`config.data.tokenizer` picks the kind and `config.data.tokenizer_path` its files:
  sentencepiece: a `.model` file; empty: train one on the training split (`data.vocab_size` ids).
  gpt2: a directory with vocab.json + merges.txt, or a `.tiktoken` file; anything else is a
    Hugging Face hub id (empty: "gpt2"), downloaded when online.
  bert: a vocab.txt, or a directory with it; anything else is a hub id (empty: "bert-base-uncased").
"""

import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from bd3jax.data.tokenizers import hub
from bd3jax.data.tokenizers.base import Tokenizer, open_envelope
from bd3jax.data.tokenizers.gpt2 import GPT2Tokenizer
from bd3jax.data.tokenizers.sentencepiece import SentencePieceTokenizer, train_sentencepiece
from bd3jax.data.tokenizers.wordpiece import WordPieceTokenizer

__all__ = ["GPT2Tokenizer", "KINDS", "SentencePieceTokenizer", "Tokenizer", "WordPieceTokenizer",
           "load_or_train_tokenizer", "load_tokenizer", "resolve_tokenizer", "tokenizer_from_bytes",
           "train_sentencepiece"]

KINDS = ("sentencepiece", "gpt2", "bert")
_HUB = {  # kind: (default repo, required files, optional files)
    "gpt2": ("gpt2", ("vocab.json", "merges.txt"), ()),
    "bert": ("bert-base-uncased", ("vocab.txt",), ("tokenizer_config.json",)),
}
_LOADERS = {"gpt2": GPT2Tokenizer.load, "bert": WordPieceTokenizer.load}
# Sentencepiece training reads at most this many documents, evenly spaced over the split.
_MAX_TRAINING_DOCS = 100_000


def tokenizer_from_bytes(b: bytes) -> Tokenizer:
  """Inverse of `Tokenizer.serialize` (a bare sentencepiece proto is a sentencepiece tokenizer)."""
  opened = open_envelope(b)
  if opened is None:
    return SentencePieceTokenizer.deserialize(b)
  header, payload = opened
  kinds = {"gpt2": GPT2Tokenizer, "bert": WordPieceTokenizer}
  if header.get("kind") not in kinds:
    raise ValueError(f"serialized tokenizer of unknown kind {header.get('kind')!r}; a newer bd3jax "
                     "may have written it")
  return kinds[header["kind"]].from_payload(header, payload)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown config.data.tokenizer {kind!r}; use one of {KINDS}")


def _training_texts(docs: Sequence[str]) -> list[str]:
  if len(docs) <= _MAX_TRAINING_DOCS:
    return list(docs)
  return [docs[int(i)] for i in np.linspace(0, len(docs) - 1, _MAX_TRAINING_DOCS)]


def load_tokenizer(config_data, train_docs: Sequence[str] = ()) -> Tokenizer:
  """The tokenizer `config_data.tokenizer` / `tokenizer_path` name (see the module docstring)."""
  kind, path = config_data.get("tokenizer", "sentencepiece"), config_data.tokenizer_path
  _check_kind(kind)
  if kind == "sentencepiece":
    if path:
      tokenizer = SentencePieceTokenizer.load(path)
      if tokenizer.vocab_size != config_data.vocab_size:
        logging.info("%s has %d ids (mask included); config.data.vocab_size %d does not apply to it",
                     path, tokenizer.vocab_size, config_data.vocab_size)
      return tokenizer
    tokenizer = train_sentencepiece(_training_texts(train_docs), config_data.vocab_size)
    logging.info("trained a %d-id sentencepiece tokenizer on %d documents",
                 tokenizer.vocab_size, min(len(train_docs), _MAX_TRAINING_DOCS))
    return tokenizer
  if path and os.path.exists(path):
    return _LOADERS[kind](path)
  repo, required, optional = _HUB[kind]
  return _LOADERS[kind](hub.download(path or repo, required, optional))


def load_or_train_tokenizer(config_data, train_docs: Sequence[str]) -> Tokenizer:
  """`load_tokenizer` (kept for the sentencepiece-only callers)."""
  return load_tokenizer(config_data, train_docs)


def resolve_tokenizer(config_data, train_docs: Sequence[str], given: Tokenizer | None) -> Tokenizer:
  """`given` (e.g. restored from a checkpoint) if it agrees with the config, else `load_tokenizer`.

  The config's tokenizer files, when they are on local disk, must be the given tokenizer; a hub
  id or an empty sentencepiece path is not consulted, since the given tokenizer already exists.
  """
  if given is None:
    return load_tokenizer(config_data, train_docs)
  _check_kind(config_data.tokenizer)
  if given.kind != config_data.tokenizer:
    raise ValueError(f"the checkpoint's tokenizer is a {given.kind} tokenizer but config.data.tokenizer "
                     f"is {config_data.tokenizer!r}; set it to {given.kind!r} or use a new workdir")
  path = config_data.tokenizer_path
  if path and os.path.exists(path):
    configured = load_tokenizer(config_data, train_docs)
    if configured.fingerprint() != given.fingerprint():
      raise ValueError(
          f"config.data.tokenizer_path {path!r} holds a {configured.describe()}, which does not match "
          f"the checkpoint's {given.describe()}; point it at the files the run was trained with, "
          "clear it to use the checkpoint's tokenizer, or use a new workdir")
  return given
