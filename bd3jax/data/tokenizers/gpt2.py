"""GPT-2 byte-level BPE (OpenWebText): ranks from vocab.json + merges.txt or a .tiktoken file.

Encoding runs in tiktoken (`pip install 'bd3jax[gpt2]'`). As in the reference, the mask id is
appended after the vocabulary: GPT-2 gives EOS = BOS = pad = 50256, mask 50257, V = 50258.
"""

import base64
import json
import os

from bd3jax.data.tokenizers.base import Tokenizer, envelope

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's map from bytes to printable characters used in vocab.json and merges.txt."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def ranks_from_vocab_merges(vocab: dict[str, int], merges: list[str]) -> tuple[dict[bytes, int], int]:
  """(mergeable ranks, EOS id) of a GPT-2-style vocab.json and merges.txt.

  The ids of merged tokens must grow in merges.txt order, as in GPT-2, so that merging the pair
  of lowest rank first (tiktoken) is the same as applying the merges in order.
  """
  decoder = {c: b for b, c in _byte_to_unicode().items()}

  def to_bytes(token: str) -> bytes:
    try:
      return bytes(decoder[c] for c in token)
    except KeyError:
      raise ValueError(f"vocab.json token {token!r} is not in GPT-2's byte-level alphabet") from None

  if EOT not in vocab:
    raise ValueError(f"vocab.json has no {EOT} token")
  eos_id = vocab[EOT]
  ranks = {to_bytes(tok): i for tok, i in vocab.items() if tok != EOT}
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(f"vocab.json lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); "
                     "byte-level BPE needs all 256")
  previous = max(ranks[bytes([b])] for b in range(256))
  for line_no, line in enumerate(merges, start=1):
    if not line.strip() or line.startswith("#version"):
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"merges.txt line {line_no}: expected two tokens, got {line!r}")
    merged = to_bytes(parts[0]) + to_bytes(parts[1])
    if merged not in ranks:
      raise ValueError(f"merges.txt line {line_no}: {''.join(parts)!r} is not in vocab.json")
    if ranks[merged] <= previous:
      raise ValueError(f"merges.txt line {line_no}: vocab.json ids do not follow the merge order "
                       "(not a GPT-2-style vocabulary)")
    previous = ranks[merged]
  return ranks, eos_id


def read_tiktoken(contents: bytes) -> dict[bytes, int]:
  """Mergeable ranks of a `.tiktoken` file: one `base64(token) rank` per line."""
  ranks = {}
  for line_no, line in enumerate(contents.splitlines(), start=1):
    if not line:
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
      raise ValueError(f"line {line_no} is not 'base64-token rank': {line[:60]!r}") from None
  if not ranks:
    raise ValueError("no ranks in the file")
  return ranks


def _tiktoken():
  try:
    import tiktoken  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("GPT-2 BPE needs tiktoken: pip install 'bd3jax[gpt2]'") from None
  return tiktoken


class GPT2Tokenizer(Tokenizer):
  """Byte-level BPE over GPT-2's pre-tokenisation pattern; BOS = EOS = pad = <|endoftext|>.

  `decode(encode(text)) == text` for any text; literal "<|endoftext|>" in text is ordinary text.
  """

  kind = "gpt2"

  def __init__(self, ranks: dict[bytes, int], eos_id: int):
    if eos_id in ranks.values():
      raise ValueError(f"EOS id {eos_id} is also the rank of a BPE token")
    self._ranks, self._eos_id, self._pad_id = ranks, eos_id, eos_id
    self._mask_id = max(max(ranks.values()), eos_id) + 1
    self._known = frozenset(ranks.values())
    self._enc = _tiktoken().Encoding("bd3jax-gpt2", pat_str=PATTERN, mergeable_ranks=ranks,
                                     special_tokens={EOT: eos_id})

  @classmethod
  def from_vocab_merges(cls, vocab_path: str, merges_path: str) -> "GPT2Tokenizer":
    try:
      with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
      with open(merges_path, encoding="utf-8") as f:
        merges = f.read().split("\n")
      return cls(*ranks_from_vocab_merges(vocab, merges))
    except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
      raise ValueError(f"GPT-2 BPE from {vocab_path} + {merges_path}: {e}; set "
                       "config.data.tokenizer_path to GPT-2's vocab.json/merges.txt directory") from None

  @classmethod
  def from_tiktoken_file(cls, path: str) -> "GPT2Tokenizer":
    """A `.tiktoken` rank file (e.g. GPT-2's); <|endoftext|> is the id after the last rank."""
    try:
      with open(path, "rb") as f:
        ranks = read_tiktoken(f.read())
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read the .tiktoken file {path!r}: {e}") from None
    return cls(ranks, max(ranks.values()) + 1)

  @classmethod
  def load(cls, path: str) -> "GPT2Tokenizer":
    """A `.tiktoken` file, or a directory holding vocab.json and merges.txt."""
    if os.path.isdir(path):
      return cls.from_vocab_merges(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    return cls.from_tiktoken_file(path)

  @classmethod
  def from_payload(cls, header: dict, payload: bytes) -> "GPT2Tokenizer":
    if header.get("pattern") != PATTERN:
      raise ValueError("serialized GPT-2 tokenizer with an unknown pre-tokenisation pattern")
    return cls(read_tiktoken(payload), header["eos_id"])

  def serialize(self) -> bytes:
    payload = b"".join(base64.b64encode(tok) + b" %d\n" % rank
                       for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]))
    return envelope(self.kind, {"eos_id": self._eos_id, "pattern": PATTERN}, payload)

  @property
  def vocab_size(self) -> int:
    return self._mask_id + 1

  @property
  def bos_id(self) -> int:
    return self._eos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def _decode(self, ids: list[int]) -> str:
    return self._enc.decode([i for i in ids if i in self._known], errors="replace")
