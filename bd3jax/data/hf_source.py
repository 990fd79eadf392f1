"""Hugging Face `datasets` sources (OpenWebText, ...), an optional extra: pip install 'bd3jax[hf]'."""


def load_split(path: str, name: str, split: str, *, cache_dir: str, text_key: str, split_key: str):
  """The `split` of `datasets.load_dataset(path, name)`, holding only the `text_key` column.

  Args:
    path: config.data.hf_path, a hub dataset ("Skylion007/openwebtext") or a local folder of
      data files; name: its configuration (empty: the default); split: e.g. "train[:-100000]";
    cache_dir: where datasets keeps its files (empty: its default); split_key: the config key naming `split`.
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("config.data.source 'hf' needs the datasets library: pip install 'bd3jax[hf]'") from None
  try:
    ds = datasets.load_dataset(path, name or None, split=split, cache_dir=cache_dir or None)
  except (FileNotFoundError, ConnectionError) as e:
    raise FileNotFoundError(
        f"cannot load config.data.hf_path {path!r}: {e}; check the name, or offline point it at a "
        "local folder of data files (or set HF_DATASETS_OFFLINE=1 with a filled cache)") from None
  except ValueError as e:
    raise ValueError(f"config.data.{split_key} {split!r} of {path!r}: {e}") from None
  if text_key not in ds.column_names:
    raise ValueError(f"{path!r} has no column {text_key!r} (columns: {ds.column_names}); set "
                     "config.data.text_key")
  return ds.select_columns([text_key])
