"""tfds text datasets (LM1B, ...) through `tfds.data_source`: ArrayRecord random access, no TensorFlow."""


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("config.data.source 'tfds' needs tensorflow-datasets (TensorFlow itself is not "
                      "needed): pip install 'bd3jax[tfds]'") from None
  return tfds


def _build_command(name: str, data_dir: str | None) -> str:
  return (f"tfds build {name}" + (f" --data_dir={data_dir}" if data_dir else "")
          + " --file_format=array_record")


def data_source(name: str, split: str, *, data_dir: str, split_key: str):
  """The random-access records of `name`'s `split`, with errors that say what to run.

  Args:
    name: config.data.tfds_name; split: a tfds split (slices like "train[:1%]" work);
    data_dir: tfds data directory (empty: tfds's default); split_key: the config key naming `split`.
  """
  tfds = _tfds()
  data_dir = data_dir or None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"config.data.tfds_name {name!r} is not a tfds dataset; check the name "
                     "(e.g. 'lm1b')") from None
  except Exception as e:  # pylint: disable=broad-except
    error = e
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir_root}; prepare it as ArrayRecord "
        f"files (reading them needs no TensorFlow): {_build_command(name, data_dir)}") from None
  if builder.info.file_format.value != "array_record":
    raise ValueError(
        f"tfds dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
        "which has no random access; rebuild it as ArrayRecord: "
        f"{_build_command(name, data_dir)} --overwrite") from None
  splits = sorted(builder.info.splits)
  raise ValueError(f"config.data.{split_key} {split!r} of tfds dataset {name!r}: {error}; its splits "
                   f"are {splits}") from None
