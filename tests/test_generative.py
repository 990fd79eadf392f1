"""Generative evaluation: sliding-window scoring, EOS exclusion, the AR and HF scorers, reports."""

import dataclasses
import json

import numpy as np
import pytest
import tiny_config

from bd3jax import api, generative, run


class CharScorer:
  """A fake scorer: one id per character; NLL of target j = its id / 100 + 0.001 * context."""
  bos_id, eos_id = 1, 2

  def __init__(self, window):
    self.window, self.calls = window, []

  def encode(self, text):
    return [3 + (ord(c) % 50) if c != "|" else self.eos_id for c in text]

  def nll(self, ids_BW):
    self.calls.append(ids_BW.shape)
    ids = np.asarray(ids_BW, np.float64)
    return np.concatenate([np.zeros((len(ids), 1)), ids[:, 1:] / 100 + 0.001 * np.arange(1, ids.shape[1])], 1)


@pytest.mark.parametrize("n, window", [(1, 4), (3, 4), (10, 4), (11, 5), (40, 8), (7, 64)])
def test_windows_score_every_target_once_with_half_a_context(n, window):
  seq = list(range(n))
  scored = []
  for w in generative._windows(0, seq, window):
    assert len(w.ids) <= window
    start = seq.index(w.ids[0])
    for j in range(w.first, len(w.ids)):
      scored.append(start + j)
      assert j >= min(window // 2, start + j)  # context: half a window, or all that exists
  assert scored == list(range(1, n))


def test_score_texts_excludes_eos_targets_and_counts_tokens():
  scorer = CharScorer(window=6)
  texts = ["abc", "hello world, this is long|", "x|y"]
  nll_N, count_N = generative.score_texts(scorer, texts, batch_size=3)
  for text, nll, count in zip(texts, nll_N, count_N):
    ids = scorer.encode(text)
    assert count == sum(1 for i in ids if i != scorer.eos_id)
    if len(ids) + 1 <= scorer.window:  # one window: context = position
      expected = sum(i / 100 + 0.001 * (j + 1) for j, i in enumerate(ids) if i != scorer.eos_id)
      np.testing.assert_allclose(nll, expected)
  assert all(shape[0] == 3 for shape in scorer.calls)


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ar")
  config = tiny_config.get_config()
  config.update(algo="ar", block_size=1)
  config.train.update(num_steps=2, checkpoint_every=2)
  run.train_and_evaluate(config, str(workdir))
  return str(workdir)


def test_ar_scorer_matches_the_models_nll_and_slides_past_its_context(ar_workdir):
  model = api.BD3LM.from_workdir(ar_workdir)
  scorer = generative.ARScorer(model)
  assert scorer.window == 32
  text = "def f(x): return x + 1"
  ids = [scorer.bos_id] + scorer.encode(text)
  assert len(ids) <= scorer.window
  nll_N, count_N = generative.score_texts(scorer, [text])
  np.testing.assert_allclose(nll_N[0], model.nelbo(np.array([ids]))[0, 1:].sum(), rtol=1e-5)
  assert count_N[0] == len(ids) - 1
  long_text = " ".join(["the module imports the package and returns a value"] * 6)
  n_ids = len(scorer.encode(long_text))
  assert n_ids + 1 > 2 * scorer.window
  nll_N, count_N = generative.score_texts(scorer, [long_text, text], batch_size=4)
  assert count_N.tolist() == [n_ids, len(ids) - 1] and np.all(np.isfinite(nll_N))
  with pytest.raises(ValueError, match="autoregressive"):
    generative.ARScorer(api.BD3LM(dataclasses.replace(model.model_cfg, adaln=True), model.params,
                                  length=32, block_size=4, tokenizer=model.tokenizer))


def test_sample_mode_writes_a_scored_report(ar_workdir, tmp_path):
  config = tiny_config.get_config()
  config.train.update(num_steps=2, checkpoint_every=2)
  run.train_and_evaluate(config, str(tmp_path))
  config.sample.update(num_samples=3, scorer=ar_workdir)
  rows = api.sample_workdir(config, str(tmp_path))
  report = json.loads((tmp_path / "samples_report.json").read_text())
  assert report["samples"] == 3 and report["scorer"] == ar_workdir
  assert report["length_mean"] == np.mean([r["length"] for r in rows])
  assert report["gen_ppl"] > 1 and report["scored_tokens"] > 0
  np.testing.assert_allclose(report["gen_ppl"], np.exp(report["gen_nll"]))
  assert report["nfes"] == np.mean([r["nfes"] for r in rows])


def test_hf_scorer_agrees_with_the_models_own_loss():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  model = transformers.GPT2LMHeadModel(config)

  class Tokenizer:  # a character tokenizer standing in for GPT-2's BPE (no download)
    eos_token_id, bos_token_id = 0, 0
    def encode(self, text, add_special_tokens=False):
      return [1 + ord(c) % 63 for c in text]

  scorer = generative.HFScorer("tiny", model=model, tokenizer=Tokenizer())
  assert scorer.window == 16
  text = "print(42)"
  ids = torch.tensor([[0] + Tokenizer().encode(text)])
  with torch.no_grad():
    expected = float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
  nll_N, count_N = generative.score_texts(scorer, [text])
  np.testing.assert_allclose(nll_N[0], expected, rtol=1e-4)
  assert count_N[0] == len(text)
