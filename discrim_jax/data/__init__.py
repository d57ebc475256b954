"""Data sets: the paper's, the offline ``fashion_mnist``, any TFDS name, an
image folder; in memory or streamed.

``tfds_access`` says what a data set is (catalogue, splits, hold-outs, label
checks); ``batching`` which example each process reads at ``(seed, step)``;
``pipeline`` holds a data set in memory and ``streaming`` streams it, each
reading through those two; :func:`make_iterator` serves either.
"""

from discrim_jax import _app

_app.require(__name__)

# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
from collections.abc import Iterator
from typing import Any

import numpy as np

from discrim_jax.data import pipeline
from discrim_jax.data import streaming
from discrim_jax.data.pipeline import (Dataset, get_info, steps_per_epoch,
                                       to_global_batch)
from discrim_jax.data.tfds_access import (DATASETS, SPLITS, DatasetInfo,
                                          check_labels, parse_holdout)

__all__ = ["DATASETS", "SPLITS", "Dataset", "DatasetInfo", "check_labels",
           "get_info", "make_iterator", "measure_throughput", "parse_holdout",
           "steps_per_epoch", "to_global_batch"]


def make_iterator(
    dataset: Any,
    split: str,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    start_step: int = 0,
    augment: bool | None = None,
    normalize: bool = False,
    crop_padding: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    **dataset_kwargs: Any,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ``{"image": float32 NHWC in [0, 1], "label": int32}``.

  Args:
    dataset: a data set name or a loaded :class:`Dataset`.
    split: ``train``, ``validation`` or ``test``.
    batch_size: the global batch size; each process yields its own
      ``batch_size / process_count`` rows of every global batch.
    train: True for an endless, per-epoch shuffled stream (last partial batch
      of each epoch dropped); False for one ordered pass in which every
      example appears exactly once, the last batch padded and marked by
      ``"mask"`` (1.0 real, 0.0 padding).
    seed: the epoch order and the augmentation are functions of (seed, epoch).
    start_step: the number of training batches already consumed (resume).
    augment: random crop + flip; defaults to ``train``.
    normalize: subtract the training set's per-channel mean and divide by its
      std (the reference recipe does not).
    crop_padding: padding of the random crop, in pixels.
    process_index, process_count: this process's place among the hosts
      (default: ``jax.process_index()`` / ``jax.process_count()``).
    prefetch: batches prepared ahead by tf.data.
    **dataset_kwargs: passed to :class:`Dataset` when ``dataset`` is a name.
  """
  if isinstance(dataset, str):
    dataset = pipeline.Dataset(dataset, **dataset_kwargs)
  elif dataset_kwargs:
    raise ValueError(f"{sorted(dataset_kwargs)} only apply when the data set "
                     "is given by name")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  augment = train if augment is None else augment
  # The reader the data set was loaded for: in memory or streamed; both give
  # the same batches (batching.py writes the order once for both).
  reader = streaming if getattr(dataset, "streaming", False) else pipeline
  return reader.iterate(
      dataset, split, batch_size, train=train, seed=seed,
      start_step=start_step, augment=augment, normalize=normalize,
      crop_padding=crop_padding, process_index=process_index,
      process_count=process_count, prefetch=prefetch)


def measure_throughput(name: str, batch_size: int, steps: int, *,
                       data_dir: str | None = None) -> float:
  """Images/s of the augmented training iterator after 10 warm-up batches
  (reading the split into memory is not timed)."""
  import time  # pylint: disable=g-import-not-at-top
  dataset = pipeline.Dataset(name, data_dir=data_dir)
  dataset.arrays("train")
  it = make_iterator(dataset, "train", batch_size, train=True,
                     process_index=0, process_count=1)
  for _ in range(10):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch_size / (time.perf_counter() - start)
