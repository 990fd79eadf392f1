"""Multi-host reading: which part of the data each JAX process reads (bd3jax.parallel assembles
the global batches)."""


def local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """Rows per step of one process: the global `batch_size` split evenly over the processes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes; "
                     "set config.train.batch_size to a multiple of the process count")
  return batch_size // process_count


def process_shard(n: int, process_index: int, process_count: int) -> range:
  """Process p's items: the p-th of `process_count` equal contiguous ranges of `range(n)`.

  The n mod P items at the end are read by no process, so all processes see equally many.
  """
  per_process = n // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)
