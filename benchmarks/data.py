"""Speed of the training data paths, in tokens/s delivered by `make_train_iterator`.

  python benchmarks/data.py                          # all paths, worker counts 0,1,2
  python benchmarks/data.py --paths=prepared --workers=0,4 --windows=10
  python benchmarks/data.py --paths=on_the_fly --gpt2_path=DIR --bert_path=vocab.txt

Prints one JSON line per measurement:
- on_the_fly: documents tokenized while training (config.data.stream): a `TokenStream` over the
  bundled demo corpus, read with `--workers` grain worker processes; per tokenizer, with the
  paper's row layout (sentencepiece and gpt2: L = 1024, EOS after each document; bert: L = 128,
  [CLS] + 126 + [SEP]). Offline, the gpt2 and bert vocabularies are made from a sentencepiece
  vocabulary trained on the demo corpus (same algorithms, smaller vocabularies); give the real
  files with --gpt2_path (directory of vocab.json + merges.txt, or a .tiktoken file) and
  --bert_path (vocab.txt).
- prepared: pre-tokenised rows (uint16) in ArrayRecord shards, read by `make_train_iterator`
  (shuffled, batched random access), for L = 128 and L = 1024.
Timing: the first batch (worker start-up) is excluded; then batches are drawn for `--windows`
windows of `--seconds` each, and tokens_per_s is the median over the windows of rows * L /
elapsed. `cores` is os.cpu_count() of the machine (shared machines add noise: rerun).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from bd3jax import data  # noqa: E402
from bd3jax.data import records  # noqa: E402

_SECONDS = flags.DEFINE_float("seconds", 1.0, "Seconds per timed window.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per measurement (the median is reported).")
_PATHS = flags.DEFINE_list("paths", ["prepared", "on_the_fly"], "Which data paths to measure.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure.")
_GPT2 = flags.DEFINE_string("gpt2_path", "", "GPT-2 vocab.json + merges.txt directory or .tiktoken file.")
_BERT = flags.DEFINE_string("bert_path", "", "BERT vocab.txt.")
_PREPARED_TOKENS = flags.DEFINE_integer("prepared_tokens", 100_000_000, "Tokens written per prepared set.")


def _tokenizers(docs: list[str]) -> dict:
  """sentencepiece, gpt2 and bert tokenizers; made offline from one trained sentencepiece vocabulary."""
  sp = data.train_sentencepiece(docs, vocab_size=8192)
  pieces = [sp._sp.id_to_piece(i) for i in range(sp._sp.get_piece_size())]  # pylint: disable=protected-access
  words = [p for p in pieces if not (p.startswith("<") and p.endswith(">")) and p != "[MASK]"]
  if _GPT2.value:
    gpt2 = data.GPT2Tokenizer.load(_GPT2.value)
  else:
    ranks = {bytes([b]): b for b in range(256)}
    for piece in words:
      ranks.setdefault(piece.replace("\u2581", " ").encode(), len(ranks))
    gpt2 = data.GPT2Tokenizer(ranks, len(ranks))
  if _BERT.value:
    bert = data.WordPieceTokenizer.load(_BERT.value)
  else:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(33, 127)]
    vocab += sorted({p[1:].lower() if p.startswith("\u2581") else "##" + p.lower() for p in words} - {"", "##"})
    bert = data.WordPieceTokenizer(vocab)
  return {"sentencepiece": (sp, 1024, "eos"), "gpt2": (gpt2, 1024, "eos"), "bert": (bert, 128, "bos_eos")}


def _measure(it, batch_rows: int, length: int) -> float:
  """Median tokens/s over `--windows` windows of `--seconds`, after the first batch."""
  next(it)    # start-up: worker processes, first reads
  rates = []
  for _ in range(_WINDOWS.value):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < _SECONDS.value:
      next(it)
      n += batch_rows * length
    rates.append(n / (time.perf_counter() - t0))
  return common.median(rates)


def _on_the_fly(docs, tokenizers, workers):
  for name, (tok, length, wrap) in tokenizers.items():
    batch = 64 if length == 1024 else 512
    for w in workers:
      it = data.make_train_iterator(data.TokenStream(docs, tok, length, wrap), batch_size=batch,
                                    seed=0, num_workers=w)
      try:
        tokens_per_s = _measure(it, batch, length)
      finally:
        it.close()
      common.emit({"bench": "on_the_fly", "tokenizer": name, "vocab_size": tok.vocab_size,
                   "length": length, "batch": batch, "num_workers": w,
                   "tokens_per_s": round(tokens_per_s), "cores": os.cpu_count()})


def _prepared(ids: np.ndarray, workers):
  with tempfile.TemporaryDirectory() as tmp:
    for length, batch in ((128, 512), (1024, 64)):
      n_rows = _PREPARED_TOKENS.value // length
      rows_NL = np.resize(ids, n_rows * length).reshape(n_rows, length).astype("<u2")
      shards = np.array_split(np.arange(n_rows), 4)
      paths = [os.path.join(tmp, f"rows{length}-{i}.array_record") for i in range(len(shards))]
      for path, idx in zip(paths, shards):
        records.write_records(path, (rows_NL[i].tobytes() for i in idx))
      rows = data.TokenRows(paths, [len(s) for s in shards], length, "uint16")
      for w in workers:
        it = data.make_train_iterator(rows, batch_size=batch, seed=0, num_workers=w)
        try:
          tokens_per_s = _measure(it, batch, length)
        finally:
          it.close()
        common.emit({"bench": "prepared", "format": "arrayrecord uint16, one row per record",
                     "length": length, "batch": batch, "rows": n_rows, "num_workers": w,
                     "tokens_per_s": round(tokens_per_s), "cores": os.cpu_count()})


def main(argv):
  del argv
  workers = [int(w) for w in _WORKERS.value]
  docs = data.demo_documents()
  tokenizers = _tokenizers(docs)
  sp = tokenizers["sentencepiece"][0]
  if "prepared" in _PATHS.value:
    _prepared(np.concatenate([sp.encode(d) + [sp.eos_id] for d in docs]), workers)
  if "on_the_fly" in _PATHS.value:
    _on_the_fly(docs, tokenizers, workers)


if __name__ == "__main__":
  app.run(main)
