"""SentencePiece tokenizer with a reserved [MASK] id, trained in memory or loaded from disk."""

import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from bd3jax.data.tokenizers.base import Tokenizer

MASK_PIECE = "[MASK]"


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model plus the ids block diffusion needs (BOS, EOS, pad, mask).

  The mask id is the "[MASK]" control piece when the model has one (models trained by
  `train_sentencepiece` do), otherwise one id appended after the model's pieces.
  Control pieces are never produced by `encode`, so no text maps to the mask id.
  Serialized as the plain sentencepiece model proto.
  """

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
      raise ValueError(f"not a valid sentencepiece model: {e}") from None
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError("the sentencepiece model defines no BOS or EOS piece; "
                       "train it with bos_id and eos_id set")
    n_pieces = self._sp.get_piece_size()
    mask_id = self._sp.piece_to_id(MASK_PIECE)
    has_mask = mask_id != self._sp.unk_id() and self._sp.is_control(mask_id)
    self._mask_id = mask_id if has_mask else n_pieces
    self._vocab_size = n_pieces if has_mask else n_pieces + 1
    self._pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.eos_id()

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    """Loads a sentencepiece `.model` file."""
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise FileNotFoundError(f"cannot read sentencepiece model {path!r} ({e.strerror}); fix "
                              "config.data.tokenizer_path or leave it empty to train one") from None
    try:
      return cls(proto)
    except ValueError as e:
      raise ValueError(f"tokenizer {path!r}: {e}") from None

  @classmethod
  def deserialize(cls, b: bytes) -> "SentencePieceTokenizer":
    """Inverse of `serialize`."""
    return cls(b)

  def serialize(self) -> bytes:
    """The sentencepiece model proto."""
    return self._sp.serialized_model_proto()

  @property
  def vocab_size(self) -> int:
    """Number of ids, the mask id included."""
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._sp.encode(text)

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a byte-fallback sentencepiece model on `texts` in memory, deterministically.

  Ids: pad 0, unk 1, BOS 2, EOS 3, "[MASK]" 4 (a control piece); `vocab_size` counts them all.
  Text is not normalised and whitespace is kept, so `decode(encode(text)) == text`;
  characters outside the vocabulary (newline included) become byte pieces.
  """
  writer = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts), model_writer=writer,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=[MASK_PIECE],
        byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=1_000_000, shuffle_input_sentence=True,
        max_sentence_length=16384, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    message = str(e).strip() or "no training text"
    raise ValueError(f"training a {vocab_size}-piece sentencepiece tokenizer failed: {message}; "
                     "change config.data.vocab_size or the training text") from None
  return SentencePieceTokenizer(writer.getvalue())
