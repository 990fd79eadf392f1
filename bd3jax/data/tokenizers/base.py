"""The interface every tokenizer implements, and the byte envelope that carries it in checkpoints."""

import abc
import hashlib
import json
from collections.abc import Iterable

ENVELOPE_MAGIC = b"bd3jax-tokenizer\n"


class Tokenizer(abc.ABC):
  """Text <-> ids, with the special ids block diffusion needs.

  `encode` never produces BOS, EOS, pad or mask ids (no text maps to them); `decode` skips them.
  `serialize()` bytes rebuild the tokenizer through `tokenizer_from_bytes` without its original
  files, which is how tokenizers travel inside checkpoints and prepared data (and how they pickle).
  """

  kind: str   # "sentencepiece" | "gpt2" | "bert"

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, the mask id included."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int: ...

  # Set by each tokenizer's constructor.
  _pad_id: int
  _mask_id: int

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def mask_id(self) -> int:
    return self._mask_id

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Text of ids that hold no special id."""

  @abc.abstractmethod
  def serialize(self) -> bytes: ...

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping BOS, EOS, pad and mask ids."""
    special = {self.bos_id, self.eos_id, self.pad_id, self.mask_id}
    return self._decode([int(i) for i in ids if int(i) not in special])

  def __reduce__(self):
    from bd3jax.data.tokenizers import tokenizer_from_bytes  # pylint: disable=g-import-not-at-top
    return tokenizer_from_bytes, (self.serialize(),)

  def fingerprint(self) -> str:
    """A short hash of `serialize()`: equal fingerprints, identical tokenizers."""
    return hashlib.sha256(self.serialize()).hexdigest()[:16]

  def describe(self) -> str:
    return (f"{self.kind} tokenizer with {self.vocab_size} ids (BOS {self.bos_id}, EOS {self.eos_id}, "
            f"mask {self.mask_id}, fingerprint {self.fingerprint()})")


def envelope(kind: str, header: dict, payload: bytes) -> bytes:
  """`kind`, a JSON header and a payload in one self-describing byte string."""
  return ENVELOPE_MAGIC + json.dumps({"kind": kind, **header}, sort_keys=True).encode() + b"\n" + payload


def open_envelope(b: bytes) -> tuple[dict, bytes] | None:
  """(header, payload) of an `envelope`, or None for other bytes."""
  if not b.startswith(ENVELOPE_MAGIC):
    return None
  header, _, payload = b[len(ENVELOPE_MAGIC):].partition(b"\n")
  try:
    return json.loads(header), payload
  except json.JSONDecodeError:
    raise ValueError("corrupt serialized tokenizer: unreadable header") from None
