"""Tests of the scalable sources: tfds (mock_data and a real ArrayRecord build, no TensorFlow),
Hugging Face datasets from a local folder, ArrayRecord text files; and their errors."""

import json
import sys

import ml_collections
import numpy as np
import pytest

from bd3jax import data
from bd3jax.data import documents, records

tfds = pytest.importorskip("tensorflow_datasets")


def _data(**kw) -> ml_collections.ConfigDict:
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config().data
  config.update(kw)
  return config


# tfds.

def test_tfds_lm1b_with_mock_data():
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    train, valid, n_replaced = data.load_documents(_data(source="tfds", tfds_name="lm1b",
                                                    train_split="train", valid_split="test"))
    assert (len(train), len(valid), n_replaced) == (7, 7, 0)
    assert all(isinstance(d, str) and d for d in train)
  assert "tensorflow" not in sys.modules


class TinyText(tfds.core.GeneratorBasedBuilder):
  """A real tfds text dataset, built as ArrayRecord files without TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"document {i} café"}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  TinyText(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


def test_tfds_real_array_record_without_tensorflow(tiny_tfds_dir):
  train, valid, _ = data.load_documents(_data(source="tfds", tfds_name="tiny_text", data_dir=tiny_tfds_dir,
                                         train_split="train", valid_split="test"))
  assert sorted(train) == [f"document {i} café" for i in range(6)]
  assert sorted(valid) == ["document 0 café", "document 1 café"]
  train, _, _ = data.load_documents(_data(source="tfds", tfds_name="tiny_text", data_dir=tiny_tfds_dir,
                                     train_split="train[:50%]", valid_split=""))
  assert len(train) == 3 - 1   # a held-out valid_fraction of the 3 documents
  assert "tensorflow" not in sys.modules


def test_tfds_errors(tiny_tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=(
      f"not prepared in {tmp_path}.*tfds build tiny_text --data_dir={tmp_path} --file_format=array_record")):
    data.load_documents(_data(source="tfds", tfds_name="tiny_text", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"config.data.valid_split 'validation'.*splits are \['test', 'train'\]"):
    data.load_documents(_data(source="tfds", tfds_name="tiny_text", data_dir=tiny_tfds_dir, valid_split="validation"))
  with pytest.raises(ValueError, match="config.data.tfds_name 'lm1bx' is not a tfds dataset"):
    data.load_documents(_data(source="tfds", tfds_name="lm1bx", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="needs config.data.tfds_name"):
    data.load_documents(_data(source="tfds"))


# Hugging Face datasets.

@pytest.fixture
def owt_folder(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)   # no test touches the network
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "owt"
  folder.mkdir()
  with open(folder / "train.jsonl", "w") as f:
    for i in range(12):
      f.write(json.dumps({"text": f"web page {i}", "url": f"u{i}"}) + "\n")
  return str(folder)


def test_hf_reference_holdout(owt_folder, tmp_path):
  cfg = _data(source="hf", hf_path=owt_folder, train_split="train[:-5]", valid_split="train[-5:]",
              data_dir=str(tmp_path / "cache"))
  train, valid, _ = data.load_documents(cfg)
  assert list(train) == [f"web page {i}" for i in range(7)]
  assert list(valid) == [f"web page {i}" for i in range(7, 12)]


def test_hf_errors(owt_folder, tmp_path):
  with pytest.raises(ValueError, match="config.data.valid_split 'validation'.*Unknown split"):
    data.load_documents(_data(source="hf", hf_path=owt_folder, valid_split="validation"))
  with pytest.raises(ValueError, match=r"no column 'body'.*config.data.text_key"):
    data.load_documents(_data(source="hf", hf_path=owt_folder, text_key="body"))
  with pytest.raises(FileNotFoundError, match="cannot load config.data.hf_path"):
    data.load_documents(_data(source="hf", hf_path=str(tmp_path / "missing")))


# ArrayRecord text files.

def test_arrayrecord_documents(tmp_path):
  records.write_records(str(tmp_path / "a.array_record"), [b"first doc", "second d\u00f6c".encode(), b"bad \xff"])
  records.write_records(str(tmp_path / "b.array_record"), [b"third doc"])
  train, valid, _ = data.load_documents(_data(source="arrayrecord", train_files=str(tmp_path / "*.array_record"),
                                         valid_files=str(tmp_path / "b.array_record")))
  assert list(train) == ["first doc", "second d\u00f6c", "bad \ufffd", "third doc"]
  assert list(valid) == ["third doc"]
  train, valid, _ = data.load_documents(_data(source="arrayrecord", train_files=str(tmp_path / "a.array_record"),
                                         valid_fraction=0.3))
  assert len(valid) == 1 and sorted([*train, *valid]) == sorted(["first doc", "second d\u00f6c", "bad \ufffd"])


def test_arrayrecord_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.train_files .* matches no ArrayRecord file"):
    data.load_documents(_data(source="arrayrecord", train_files=str(tmp_path / "*.array_record")))
  records.write_records(str(tmp_path / "empty.array_record"), [])
  with pytest.raises(ValueError, match="empty.array_record holds no records"):
    data.load_documents(_data(source="arrayrecord", train_files=str(tmp_path / "empty.array_record")))
  (tmp_path / "junk.array_record").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.array_record is not a readable ArrayRecord file"):
    data.load_documents(_data(source="arrayrecord", train_files=str(tmp_path / "junk.array_record")))


def test_lazy_hold_out_is_deterministic():
  docs = documents.TextRecords([f"d{i}".encode() for i in range(50)])
  train, valid = documents.hold_out(docs, 0.1)
  assert len(valid) == 5 and sorted([*train, *valid]) == sorted(f"d{i}" for i in range(50))
  assert list(valid) == list(documents.hold_out(docs, 0.1)[1])
  assert np.all(np.diff([int(d[1:]) for d in train]) > 0)   # corpus order kept
