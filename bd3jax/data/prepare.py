r"""Pre-tokenises a config's data into ArrayRecord shards that training reads with no tokenizer.

  python -m bd3jax.data.prepare --config=configs/owt_bd3lm.py --output=/data/owt_gpt2_1024 \
      [--num_workers=16] [--config.data.KEY=VALUE ...]

then train with `--config.data.prepared_dir=/data/owt_gpt2_1024`. Both splits are tokenized in
grain worker processes and packed exactly as on-the-fly training packs them (one continuous
stream per split). Interrupted, the same command resumes after the last finished shard.
"""

import itertools
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bd3jax.data import prepared, stream
from bd3jax.data.documents import load_documents
from bd3jax.data.records import write_records
from bd3jax.data.tokenizers import load_tokenizer, tokenizer_from_bytes

# The config.data keys that decide what the documents and the tokenizer are.
SOURCE_KEYS = ("source", "train_files", "valid_files", "valid_fraction", "text_key", "tfds_name",
               "hf_path", "hf_name", "train_split", "valid_split", "tokenizer", "tokenizer_path",
               "vocab_size")
_SHARD_TOKENS = 1 << 26


def _setup(config) -> dict:
  return {"length": config.length, "wrap": config.data.wrap,
          "source": {k: config.data[k] for k in SOURCE_KEYS}}


def _start(config, output: str, tokenizer_docs) -> tuple[dict, object]:
  """The manifest to continue (new, or the interrupted one in `output`) and the tokenizer."""
  manifest = prepared.read_manifest(output)
  setup = _setup(config)
  if manifest is not None:
    differ = [k for k in setup if manifest.get(k) != setup[k]]
    if differ:
      raise ValueError(f"{output} holds data prepared with other settings ({', '.join(differ)} differ); "
                       "use another --output")
    with open(os.path.join(output, prepared.TOKENIZER), "rb") as f:
      return manifest, tokenizer_from_bytes(f.read())
  tokenizer = load_tokenizer(config.data, tokenizer_docs)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, prepared.TOKENIZER), "wb") as f:
    f.write(tokenizer.serialize())
  manifest = {
      "format": prepared.FORMAT, **setup,
      "dtype": "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32",
      "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                    "eos_id": tokenizer.eos_id, "mask_id": tokenizer.mask_id,
                    "fingerprint": tokenizer.fingerprint(), "file": prepared.TOKENIZER},
      "splits": {}, "complete": False}
  prepared.write_manifest(output, manifest)
  return manifest, tokenizer


def _prepare_split(manifest: dict, output: str, split: str, docs, tokenizer, *,
                   num_workers: int, rows_per_shard: int) -> None:
  entry = manifest["splits"].setdefault(
      split, {"documents": len(docs), "shards": [], "state": None, "done": False})
  if entry["done"]:
    return
  it = iter(stream.one_pass(docs, tokenizer, manifest["length"], manifest["wrap"],
                            num_workers=num_workers))
  if entry["state"] is not None:
    it.set_state(entry["state"])
  dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
  try:
    while True:
      rows_NL = list(itertools.islice(it, rows_per_shard))
      if rows_NL:
        rows_NL = np.stack(rows_NL)
        name = f"{split}-{len(entry['shards']):05d}.array_record"
        write_records(os.path.join(output, name), (row.astype(dtype).tobytes() for row in rows_NL))
        entry["shards"].append({"file": name, "rows": len(rows_NL), "min_id": int(rows_NL.min()),
                                "max_id": int(rows_NL.max())})
        entry["state"] = it.get_state()
        prepared.write_manifest(output, manifest)
        logging.info("%s: wrote %s (%d rows)", split, name, len(rows_NL))
      if len(rows_NL) < rows_per_shard:
        break
  finally:
    it.close()
  entry["rows"] = sum(s["rows"] for s in entry["shards"])
  if not entry["rows"]:
    raise ValueError(f"the {split} split's {len(docs)} documents give fewer tokens than one row of "
                     f"length {manifest['length']}; add text or lower config.length")
  entry["tokens"] = entry["rows"] * manifest["length"]
  entry["done"] = True
  prepared.write_manifest(output, manifest)


def prepare(config, output: str, *, num_workers: int = 0, rows_per_shard: int = 0) -> dict:
  """Tokenizes and packs both splits of `config.data` into `output`; returns the manifest.

  Resumes an interrupted preparation of the same settings in `output`; refuses other settings.
  `rows_per_shard` 0 gives shards of about 64M tokens.
  """
  stream.body_length(config.length, config.data.wrap)
  train_docs, valid_docs, _ = load_documents(config.data)
  manifest, tokenizer = _start(config, output, train_docs)
  rows_per_shard = rows_per_shard or max(1, _SHARD_TOKENS // config.length)
  for split, docs in zip(prepared.SPLITS, (train_docs, valid_docs)):
    _prepare_split(manifest, output, split, docs, tokenizer, num_workers=num_workers,
                   rows_per_shard=rows_per_shard)
  manifest["complete"] = True
  prepared.write_manifest(output, manifest)
  return manifest


def main(argv):
  del argv
  f = flags.FLAGS
  manifest = prepare(f.config, f.output, num_workers=f.num_workers, rows_per_shard=f.rows_per_shard)
  for split in prepared.SPLITS:
    entry = manifest["splits"][split]
    logging.info("%s: %d documents -> %d rows, %d tokens in %d shards", split, entry["documents"],
                 entry["rows"], entry["tokens"], len(entry["shards"]))
  print(f"prepared {f.output}; train with --config.data.prepared_dir={f.output}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("output", None, "directory for the shards and the manifest")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "tokenizer processes")
  flags.DEFINE_integer("rows_per_shard", 0, "rows per shard (0: about 64M tokens)")
  flags.mark_flags_as_required(["config", "output"])
  app.run(main)
