"""Tests of the tokenizers: GPT-2 BPE and BERT WordPiece on tiny vocabularies written here,
serialization into checkpoints, the hub path offline, and checkpoint/config mismatches."""

import base64
import json
import pickle

import ml_collections
import pytest

from bd3jax import checkpoint
from bd3jax.data import tokenizers
from bd3jax.data.tokenizers import GPT2Tokenizer, WordPieceTokenizer, tokenizer_from_bytes


def gpt2_byte_alphabet() -> list[str]:
  """GPT-2's published bytes_to_unicode, as the characters of bytes 0..255 in vocab.json order."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]   # vocab.json gives byte bs[i] the id i


GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ b", "l o", "Ġb lo"]


def write_gpt2_files(directory) -> None:
  """A GPT-2-style vocabulary: 256 byte tokens (ids 0..255), 7 merges (256..262), EOT 263."""
  vocab = {c: i for i, c in enumerate(gpt2_byte_alphabet())}
  for merge in GPT2_MERGES:
    vocab["".join(merge.split())] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(GPT2_MERGES) + "\n", encoding="utf-8")


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "block", "diff", "##usion",
              "model", "##s", ",", ".", "!", "'", "s", "cafe", "un", "##ma", "##sk", "##ed", "-", "a"]


@pytest.fixture
def gpt2(tmp_path):
  write_gpt2_files(tmp_path)
  return GPT2Tokenizer.load(str(tmp_path))


@pytest.fixture
def bert(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
  return WordPieceTokenizer.load(str(tmp_path / "vocab.txt"))


# GPT-2 BPE.

def test_gpt2_hand_checked(gpt2):
  # Byte b in 33..126 has id b - 33 ('t' 83, 'h' 71, 'e' 68, 'l' 75, 'o' 78); ' ' is id 220.
  # "the" -> t + he; " thin" -> Ġt + h + in; " blob" -> Ġblo + b.
  assert gpt2.encode("the thin blob") == [83, 257, 256, 71, 259, 262, 65]
  assert gpt2.encode(" ") == [220]
  assert gpt2.decode([83, 257, 256, 71, 259, 262, 65]) == "the thin blob"
  assert (gpt2.eos_id, gpt2.bos_id, gpt2.pad_id, gpt2.mask_id, gpt2.vocab_size) == (263, 263, 263, 264, 265)


@pytest.mark.parametrize("text", ["the thin blob", "  two  spaces\tand\nnew lines\n\n",
                                  "unicode: café, ☃, 日本語 🙂", "a literal <|endoftext|> and [MASK]", ""])
def test_gpt2_round_trip(gpt2, text):
  ids = gpt2.encode(text)
  assert gpt2.decode(ids) == text
  assert all(0 <= i < 263 for i in ids)


def test_gpt2_special_ids_are_skipped(gpt2):
  ids = gpt2.encode("the blob")
  assert gpt2.decode([gpt2.bos_id, *ids, gpt2.mask_id, gpt2.eos_id]) == "the blob"


def test_gpt2_tiktoken_file(gpt2, tmp_path):
  ranks_file = tmp_path / "tiny.tiktoken"
  payload = gpt2.serialize().split(b"\n", 2)[2]   # the envelope's payload is the .tiktoken format
  ranks_file.write_bytes(payload)
  from_file = GPT2Tokenizer.load(str(ranks_file))
  assert from_file.eos_id == 263 and from_file.mask_id == 264 and from_file.vocab_size == 265
  assert from_file.encode("the thin blob") == gpt2.encode("the thin blob")
  assert from_file.fingerprint() == gpt2.fingerprint()


def test_gpt2_bad_files(tmp_path):
  write_gpt2_files(tmp_path)
  (tmp_path / "merges.txt").write_text("h e\nĠ t\n")   # ids no longer follow merge order
  with pytest.raises(ValueError, match="merge order"):
    GPT2Tokenizer.load(str(tmp_path))
  (tmp_path / "vocab.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_path"):
    GPT2Tokenizer.load(str(tmp_path))
  (tmp_path / "bad.tiktoken").write_bytes(b"not base64 at all\n")
  with pytest.raises(ValueError, match="bad.tiktoken"):
    GPT2Tokenizer.load(str(tmp_path / "bad.tiktoken"))


# BERT WordPiece.

def test_bert_hand_checked(bert):
  # Lowercased, accents stripped, punctuation split off, then longest pieces first.
  text = "The block-diffusion Models, CAFÉ!  unmasked\tthe  un's"
  assert bert.encode(text) == [5, 6, 21, 7, 8, 9, 10, 11, 16, 13, 17, 18, 19, 20, 5, 17, 14, 15]
  assert bert.decode(bert.encode(text)) == "the block - diffusion models, cafe! unmasked the un's"
  assert bert.encode("blocks zzz") == [6, 10, 1]
  assert (bert.bos_id, bert.eos_id, bert.pad_id, bert.mask_id, bert.vocab_size) == (2, 3, 0, 4, 23)


def test_bert_special_ids_and_literal_mask(bert):
  ids = bert.encode("the model")
  assert bert.decode([bert.bos_id, *ids, bert.mask_id, bert.eos_id, bert.pad_id]) == "the model"
  assert bert.mask_id not in bert.encode("[MASK]")   # written specials are ordinary text
  assert bert.encode("\x00the\ufffd\u200b model\x07") == [5, 9]


def test_bert_unknown_and_long_words(bert):
  assert bert.encode("xyz") == [1]
  assert bert.encode("a" * 101) == [1]
  assert bert.encode("日本") == [1, 1]   # CJK characters are words of their own


def test_bert_vocab_without_mask_and_cased_directory(tmp_path):
  vocab = [t for t in BERT_VOCAB if t != "[MASK]"] + ["The"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  cased = WordPieceTokenizer.load(str(tmp_path))
  assert cased.mask_id == len(vocab) and cased.vocab_size == len(vocab) + 1
  assert cased.encode("The the") == [len(vocab) - 1, 4]
  with pytest.raises(ValueError, match=r"no \[UNK\]"):
    WordPieceTokenizer(["[CLS]", "[SEP]", "the"])


def test_bert_missing_vocab(tmp_path):
  with pytest.raises(ValueError, match="tokenizer_path"):
    WordPieceTokenizer.load(str(tmp_path / "missing.txt"))


# One interface: serialization, pickling, loading from config, checkpoints.

def _all(gpt2, bert):
  sp = tokenizers.train_sentencepiece(["the block diffusion model"] * 50, vocab_size=300)
  return [sp, gpt2, bert]


def test_serialize_and_pickle_round_trip(gpt2, bert):
  for tok in _all(gpt2, bert):
    for restored in (tokenizer_from_bytes(tok.serialize()), pickle.loads(pickle.dumps(tok))):
      assert type(restored) is type(tok)
      assert restored.serialize() == tok.serialize()
      assert restored.encode("the block model") == tok.encode("the block model")
      assert (restored.mask_id, restored.vocab_size, restored.bos_id) == (tok.mask_id, tok.vocab_size, tok.bos_id)


def test_tokenizer_from_meta_reads_every_kind(gpt2, bert):
  for tok in _all(gpt2, bert):
    meta = {"tokenizer": base64.b64encode(tok.serialize()).decode("ascii")}
    assert checkpoint.tokenizer_from_meta(meta).fingerprint() == tok.fingerprint()
  with pytest.raises(ValueError, match="unknown kind"):
    tokenizer_from_bytes(b"bd3jax-tokenizer\n{\"kind\": \"morse\"}\n")


def _data_config(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path="", vocab_size=40) | kw)


def test_load_tokenizer_from_config(tmp_path, gpt2):
  write_gpt2_files(tmp_path)
  loaded = tokenizers.load_tokenizer(_data_config(tokenizer="gpt2", tokenizer_path=str(tmp_path)))
  assert loaded.fingerprint() == gpt2.fingerprint()
  with pytest.raises(ValueError, match="config.data.tokenizer 'bpe'"):
    tokenizers.load_tokenizer(_data_config(tokenizer="bpe"))


def test_hub_offline_gives_a_clear_error(monkeypatch):
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  def offline(repo_id, filename, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode is enabled")
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
  for kind, repo in (("gpt2", "gpt2"), ("bert", "bert-base-uncased")):
    with pytest.raises(ValueError, match=f"{repo}.*Hugging Face hub.*tokenizer_path"):
      tokenizers.load_tokenizer(_data_config(tokenizer=kind))


def test_hub_download_uses_the_hub_files(monkeypatch, tmp_path):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  write_gpt2_files(tmp_path)
  asked = []

  def download(repo_id, filename, **kwargs):
    asked.append((repo_id, filename))
    return str(tmp_path / filename)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  tok = tokenizers.load_tokenizer(_data_config(tokenizer="gpt2", tokenizer_path="openai-community/gpt2"))
  assert asked == [("openai-community/gpt2", "vocab.json"), ("openai-community/gpt2", "merges.txt")]
  assert tok.vocab_size == 265


def test_resolve_tokenizer_refuses_mismatched_files(tmp_path, gpt2, bert):
  (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB + ["extra"]))
  with pytest.raises(ValueError, match="does not match the checkpoint's bert tokenizer with 23 ids"):
    tokenizers.resolve_tokenizer(_data_config(tokenizer="bert", tokenizer_path=str(tmp_path)), [], bert)
  with pytest.raises(ValueError, match="set it to 'gpt2'"):
    tokenizers.resolve_tokenizer(_data_config(tokenizer="bert"), [], gpt2)
  # The checkpoint's tokenizer is used as is when the config names no local files.
  assert tokenizers.resolve_tokenizer(_data_config(tokenizer="bert", tokenizer_path="hub/id"), [], bert) is bert
  (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB))
  assert tokenizers.resolve_tokenizer(_data_config(tokenizer="bert", tokenizer_path=str(tmp_path)), [], bert) is bert
