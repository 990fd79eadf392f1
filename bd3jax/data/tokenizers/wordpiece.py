"""BERT WordPiece (bert-base-uncased for LM1B): basic tokenization + greedy longest-match pieces.

Matches Hugging Face's BertTokenizer on ordinary text: clean control characters, space out CJK
characters, NFC, split on whitespace, lowercase and strip accents (uncased vocabularies), split
off each punctuation character, then the longest vocabulary piece first ("##" marks a
continuation); a word with no split, or longer than 100 characters, is [UNK]. One deliberate
difference: special tokens written in the text ("[MASK]") are tokenized as ordinary text, so
no text maps to a special id.
"""

import json
import os
import re
import unicodedata

from bd3jax.data.tokenizers.base import Tokenizer, envelope

_MAX_WORD_CHARS = 100
_CACHE_SIZE = 1 << 20
# ASCII control characters (all but tab, newline, carriage return) vanish; those three become spaces.
_ASCII_CLEAN = {c: None for c in [*range(0, 9), 11, 12, *range(14, 32), 127]} | {9: 32, 10: 32, 13: 32}
_ASCII_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_ASCII_SPLIT = re.compile(f"[{re.escape(_ASCII_PUNCT)}]|[^{re.escape(_ASCII_PUNCT)}]+")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _clean_unicode(text: str) -> str:
  """Drops NUL, U+FFFD and control characters, maps whitespace to spaces, spaces out CJK."""
  out = []
  for ch in text:
    cp = ord(ch)
    if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
      out.append(" ")
    elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
      continue
    elif _is_cjk(cp):
      out.append(f" {ch} ")
    else:
      out.append(ch)
  return unicodedata.normalize("NFC", "".join(out))


def _split_punct(word: str) -> list[str]:
  if word.isascii():
    return _ASCII_SPLIT.findall(word)
  parts, current = [], []
  for ch in word:
    if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P"):
      if current:
        parts.append("".join(current))
        current = []
      parts.append(ch)
    else:
      current.append(ch)
  if current:
    parts.append("".join(current))
  return parts


class WordPieceTokenizer(Tokenizer):
  """A WordPiece vocabulary (one token per line, id = line number) with BERT's special tokens.

  BOS = [CLS], EOS = [SEP], pad = [PAD] and mask = [MASK] (appended after the vocabulary if it
  has none); bert-base-uncased gives mask 103 and V = 30522.
  """

  kind = "bert"

  def __init__(self, vocab: list[str], *, lowercase: bool = True):
    self._tokens = list(vocab)
    self._ids = {tok: i for i, tok in enumerate(self._tokens)}   # the last duplicate wins, as in HF
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in self._ids]
    if missing:
      raise ValueError(f"the WordPiece vocabulary has no {', '.join(missing)} token; use a BERT vocab.txt")
    self._lowercase = lowercase
    self._unk = self._ids["[UNK]"]
    self._mask_id = self._ids.get("[MASK]", len(self._tokens))
    self._vocab_size = max(len(self._tokens), self._mask_id + 1)
    self._pad_id = self._ids.get("[PAD]", self.eos_id)
    self._word_cache: dict[str, list[int]] = {}

  @classmethod
  def load(cls, path: str) -> "WordPieceTokenizer":
    """Loads `vocab.txt`, or a directory holding it (and optionally `tokenizer_config.json`
    with `do_lower_case`; the default is uncased)."""
    lowercase = True
    if os.path.isdir(path):
      config_path = os.path.join(path, "tokenizer_config.json")
      if os.path.exists(config_path):
        with open(config_path) as f:
          lowercase = bool(json.load(f).get("do_lower_case", True))
      path = os.path.join(path, "vocab.txt")
    try:
      with open(path, encoding="utf-8") as f:
        vocab = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read the WordPiece vocabulary {path!r} ({e}); set "
                       "config.data.tokenizer_path to a BERT vocab.txt or its directory") from None
    if vocab and vocab[-1] == "":
      vocab.pop()
    try:
      return cls(vocab, lowercase=lowercase)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  @classmethod
  def from_payload(cls, header: dict, payload: bytes) -> "WordPieceTokenizer":
    return cls(payload.decode("utf-8").split("\n"), lowercase=header["lowercase"])

  def serialize(self) -> bytes:
    return envelope(self.kind, {"lowercase": self._lowercase}, "\n".join(self._tokens).encode("utf-8"))

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    return self._ids["[CLS]"]

  @property
  def eos_id(self) -> int:
    return self._ids["[SEP]"]

  def encode(self, text: str) -> list[int]:
    if text.isascii():
      words = text.translate(_ASCII_CLEAN).split()
    else:
      words = _clean_unicode(text).split()
    ids = []
    for word in words:
      cached = self._word_cache.get(word)
      if cached is None:
        if len(self._word_cache) >= _CACHE_SIZE:
          self._word_cache.clear()
        cached = self._word_cache[word] = self._encode_word(word)
      ids += cached
    return ids

  def _encode_word(self, word: str) -> list[int]:
    if self._lowercase:
      word = word.lower()
      if not word.isascii():
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
    ids = []
    for part in _split_punct(word):
      ids += self._pieces(part)
    return ids

  def _pieces(self, word: str) -> list[int]:
    """Greedy longest-match-first WordPiece ids of one word."""
    if word in self._ids:
      return [self._ids[word]]
    if len(word) > _MAX_WORD_CHARS:
      return [self._unk]
    ids, start = [], 0
    while start < len(word):
      for end in range(len(word), start, -1):
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self._ids:
          ids.append(self._ids[piece])
          start = end
          break
      else:
        return [self._unk]
    return ids

  def _decode(self, ids: list[int]) -> str:
    text = " ".join(self._tokens[i] if i < len(self._tokens) else "[UNK]" for i in ids)
    text = text.replace(" ##", "").strip()
    for old, new in _CLEANUP:
      text = text.replace(old, new)
    return text
