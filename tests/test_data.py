"""Tests of bd3jax.data: tokenizer, sources, wrapping, grain iterators, build_data."""

import io
import json

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from bd3jax import data

_WORDS = ("block diffusion models sample text one block at a time while masked tokens inside "
          "each block are revealed in parallel by the denoiser trained with the masked loss").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=rng.integers(4, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
  return data.train_sentencepiece(_sentences(400), vocab_size=320)


# Tokenizer.

ROUND_TRIP_TEXTS = [
    "block diffusion models sample text.",
    "  two leading spaces,\ttabs\tand\nnew lines\n\nkept",
    "unseen characters: café, ☃, 日本語, emoji 🙂",
    "a literal [MASK] and <s> </s> <pad> <unk> in text",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert all(0 <= i < tokenizer.vocab_size for i in ids)
  assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id} & set(ids)


def test_tokenizer_special_ids(tokenizer):
  specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id]
  assert specials == [0, 2, 3, 4]
  assert tokenizer.vocab_size == 320
  assert tokenizer.encode("[MASK]") != [tokenizer.mask_id]
  text = "masked tokens"
  ids = tokenizer.encode(text)
  noisy = [tokenizer.bos_id, *ids, tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id]
  assert tokenizer.decode(noisy) == text
  assert tokenizer.decode(np.array(ids, np.int32)) == text


def test_tokenizer_serialize_and_determinism(tokenizer, tmp_path):
  proto = tokenizer.serialize()
  assert data.train_sentencepiece(_sentences(400), vocab_size=320).serialize() == proto
  restored = data.SentencePieceTokenizer.deserialize(proto)
  assert restored.serialize() == proto
  assert restored.mask_id == tokenizer.mask_id and restored.vocab_size == tokenizer.vocab_size
  path = tmp_path / "tok.model"
  path.write_bytes(proto)
  loaded = data.load_or_train_tokenizer(
      ml_collections.ConfigDict(dict(tokenizer_path=str(path), vocab_size=999)), ["ignored"])
  assert loaded.encode(ROUND_TRIP_TEXTS[1]) == tokenizer.encode(ROUND_TRIP_TEXTS[1])


def test_tokenizer_without_mask_piece(tmp_path):
  """A model trained elsewhere, with sentencepiece's default ids and no [MASK] piece."""
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_sentences(200)), model_writer=proto,
                                 vocab_size=50, minloglevel=2)
  (tmp_path / "plain.model").write_bytes(proto.getvalue())
  tokenizer = data.SentencePieceTokenizer.load(str(tmp_path / "plain.model"))
  assert tokenizer.mask_id == 50 and tokenizer.vocab_size == 51
  assert tokenizer.pad_id == tokenizer.eos_id == 2
  ids = tokenizer.encode("masked tokens")
  assert tokenizer.decode(ids + [tokenizer.mask_id]) == "masked tokens"


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer_path"):
    data.SentencePieceTokenizer.load(str(tmp_path / "missing.model"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    data.SentencePieceTokenizer.load(str(tmp_path / "bad.model"))
  with pytest.raises(ValueError, match="vocab_size"):
    data.train_sentencepiece(_sentences(20), vocab_size=5000)
  with pytest.raises(ValueError, match="vocab_size"):
    data.train_sentencepiece([], vocab_size=320)


# Sources.

def test_read_documents_txt_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_bytes(
      b"first doc\nline two\n\n\n  second doc, indented, bad byte \xff here\n \n"
      b"third \xef\xbf\xbd is a genuine replacement char\n")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"text": "from jsonl", "id": 1}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
  (tmp_path / "c.jsonl").write_bytes(b'{"body": "bad \xfe\xfe"}\n')
  docs, n_replaced = data.read_documents(f"{tmp_path}/*.txt, {tmp_path}/b.jsonl")
  assert docs == ["first doc\nline two", "  second doc, indented, bad byte \ufffd here",
                  "third \ufffd is a genuine replacement char", "from jsonl", "again"]
  assert n_replaced == 1
  docs, n_replaced = data.read_documents(str(tmp_path / "c.jsonl"), text_key="body")
  assert docs == ["bad \ufffd\ufffd"] and n_replaced == 2


def test_read_documents_errors(tmp_path):
  (tmp_path / "empty.txt").write_text("\n  \n\n")
  with pytest.raises(ValueError, match="no text in .*empty.txt"):
    data.read_documents(str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    data.read_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data.read_documents(f"{tmp_path}/*.txt,{tmp_path}/*.jsonl")
  with pytest.raises(ValueError, match="train_files"):
    data.read_documents(" , ")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
    data.read_documents(str(tmp_path / "bad.jsonl"))
  (tmp_path / "key.jsonl").write_text('{"content": "x"}\n')
  with pytest.raises(ValueError, match=r"key.jsonl:1: .*'text'"):
    data.read_documents(str(tmp_path / "key.jsonl"))
  (tmp_path / "folder.txt").mkdir()
  with pytest.raises(ValueError, match="is a directory"):
    data.read_documents(str(tmp_path / "folder.txt"))
  (tmp_path / "doc.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unsupported file type"):
    data.read_documents(str(tmp_path / "doc.csv"))


def test_demo_documents():
  docs = data.demo_documents()
  assert len(docs) > 1000
  assert 1_000_000 < sum(map(len, docs)) < 3_000_000
  assert len(set(docs)) == len(docs)
  assert docs == data.demo_documents()


def test_split_documents():
  docs = [f"doc {i}" for i in range(100)]
  train, valid = data.split_documents(docs, 0.1, seed=3)
  assert len(valid) == 10 and sorted(train + valid) == sorted(docs)
  assert (train, valid) == data.split_documents(docs, 0.1, seed=3)
  assert valid != data.split_documents(docs, 0.1, seed=4)[1]
  assert data.split_documents(docs[:2], 0.01, seed=0)[1] in (["doc 0"], ["doc 1"])
  with pytest.raises(ValueError, match="cannot hold out"):
    data.split_documents(docs[:1], 0.5, seed=0)
  with pytest.raises(ValueError, match="valid_files"):
    data.split_documents(docs, 0.0, seed=0)


# Wrapping.

DOCS_TOKENS = [[10, 11, 12], [13, 14], [15]]   # stream with EOS=2: 10 11 12 2 13 14 2 15 2


def test_wrap_bos_eos():
  rows = data.wrap_documents(DOCS_TOKENS, 4, bos_id=1, eos_id=2, style="bos_eos")
  np.testing.assert_array_equal(rows, [[1, 10, 11, 2], [1, 12, 2, 2], [1, 13, 14, 2], [1, 2, 15, 2]])
  assert rows.dtype == np.int32
  rows = data.wrap_documents(DOCS_TOKENS, 5, bos_id=1, eos_id=2, style="bos_eos")
  np.testing.assert_array_equal(rows, [[1, 10, 11, 12, 2], [1, 2, 13, 14, 2], [1, 2, 15, 2, 2]])


def test_wrap_eos():
  rows = data.wrap_documents(DOCS_TOKENS, 4, bos_id=1, eos_id=2, style="eos")
  np.testing.assert_array_equal(rows, [[10, 11, 12, 2], [13, 14, 2, 15]])
  assert rows.dtype == np.int32
  rows = data.wrap_documents(DOCS_TOKENS, 3, bos_id=1, eos_id=2, style="eos")
  np.testing.assert_array_equal(rows, [[10, 11, 12], [2, 13, 14], [2, 15, 2]])


def test_wrap_errors():
  with pytest.raises(ValueError, match="9 tokens .* needs 10"):
    data.wrap_documents(DOCS_TOKENS, 12, bos_id=1, eos_id=2, style="bos_eos")
  with pytest.raises(ValueError, match="config.data.wrap"):
    data.wrap_documents(DOCS_TOKENS, 4, bos_id=1, eos_id=2, style="bos")


# Iterators.

def _row_ids(n_rows: int, seq_len: int = 3) -> np.ndarray:
  """Rows whose every token is the row's index."""
  return np.repeat(np.arange(n_rows, dtype=np.int32)[:, None], seq_len, axis=1)


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it)["tokens"] for _ in range(n)]


def test_train_iterator_batches():
  it = data.make_train_iterator(_row_ids(20), batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == {"tokens"}
  assert batch["tokens"].shape == (4, 3) and batch["tokens"].dtype == np.int32
  first = np.concatenate([batch["tokens"]] + _take(it, 9))[:, 0]
  assert sorted(first[:20]) == list(range(20)) and sorted(first[20:]) == list(range(20))
  assert list(first[:20]) != list(first[20:])   # reshuffled each epoch
  again = np.concatenate(_take(data.make_train_iterator(_row_ids(20), batch_size=4, seed=0), 10))
  np.testing.assert_array_equal(again[:, 0], first)
  other = np.concatenate(_take(data.make_train_iterator(_row_ids(20), batch_size=4, seed=1), 5))
  assert list(other[:, 0]) != list(first[:20])
  ordered = np.concatenate(_take(data.make_train_iterator(_row_ids(8), batch_size=3, seed=0,
                                                          shuffle=False), 4))
  assert list(ordered[:, 0]) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_iterator_resumes_exactly(num_workers):
  make = lambda: data.make_train_iterator(_row_ids(30), batch_size=4, seed=7, num_workers=num_workers)
  it = make()
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 12)   # crosses the epoch boundary at 30 rows
  it.close()
  resumed = make()
  resumed.set_state(state)
  got = _take(resumed, 12)
  resumed.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  if num_workers:
    reference = data.make_train_iterator(_row_ids(30), batch_size=4, seed=7)
    _take(reference, 5)
    for a, b in zip(expected, _take(reference, 12)):
      np.testing.assert_array_equal(a, b)


def test_process_shards_are_disjoint_and_cover():
  tokens_NL = _row_ids(26)   # 2 rows dropped so that each of 4 processes has 6 rows
  epochs = []
  for p in range(4):
    it = data.make_train_iterator(tokens_NL, batch_size=8, seed=0, process_index=p, process_count=4)
    rows = np.concatenate(_take(it, 6))[:, 0]   # 2 epochs of 6 rows, batches of 2
    assert sorted(rows[:6]) == sorted(rows[6:])
    epochs.append(set(rows[:6]))
  assert set().union(*epochs) == set(range(24))
  assert sum(map(len, epochs)) == 24


def test_train_iterator_errors():
  with pytest.raises(ValueError, match="not divisible"):
    data.make_train_iterator(_row_ids(20), batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_train_iterator(_row_ids(3), batch_size=4, seed=0, process_count=2)


def test_eval_batches():
  batches = list(data.eval_batches(_row_ids(10), 3))
  assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
  with pytest.raises(ValueError, match="fewer than one evaluation batch"):
    data.eval_batches(_row_ids(2), 3)


# build_data.

def _config(**data_overrides) -> ml_collections.ConfigDict:
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.length = 32
  config.data.update(data_overrides)
  return config


def test_build_data_demo():
  bundle = data.build_data(_config(source="demo", vocab_size=2048, valid_fraction=0.05))
  assert bundle.tokenizer.vocab_size == 2048 and bundle.n_replaced_chars == 0
  for rows in (bundle.train_tokens_NL, bundle.valid_tokens_NL):
    assert rows.dtype == np.int32 and rows.shape[1] == 32
    assert (rows[:, 0] == bundle.tokenizer.bos_id).all() and (rows[:, -1] == bundle.tokenizer.eos_id).all()
    assert rows.max() < bundle.tokenizer.vocab_size and not (rows == bundle.tokenizer.mask_id).any()
  assert len(bundle.train_tokens_NL) > 10 * len(bundle.valid_tokens_NL) > 0


def test_build_data_text_files(tmp_path, tokenizer):
  (tmp_path / "train.txt").write_bytes("\n\n".join(_sentences(200, seed=1)).encode() + b"\n\xff")
  (tmp_path / "valid.jsonl").write_text(
      "".join(json.dumps({"text": s}) + "\n" for s in _sentences(30, seed=2)))
  config = _config(train_files=str(tmp_path / "train.txt"), valid_files=str(tmp_path / "valid.jsonl"),
                   wrap="eos")
  bundle = data.build_data(config, tokenizer=tokenizer)
  assert bundle.tokenizer is tokenizer and bundle.n_replaced_chars == 1
  valid_stream = bundle.valid_tokens_NL.reshape(-1)
  first_valid_doc = tokenizer.encode(_sentences(30, seed=2)[0]) + [tokenizer.eos_id]
  assert valid_stream[:len(first_valid_doc)].tolist() == first_valid_doc
  config.length = 4096
  with pytest.raises(ValueError, match="validation split: the corpus has"):
    data.build_data(config, tokenizer=tokenizer)
  with pytest.raises(ValueError, match="config.data.source"):
    data.build_data(_config(source="s3"), tokenizer=tokenizer)


def test_tokenize_documents(tokenizer):
  docs = ["one block", "two blocks"]
  assert data.tokenize_documents(docs, tokenizer) == [tokenizer.encode(d) for d in docs]
