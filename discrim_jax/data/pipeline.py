"""Input pipelines: TFDS for reading, tf.data for augmentation and batching.

Each split is read once through TFDS (the real download-and-prepare path for
``cifar100`` and ``caltech101``; Debian's files for ``fashion_mnist``) into
host memory as uint8 arrays; these data sets are small (CIFAR-100 is 150 MB).
Batches are then cut by index, which makes every epoch's order a pure function
of ``(seed, epoch)``: a run resumed at step ``s`` sees exactly the batches an
uninterrupted run sees from step ``s``, and a multi-host run sees the same
global batches as a single-host run, each process taking its own rows.

Splits: ``train`` and ``validation`` are carved out of the official training
split with a fixed seed (``validation_seed``): a random 4,000 images for
CIFAR-100 (as in the reference recipe), 5,000 for Fashion-MNIST, and 5 images
per class for Caltech-101. ``test`` is the official test split.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools
import os
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: str
  test_split: str
  # Validation hold-out from the official train split: a total, or per class.
  holdout: int = 0
  holdout_per_class: int = 0
  resize: bool = False


_SPECS = {
    "cifar100": _Spec("cifar100", "test", holdout=4000),
    "caltech101": _Spec("caltech101", "test", holdout_per_class=5, resize=True),
    "fashion_mnist": _Spec("debian_fashion_mnist", "test", holdout=5000),
}
DATASETS = tuple(sorted(_SPECS))
DEFAULT_CALTECH_SIZE = 224


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training code needs to know about a data set."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_examples: dict[str, int]  # 'train', 'validation', 'test'


@functools.cache
def _tf():
  """(tensorflow, tensorflow_datasets), imported on first use.

  Only reading and batching data need them: the models, the losses and the
  compiled steps also run where JAX alone is installed (an accelerator image).
  """
  try:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading data sets needs tensorflow and tensorflow-datasets ({e}); "
        "install the project's dependencies: pip install -e .") from e
  # TensorFlow must not grab the accelerators JAX is going to use.
  tf.config.set_visible_devices([], "GPU")
  if os.environ.get("DISCRIM_JAX_QUIET_TFDS"):  # set by cli.route_logs
    tfds.disable_progress_bar()
  return tf, tfds


def _check_name(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f"unknown data set {name!r}; known data sets: {list(DATASETS)}")
  return _SPECS[name]


def _builder(spec: _Spec, data_dir: str | None) -> Any:
  _, tfds = _tf()
  if spec.tfds_name == "debian_fashion_mnist":
    from discrim_jax.data.fashion_mnist import DebianFashionMnist  # pylint: disable=g-import-not-at-top
    return DebianFashionMnist(data_dir=data_dir)
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises ValueError if any label lies outside [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(
        f"{where}: {bad.size} label(s) outside [0, {num_classes}), e.g. "
        f"{bad[:5].tolist()}; the data and the number of classes disagree")


class Dataset:
  """One data set's splits, read once into host memory.

  Args:
    name: ``cifar100``, ``caltech101`` or ``fashion_mnist``.
    data_dir: TFDS data folder (TFDS's default when None): where prepared
      data is found, or written by ``download_and_prepare``.
    image_size: side of the square images Caltech-101 is resized to (other
      data sets keep their size and reject a different value).
    validation_seed: seed of the fixed validation hold-out.
    validation_size: override the hold-out: a number of images (cifar100,
      fashion_mnist) or of images per class (caltech101).
    download: let TFDS download and prepare the data when it is missing.
    max_examples: split name -> keep only the first N examples (quick runs).
  """

  def __init__(self, name: str, *, data_dir: str | None = None,
               image_size: int | None = None, validation_seed: int = 0,
               validation_size: int | None = None, download: bool = True,
               max_examples: dict[str, int] | None = None):
    self.name = name
    self._max_examples = {k: v for k, v in (max_examples or {}).items() if v}
    self._spec = _check_name(name)
    if validation_size is not None:
      if validation_size < 1:
        raise ValueError(f"validation_size must be >= 1, got {validation_size}")
      field = "holdout_per_class" if self._spec.holdout_per_class else "holdout"
      self._spec = dataclasses.replace(self._spec, **{field: validation_size})
    self._builder = _builder(self._spec, data_dir)
    self._image_size = image_size
    self._validation_seed = validation_seed
    self._download = download
    self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    label = self._builder.info.features["label"]
    self.num_classes = int(label.num_classes)
    shape = tuple(self._builder.info.features["image"].shape)
    if self._spec.resize:
      size = image_size or DEFAULT_CALTECH_SIZE
      shape = (size, size, shape[-1])
    elif image_size not in (None, shape[0]):
      raise ValueError(
          f"{name} images are {shape[0]}x{shape[1]}; image_size={image_size} is "
          "only supported for caltech101 (leave it unset)")
    self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]

  # ------------------------------------------------------------------ reading

  def _read(self, tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
    if self._download:
      self._builder.download_and_prepare()
    ds = self._builder.as_dataset(split=tfds_split, shuffle_files=False)
    tf, _ = _tf()
    size = self.image_shape[:2]
    resize = self._spec.resize

    def convert(example):
      image = example["image"]
      if resize:
        image = tf.image.resize(image, size, antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image, tf.cast(example["label"], tf.int32)

    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
      images.append(x)
      labels.append(y)
    if not images:
      raise ValueError(f"{self.name}: split {tfds_split!r} is empty")
    images, labels = np.concatenate(images), np.concatenate(labels)
    check_labels(labels, self.num_classes, f"{self.name}/{tfds_split}")
    return images, labels

  def _validation_mask(self, labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(self._validation_seed)
    mask = np.zeros(len(labels), bool)
    if self._spec.holdout:
      if self._spec.holdout >= len(labels):
        raise ValueError(
            f"{self.name}: the train split has {len(labels)} examples, too few "
            f"to hold out {self._spec.holdout} for validation")
      mask[rng.permutation(len(labels))[:self._spec.holdout]] = True
    else:
      k = self._spec.holdout_per_class
      for c in range(self.num_classes):
        members = np.flatnonzero(labels == c)
        # Keep at least one training image of every class.
        take = min(k, max(len(members) - 1, 0))
        mask[rng.permutation(members)[:take]] = True
    return mask

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 (N, H, W, C), labels int32 (N,))`` of a split."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if split not in self._arrays:
      if split == "test":
        self._arrays["test"] = self._read(self._spec.test_split)
      else:
        images, labels = self._read("train")
        val = self._validation_mask(labels)
        self._arrays["train"] = (images[~val], labels[~val])
        self._arrays["validation"] = (images[val], labels[val])
      for name, limit in self._max_examples.items():
        if name in self._arrays:
          self._arrays[name] = tuple(a[:limit] for a in self._arrays[name])
    return self._arrays[split]

  @property
  def info(self) -> DatasetInfo:
    return DatasetInfo(
        name=self.name, num_classes=self.num_classes,
        image_shape=self.image_shape,
        num_examples={s: len(self.arrays(s)[1]) for s in SPLITS})

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images, in [0, 1] units."""
    images = self.arrays("train")[0].astype(np.float32) / 255.0
    return images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))


def get_info(name: str, **kwargs: Any) -> DatasetInfo:
  """Number of classes, image shape and split sizes of a data set."""
  return Dataset(name, **kwargs).info


# ------------------------------------------------------------------- batching


def _augment(images: Any, seed: Any, pad: int, rows: slice,
             global_batch: int) -> Any:
  """Random crop with ``pad``-pixel zero padding and horizontal flip, per image.

  The random draws are made for the whole global batch and this process keeps
  its ``rows``, so the augmentation does not depend on the number of hosts.
  """
  tf, _ = _tf()
  h, w = images.shape[1], images.shape[2]
  seeds = tf.random.experimental.stateless_split(seed, 3)
  draw = lambda s, hi: tf.random.stateless_uniform(  # pylint: disable=g-long-lambda
      [global_batch], s, 0, hi, tf.int32)[rows.start:rows.stop]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  dy, dx = draw(seeds[0], 2 * pad + 1), draw(seeds[1], 2 * pad + 1)
  out = tf.gather(padded, dy[:, None] + tf.range(h)[None], axis=1, batch_dims=1)
  out = tf.gather(out, dx[:, None] + tf.range(w)[None], axis=2, batch_dims=1)
  flip = draw(seeds[2], 2) > 0
  return tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)


def _process_range(batch_size: int, process_index: int,
                   process_count: int) -> slice:
  if batch_size % process_count:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the number of processes "
        f"{process_count}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def make_iterator(
    dataset: str | Dataset,
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
    dataset = Dataset(dataset, **dataset_kwargs)
  elif dataset_kwargs:
    raise ValueError(f"{sorted(dataset_kwargs)} only apply when the data set "
                     "is given by name")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  rows = _process_range(batch_size, process_index, process_count)
  images, labels = dataset.arrays(split)
  augment = train if augment is None else augment
  mean = std = None
  if normalize:
    mean, std = dataset.mean_std()
  tf, _ = _tf()
  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def load(index, mask, step):
    image = tf.cast(tf.gather(images_t, index), tf.float32) / 255.0
    if augment:
      image = _augment(image, tf.stack([tf.cast(seed, tf.int64), step]),
                       crop_padding, rows, batch_size)
    if normalize:
      image = (image - mean) / std
    return {"image": image, "label": tf.gather(labels_t, index), "mask": mask}

  def pipeline(index: np.ndarray, mask: np.ndarray, first_step: int):
    local = index[:, rows]
    steps = np.arange(first_step, first_step + len(index), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        (local, mask[:, rows].astype(np.float32), steps))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(prefetch).as_numpy_iterator()

  n = len(labels)
  if not train:
    num_batches = -(-n // batch_size)
    index = np.zeros(num_batches * batch_size, np.int64)
    index[:n] = np.arange(n)
    mask = np.zeros(num_batches * batch_size, bool)
    mask[:n] = True
    yield from pipeline(index.reshape(num_batches, batch_size),
                        mask.reshape(num_batches, batch_size), 0)
    return

  num_steps = n // batch_size
  if num_steps == 0:
    raise ValueError(
        f"{dataset.name}/{split} has {n} examples, fewer than one batch of "
        f"{batch_size}; lower the batch size")
  epoch, offset = divmod(start_step, num_steps)
  ones = np.ones((num_steps, batch_size), bool)
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order = order[:num_steps * batch_size].reshape(num_steps, -1)
    yield from pipeline(order[offset:], ones[offset:], epoch * num_steps + offset)
    epoch, offset = epoch + 1, 0


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  return len(dataset.arrays("train")[1]) // batch_size


def to_global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assembles each process's rows into global ``jax.Array``s with ``sharding``.

  ``sharding`` is typically ``NamedSharding(mesh, PartitionSpec('data'))``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def measure_throughput(name: str, batch_size: int, steps: int, *,
                       data_dir: str | None = None) -> float:
  """Images/s of the augmented training iterator after 10 warm-up batches
  (reading the split into memory is not timed)."""
  import time  # pylint: disable=g-import-not-at-top
  dataset = Dataset(name, data_dir=data_dir)
  dataset.arrays("train")
  it = make_iterator(dataset, "train", batch_size, train=True,
                     process_index=0, process_count=1)
  for _ in range(10):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch_size / (time.perf_counter() - start)
