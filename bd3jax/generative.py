"""Generative evaluation: perplexity of samples under a scoring AR model, entropy, NFEs, lengths.

A scorer re-tokenizes each sample's text with its own tokenizer, prefixes its BOS and scores
every token of it with a sliding window of its context length (windows advance by half a
context; each token is scored once, with at least half a context before it once the sample
is longer than one window). EOS targets are not scored. Two scorers:
- `ARScorer`: a bd3jax autoregressive model (`algo = "ar"`), e.g. `BD3LM.from_workdir(AR_RUN)`;
- `HFScorer`: a Hugging Face causal LM (GPT-2 Large in the paper), with `pip install
  'bd3jax[gpt2-eval]'` and its weights on disk or reachable.
"""

import dataclasses
from typing import Protocol

import numpy as np


class Scorer(Protocol):
  bos_id: int
  eos_id: int
  window: int   # tokens the scorer sees at once

  def encode(self, text: str) -> list[int]: ...

  def nll(self, ids_BW: np.ndarray) -> np.ndarray:
    """float [B, W]: -log p(ids[:, j] | ids[:, :j]) for j >= 1; column 0 is ignored."""


class ARScorer:
  """Scores with a bd3jax autoregressive `BD3LM` (exact next-token NLL)."""

  def __init__(self, model):
    if not model.is_autoregressive or model.tokenizer is None:
      raise ValueError("the scoring model must be an autoregressive bd3jax model (algo 'ar') "
                       "with a tokenizer, e.g. BD3LM.from_workdir(AR_WORKDIR)")
    self.model, self.window = model, model.length
    self.bos_id, self.eos_id = model.ids.bos_id, model.ids.eos_id

  def encode(self, text: str) -> list[int]:
    return self.model.tokenizer.encode(text)

  def nll(self, ids_BW: np.ndarray) -> np.ndarray:
    return self.model.nelbo(ids_BW)


class HFScorer:
  """Scores with a Hugging Face causal LM (PyTorch), e.g. `HFScorer("gpt2-large")`."""

  def __init__(self, name_or_path: str, *, model=None, tokenizer=None, device: str = "cpu"):
    try:
      import torch
      import transformers
    except ImportError as e:
      raise ImportError("HFScorer needs transformers and torch: pip install "
                        "'bd3jax[gpt2-eval]'") from e
    self._torch = torch
    self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(name_or_path)
    self.model = (model or transformers.AutoModelForCausalLM.from_pretrained(name_or_path)).to(device).eval()
    self.device = device
    self.window = int(self.model.config.max_position_embeddings)
    self.eos_id = int(self.tokenizer.eos_token_id)
    self.bos_id = int(self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                      else self.eos_id)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def nll(self, ids_BW: np.ndarray) -> np.ndarray:
    torch = self._torch
    with torch.no_grad():
      ids = torch.as_tensor(np.asarray(ids_BW), dtype=torch.long, device=self.device)
      log_p = torch.log_softmax(self.model(ids).logits[:, :-1].float(), dim=-1)
      nll = -log_p.gather(-1, ids[:, 1:, None])[..., 0]
    return np.pad(nll.cpu().numpy(), ((0, 0), (1, 0)))


@dataclasses.dataclass(frozen=True)
class _Window:
  sample: int
  ids: list[int]      # at most `window` ids
  first: int          # index in `ids` of the first scored target


def _windows(sample: int, seq: list[int], window: int) -> list[_Window]:
  """Windows over `seq` scoring each target (index >= 1) exactly once."""
  out, start, done = [], 0, 1
  stride = max(window // 2, 1)
  while done < len(seq):
    end = min(start + window, len(seq))
    out.append(_Window(sample, seq[start:end], done - start))
    done, start = end, start + stride
  return out


def score_texts(scorer: Scorer, texts: list[str], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample summed NLL (nats) and number of scored tokens, as float64 / int64 [N]."""
  windows = [w for i, text in enumerate(texts)
             for w in _windows(i, [scorer.bos_id] + scorer.encode(text), scorer.window)]
  nll_N, count_N = np.zeros(len(texts)), np.zeros(len(texts), np.int64)
  width = max((len(w.ids) for w in windows), default=1)
  for b in range(0, len(windows), batch_size):
    chunk = windows[b:b + batch_size]
    ids_BW = np.full((batch_size, width), scorer.eos_id, np.int32)
    for row, w in zip(ids_BW, chunk):
      row[:len(w.ids)] = w.ids
    nll_BW = np.asarray(scorer.nll(ids_BW), np.float64)
    for row, w in zip(nll_BW, chunk):
      target = np.arange(len(w.ids))
      keep = (target >= w.first) & (np.asarray(w.ids) != scorer.eos_id)
      nll_N[w.sample] += row[:len(w.ids)][keep].sum()
      count_N[w.sample] += int(keep.sum())
  return nll_N, count_N


def report(rows: list[dict], scorer: Scorer | None = None, batch_size: int = 8) -> dict:
  """Summary of sampler rows (`sampling.rows`, with text when scored): generative perplexity
  (token-weighted over all samples) under `scorer`, mean unigram entropy, NFEs and lengths."""
  lengths = np.array([r["length"] for r in rows])
  nfes = np.array([r["nfes"] for r in rows])
  out = {"samples": len(rows), "entropy": float(np.mean([r["entropy"] for r in rows])),
         "nfes": float(nfes.mean()), "nfes_per_token": float(nfes.sum() / lengths.sum()),
         "length_mean": float(lengths.mean()), "length_min": int(lengths.min()),
         "length_max": int(lengths.max())}
  if scorer is not None:
    if any("text" not in r for r in rows):
      raise ValueError("generative perplexity scores text: sample with a tokenizer")
    nll_N, count_N = score_texts(scorer, [r["text"] for r in rows], batch_size)
    out.update(gen_nll=float(nll_N.sum() / max(count_N.sum(), 1)),
               scored_tokens=int(count_N.sum()))
    out["gen_ppl"] = float(np.exp(out["gen_nll"]))
  return out


def load_scorer(spec: str) -> Scorer:
  """`hf:NAME_OR_PATH` (a Hugging Face causal LM) or the workdir of a bd3jax AR run."""
  if spec.startswith("hf:"):
    return HFScorer(spec[3:])
  from bd3jax.api import BD3LM
  return ARScorer(BD3LM.from_workdir(spec))
