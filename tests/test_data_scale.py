"""Tests of data at scale: the paper's wrapping rules, on-the-fly tokenisation in grain workers,
pre-tokenised ArrayRecord shards (prepare, resume, read), per-process shards, global batches."""

import functools
import json
import os

import ml_collections
import numpy as np
import pytest
from test_data_tokenizers import BERT_VOCAB, write_gpt2_files

from bd3jax import data
from bd3jax.data import prepare as prepare_lib
from bd3jax.data import prepared, records, stream

_WORDS = "the block diffusion model , cafe ! un ' s a".split()


def _docs(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=rng.integers(1, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bert") / "vocab.txt"
  path.write_text("\n".join(BERT_VOCAB))
  return str(path)


@pytest.fixture(scope="module")
def bert(bert_path):
  return data.WordPieceTokenizer.load(bert_path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gpt2")
  write_gpt2_files(directory)
  return data.GPT2Tokenizer.load(str(directory))


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it)["tokens"] for _ in range(n)]


# The reference's wrapping rules, hand-checked.

def test_lm1b_chunks_are_cls_126_tokens_sep(bert):
  docs = ["The model!", "a cafe", "diffusion"]   # [5 9 13] [22 16] [7 8], a [SEP] (3) after each
  rows = data.wrap_documents(data.tokenize_documents(docs, bert), 6, bos_id=bert.bos_id,
                             eos_id=bert.eos_id, style="bos_eos")
  np.testing.assert_array_equal(rows, [[2, 5, 9, 13, 3, 3], [2, 22, 16, 3, 7, 3]])   # tail "8 [SEP]" dropped
  rows_128 = stream.collect_rows(_docs(400), bert, 128, "bos_eos")
  assert (rows_128[:, 0] == 2).all() and (rows_128[:, -1] == 3).all() and rows_128.shape[1] == 128
  body = rows_128[:, 1:-1].reshape(-1)
  stream_ids = np.concatenate([bert.encode(d) + [3] for d in _docs(400)])
  np.testing.assert_array_equal(body, stream_ids[:body.size])   # 126 stream tokens per chunk


def test_owt_eos_after_each_document_and_no_extra_bos_eos(gpt2):
  docs = ["the thin", " blob", "the"]   # [83 257 256 71 259] [262 65] [83 257], EOS 263 after each
  rows = stream.collect_rows(docs, gpt2, 4, "eos")
  np.testing.assert_array_equal(rows, [[83, 257, 256, 71], [259, 263, 262, 65], [263, 83, 257, 263]])
  np.testing.assert_array_equal(rows, data.wrap_documents(data.tokenize_documents(docs, gpt2), 4,
                                                          bos_id=263, eos_id=263, style="eos"))


@pytest.mark.parametrize("style", ["bos_eos", "eos"])
def test_stream_rows_match_in_memory_wrapping(bert, style):
  docs = _docs(300, seed=1)
  expected = data.wrap_documents(data.tokenize_documents(docs, bert), 16, bos_id=bert.bos_id,
                                 eos_id=bert.eos_id, style=style)
  np.testing.assert_array_equal(stream.collect_rows(docs, bert, 16, style), expected)


# On-the-fly training iterator.

def _stream(bert, n_docs=200, seq_len=16):
  return data.TokenStream(_docs(n_docs, seed=2), bert, seq_len, "bos_eos")


def test_stream_iterator_workers_and_resume(bert):
  make = lambda workers: data.make_train_iterator(_stream(bert), batch_size=4, seed=3, num_workers=workers)
  reference = make(0)
  expected = _take(reference, 43)   # past the end of the first epoch of 200 documents
  with_workers = make(2)
  try:
    got = _take(with_workers, 3)
    state = with_workers.get_state()
    got += _take(with_workers, 40)
  finally:
    with_workers.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  assert json.loads(json.dumps(state)) == state
  resumed = make(0)     # a state saved with workers restores without them
  resumed.set_state(state)
  for a, b in zip(expected[3:], _take(resumed, 40)):
    np.testing.assert_array_equal(a, b)
  assert expected[0].shape == (4, 16)


def test_stream_has_no_array_form(bert):
  with pytest.raises(TypeError, match="make_train_iterator"):
    np.asarray(_stream(bert))


def test_stream_shorter_than_one_row_is_an_error(bert):
  it = data.make_train_iterator(data.TokenStream(["the", "a"], bert, 128, "bos_eos"), batch_size=2, seed=0)
  with pytest.raises(ValueError, match="fewer than 126 tokens"):
    next(it)
  with pytest.raises(ValueError, match="fewer tokens than one row of length 128"):
    stream.collect_rows(["the", "a"], bert, 128, "bos_eos")


# build_data with streamed text and the paper's tokenizers.

def _config(tmp_path, **data_overrides) -> ml_collections.ConfigDict:
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.length = 16
  (tmp_path / "train.txt").write_text("\n\n".join(_docs(300, seed=4)))
  (tmp_path / "valid.txt").write_text("\n\n".join(_docs(40, seed=5)))
  config.data.update(source="text", train_files=str(tmp_path / "train.txt"),
                     valid_files=str(tmp_path / "valid.txt"))
  config.data.update(data_overrides)
  return config


def test_build_data_streams_with_bert(tmp_path, bert_path, bert):
  config = _config(tmp_path, tokenizer="bert", tokenizer_path=bert_path, stream=True)
  bundle = data.build_data(config)
  assert isinstance(bundle.train_tokens_NL, data.TokenStream) and len(bundle.train_tokens_NL) == 300
  in_memory = data.build_data(_config(tmp_path, tokenizer="bert", tokenizer_path=bert_path))
  np.testing.assert_array_equal(bundle.valid_tokens_NL, in_memory.valid_tokens_NL)
  batch = next(data.make_train_iterator(bundle.train_tokens_NL, batch_size=4, seed=0))["tokens"]
  assert batch.shape == (4, 16) and batch.max() < bert.vocab_size
  assert data.build_data(config, tokenizer=bert).tokenizer is bert


# Pre-tokenised shards.

def _prepare(tmp_path, bert_path, **kw):
  config = _config(tmp_path, tokenizer="bert", tokenizer_path=bert_path)
  out = str(tmp_path / "prepared")
  return config, out, prepare_lib.prepare(config, out, rows_per_shard=50, **kw)


def test_prepare_then_train_without_tokenizer_files(tmp_path, bert_path, bert):
  config, out, manifest = _prepare(tmp_path, bert_path)
  expected = stream.collect_rows(_docs(300, seed=4), bert, 16, "bos_eos")
  train = manifest["splits"]["train"]
  assert manifest["complete"] and manifest["dtype"] == "uint16" and manifest["length"] == 16
  assert manifest["tokenizer"]["vocab_size"] == 23 and manifest["tokenizer"]["mask_id"] == 4
  assert train["rows"] == len(expected) and train["tokens"] == 16 * len(expected)
  assert [s["rows"] for s in train["shards"]] == [50] * (len(expected) // 50) + [len(expected) % 50]
  prepared_config = _config(tmp_path, tokenizer="bert", tokenizer_path="/nonexistent/vocab.txt",
                            prepared_dir=out)
  bundle = data.build_data(prepared_config)
  assert bundle.tokenizer.fingerprint() == bert.fingerprint()
  np.testing.assert_array_equal(np.asarray(bundle.train_tokens_NL), expected)
  np.testing.assert_array_equal(bundle.train_tokens_NL[3:5], expected[3:5])
  np.testing.assert_array_equal(bundle.train_tokens_NL[-1], expected[-1])
  in_order = data.make_train_iterator(bundle.train_tokens_NL, batch_size=8, seed=0, shuffle=False)
  np.testing.assert_array_equal(np.concatenate(_take(in_order, 3)), expected[:24])
  eval_rows = np.concatenate(list(data.eval_batches(bundle.valid_tokens_NL, 4)))
  np.testing.assert_array_equal(eval_rows, np.asarray(bundle.valid_tokens_NL)[:len(eval_rows)])


def test_prepare_resumes_after_interruption(tmp_path, bert_path, monkeypatch):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  _, reference, _ = _prepare(tmp_path / "a", bert_path)
  writes = []
  real_write = records.write_records

  def write_twice_then_die(path, rows):
    if len(writes) == 2:
      raise KeyboardInterrupt
    writes.append(os.path.basename(path))
    return real_write(path, rows)
  monkeypatch.setattr(prepare_lib, "write_records", write_twice_then_die)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tmp_path / "b", bert_path)
  out = str(tmp_path / "b" / "prepared")
  with pytest.raises(ValueError, match="incomplete .* run the same prepare command again"):
    prepared.load(out, length=16, wrap="bos_eos")
  monkeypatch.setattr(prepare_lib, "write_records", real_write)
  _prepare(tmp_path / "b", bert_path)    # resumes after the last finished shard
  assert writes == ["train-00000.array_record", "train-00001.array_record"]
  got, ref = (prepared.load(d, length=16, wrap="bos_eos") for d in (out, reference))
  for a, b in zip(got[1:], ref[1:]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prepared_data_errors(tmp_path, bert_path, gpt2):
  config, out, manifest = _prepare(tmp_path, bert_path)
  with pytest.raises(ValueError, match="length 16 wrapped 'bos_eos' but config.length is 32"):
    prepared.load(out, length=32, wrap="bos_eos")
  with pytest.raises(ValueError, match="not the checkpoint's gpt2 tokenizer"):
    prepared.load(out, length=16, wrap="bos_eos", tokenizer=gpt2)
  config.data.vocab_size = 77
  with pytest.raises(ValueError, match="other settings \\(source differ\\)"):
    prepare_lib.prepare(config, out)
  with pytest.raises(FileNotFoundError, match="holds no manifest.json.*bd3jax.data.prepare"):
    prepared.load(str(tmp_path), length=16, wrap="bos_eos")
  shard = os.path.join(out, manifest["splits"]["validation"]["shards"][0]["file"])
  records.write_records(shard, [b"\x00\x00" * 16])
  with pytest.raises(ValueError, match="holds 1 records but the manifest says"):
    prepared.load(out, length=16, wrap="bos_eos")
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match="is missing"):
    prepared.load(out, length=16, wrap="bos_eos")


def test_prepare_refuses_text_shorter_than_a_row(tmp_path, bert_path):
  config = _config(tmp_path, tokenizer="bert", tokenizer_path=bert_path)
  config.length = 4096
  with pytest.raises(ValueError, match="fewer tokens than one row of length 4096"):
    prepare_lib.prepare(config, str(tmp_path / "out"))


# Several processes.

def _row_id_shards(tmp_path, n_rows: int, length: int = 3) -> data.TokenRows:
  """Rows whose every token is the row's index, in three ArrayRecord files."""
  paths, counts = [], []
  for k, idx in enumerate(np.array_split(np.arange(n_rows), 3)):
    paths.append(str(tmp_path / f"rows-{k}.array_record"))
    counts.append(records.write_records(paths[-1], (np.full(length, i, "<u2").tobytes() for i in idx)))
  return data.TokenRows(paths, counts, length, "uint16")


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_process_shards_cover_prepared_rows_once_and_resume(tmp_path, process_count):
  rows = _row_id_shards(tmp_path, 50)
  per_process, local_batch = 50 // process_count, 2
  epochs = []
  make = functools.partial(data.make_train_iterator, rows, batch_size=local_batch * process_count,
                           seed=1, process_count=process_count)
  for p in range(process_count):
    it = make(process_index=p)
    ids = np.concatenate(_take(it, per_process))[:, 0]    # two epochs of this process's rows
    epochs.append(ids[:per_process])
    assert sorted(ids[:per_process]) == sorted(ids[per_process:])    # the next epoch: the same rows,
    assert list(ids[:per_process]) != list(ids[per_process:])        # reshuffled
    state = it.get_state()
    expected = _take(it, 5)
    resumed = make(process_index=p)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 5)):
      np.testing.assert_array_equal(a, b)
  covered = np.concatenate(epochs)
  assert sorted(covered) == list(range(process_count * per_process))   # each row once, across files
  assert 50 - len(covered) < process_count


class _IdTokenizer(data.Tokenizer):
  """Document "i" is the single token i + 10; BOS 2, EOS 1, pad 0, mask 3."""
  kind, vocab_size, bos_id, eos_id, pad_id, mask_id = "test", 1000, 2, 1, 0, 3

  def encode(self, text):
    return [int(text) + 10]

  def _decode(self, ids):
    return " ".join(str(i - 10) for i in ids)

  def serialize(self):
    return b""


@pytest.mark.parametrize("process_count", [2, 3])
def test_stream_process_shards_cover_documents_once(process_count):
  docs = [str(i) for i in range(31)]
  per_process = 31 // process_count
  seen = []
  for p in range(process_count):
    it = data.make_train_iterator(data.TokenStream(docs, _IdTokenizer(), 2, "eos"),
                                  batch_size=process_count, seed=0, process_index=p,
                                  process_count=process_count)
    tokens = np.concatenate(_take(it, per_process)).reshape(-1)   # one epoch: a doc and an EOS per row
    assert (tokens[1::2] == 1).all()
    seen.append(tokens[0::2] - 10)
  covered = np.concatenate(seen)
  assert sorted(covered) == list(range(process_count * per_process))


def test_batch_and_shard_errors(bert):
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.make_train_iterator(_stream(bert), batch_size=5, seed=0, process_count=2)
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_train_iterator(data.TokenStream(["a"], bert, 16, "eos"), batch_size=2, seed=0,
                             process_index=1, process_count=2)
  assert [list(data.process_shard(10, p, 3)) for p in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
