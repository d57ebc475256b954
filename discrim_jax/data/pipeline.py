"""The in-memory reader: a data set's splits read once into host memory,
tf.data for the training batches and their augmentation, NumPy for evaluation.

A data set is named by ``config.dataset``:

* one of the paper's (``cifar100``, ``caltech101``) or the offline default
  ``fashion_mnist`` (Debian's files), with the reference recipe's splits;
* any other TFDS catalogue name (``cifar10``, ``mnist``, ``oxford_flowers102``,
  ``imagenette``, ``imagenet2012``, ...): classes, image shape, label feature
  and splits come from the builder;
* ``folder:/path/to/root``: an image folder (:mod:`discrim_jax.data.folder`).

Splits: ``train``; ``validation`` is the data set's own where it has one,
otherwise a part of train held out with a fixed seed (a count, a fraction or
a number per class: ``holdout``); ``test`` is the test split, or the
validation split where there is no test split (validation is then held out
of train). ``splits`` names them explicitly, in TFDS's split syntax
(``train[:90%]``).

This module's :class:`Dataset` reads each split once into host memory as
uint8 arrays (CIFAR-100 is 150 MB). Batches are cut by index, which makes
every epoch's order a pure function of ``(seed, epoch)``: a run resumed at
step ``s`` sees exactly the batches an uninterrupted run sees from step
``s``, and a multi-host run sees the same global batches as a single-host
run, each process taking its own rows. Data sets larger than memory stream
instead (:mod:`discrim_jax.data.streaming`), with the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import Any
import weakref

import numpy as np

from discrim_jax.data import batching
from discrim_jax.data import folder as folder_lib
from discrim_jax.data.tfds_access import (
    DEFAULT_CALTECH_SIZE, DEFAULT_IMAGE_SIZE, SPECS, SPLITS, DatasetInfo,
    batched_examples, check_labels, feature_keys, holdout_count, holdout_mask,
    mocked, open_builder, per_class_subset, spec_for, split_plan, tf_modules)
from discrim_jax.data.tfds_prepare import prepare


# (builder folder, split, image shape, resize, keys) -> decoded arrays.
_DECODED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


class Dataset:
  """One data set's splits, read once into host memory.

  Args:
    name: a name of :data:`DATASETS`, any TFDS catalogue name, or
      ``folder:/path`` (an image folder).
    data_dir: TFDS data folder (TFDS's default when None): where prepared
      data is found, or written by ``download_and_prepare``.
    image_size: side of the square images. Caltech-101 is resized to it
      (default 224); other data sets whose images vary in size, or differ
      from it, are resized (shorter side) and centre-cropped to it (default
      224 for varying sizes; a folder's default is its first image's size).
    validation_seed: seed of the fixed validation hold-out.
    validation_size: override the hold-out: a number of images (or of images
      per class for caltech101). ``holdout`` says the same as a string.
    holdout: ``"5000"``, ``"0.1"`` or ``"5/class"`` (:func:`parse_holdout`).
    splits: ``{"train"|"validation"|"test": TFDS split}`` to name them.
    download: let TFDS download and prepare the data when it is missing.
    max_examples: split name -> keep only the first N examples (quick runs).
    train_per_class: > 0: train on the first N training examples of each
      class only (data-scarcity studies; applied before ``max_examples``).
    train_subset_seed: with ``train_per_class``, draw the N examples of each
      class at random with this seed instead of taking the first N.
  """

  def __init__(self, name: str, *, data_dir: str | None = None,
               image_size: int | None = None, validation_seed: int = 0,
               validation_size: int | None = None, holdout: str = "",
               splits: dict[str, str] | None = None, download: bool = True,
               max_examples: dict[str, int] | None = None,
               train_per_class: int = 0, train_subset_seed: int | None = None):
    self.name = name
    self._per_class = train_per_class
    self._subset_seed = train_subset_seed
    self._max_examples = {k: v for k, v in (max_examples or {}).items() if v}
    self._splits = {k: v for k, v in (splits or {}).items() if v}
    unknown = set(self._splits) - set(SPLITS)
    if unknown:
      raise ValueError(f"unknown split name(s) {sorted(unknown)}; name some of "
                       f"{list(SPLITS)} (--config.splits...)")
    self._validation_seed = validation_seed
    self._download = download
    self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    # split -> (source split, indices into it, labels): from labels alone.
    self._selections: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    self._source_labels: dict[str, np.ndarray] = {}
    self._folder = None
    if validation_size is not None:
      if validation_size < 1:
        raise ValueError(f"validation_size must be >= 1, got {validation_size}")
      per_class = name in SPECS and SPECS[name].holdout_per_class
      holdout = f"{validation_size}/class" if per_class else str(validation_size)
    if name.startswith(folder_lib.PREFIX):
      self._folder = folder_lib.ImageFolder(name[len(folder_lib.PREFIX):],
                                            image_size or 0)
      self._spec = spec_for(name, holdout)
      self.num_classes = self._folder.num_classes
      self.class_names = list(self._folder.class_names)
      self.image_shape = self._folder.image_shape
      return
    self._spec = spec_for(name, holdout)
    self._builder = open_builder(self._spec, data_dir)
    self._image_key, self._label_key = feature_keys(self._builder, name)
    label = self._builder.info.features[self._label_key]
    self.num_classes = int(label.num_classes)
    self.class_names = list(label.names)
    shape = tuple(self._builder.info.features[self._image_key].shape)
    channels = shape[-1] or 3
    if self._spec.resize == "stretch":
      size = image_size or DEFAULT_CALTECH_SIZE
    elif name in SPECS and image_size not in (None, shape[0]):
      raise ValueError(
          f"{name} images are {shape[0]}x{shape[1]}; image_size={image_size} is "
          "only supported for caltech101 (leave it unset)")
    elif None in shape[:2] or shape[0] != shape[1] or (
        image_size and image_size != shape[0]):
      self._spec = dataclasses.replace(self._spec, resize="crop")
      size = image_size or DEFAULT_IMAGE_SIZE
    else:
      size = shape[0]
    self.image_shape: tuple[int, int, int] = (size, size, channels)

  # ------------------------------------------------------------------ reading

  def split_plan(self) -> dict[str, str | None]:
    """The TFDS split (or slice) each role reads; None for validation when it
    is held out of train."""
    if self._folder is not None:
      available = list(self._folder.splits)
    else:
      prepare(self._builder, self.name, download=self._download)
      # A prepared data set knows its splits; tfds.testing.mock_data's often
      # do not: assume the usual two (a wrong guess fails when read).
      available = list(self._builder.info.splits) or ["train", "test"]
    return split_plan(available, self._spec, self._splits, self.name)

  def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if self._folder is not None:
      return self._folder.read(split)
    # The same prepared split decoded the same way is read once per process
    # (a study's or comparison's cells all read the one data set). The
    # arrays are read-only: every later step takes copies or views. Not
    # under tfds.testing.mock_data, whose examples stand in for the files
    # only while it is active (another mock of the same folder differs).
    if mocked(self._builder):
      return self._decode(split)
    key = (str(self._builder.data_dir), split, self.image_shape,
           self._spec.resize, self._image_key, self._label_key)
    if key not in _DECODED:
      for other in [k for k in _DECODED if k[0] != key[0]]:
        del _DECODED[other]  # one data set at a time: bounded memory
      _DECODED[key] = self._decode(split)
    return _DECODED[key]

  def _decode(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    tf, _ = tf_modules()
    size = self.image_shape[:2]
    resize = self._spec.resize
    image_key, label_key = self._image_key, self._label_key
    batches = None if resize else batched_examples(
        self._builder, split, (image_key, label_key))
    if batches is not None:
      return self._collect(split, batches.map(
          lambda e: (e[image_key], tf.cast(e[label_key], tf.int32))))
    ds = self._builder.as_dataset(split=split, shuffle_files=False)

    def convert(example):
      image = example[image_key]
      if resize == "stretch":
        image = tf.image.resize(image, size, antialias=True)
      elif resize == "crop":
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        scale = size[0] / tf.cast(tf.minimum(h, w), tf.float32)
        new = tf.cast(tf.math.ceil(tf.cast(tf.stack([h, w]), tf.float32) * scale),
                      tf.int32)
        image = tf.image.resize(image, tf.maximum(new, size[0]), antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, *size)
      if resize:
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image, tf.cast(example[label_key], tf.int32)

    return self._collect(split, ds.map(
        convert, num_parallel_calls=tf.data.AUTOTUNE).batch(4096))

  def _collect(self, split: str, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """A split's ``(images, labels)`` batches as two read-only arrays."""
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
      images.append(x)
      labels.append(y)
    if not images:
      raise ValueError(f"{self.name}: split {split!r} is empty")
    images, labels = np.concatenate(images), np.concatenate(labels)
    check_labels(labels, self.num_classes, f"{self.name}/{split}")
    images.flags.writeable = labels.flags.writeable = False
    return images, labels

  def _labels(self, source: str) -> np.ndarray:
    """The labels of a source split, without decoding its images."""
    if source not in self._source_labels:
      if self._folder is not None:
        labels = self._folder.files[source][1]
      elif any(k[1] == source for k in _DECODED
               if k[0] == str(self._builder.data_dir)):
        labels = self._read(source)[1]
      else:
        tf, tfds = tf_modules()
        label_key = self._label_key
        ds = batched_examples(self._builder, source, (label_key,), 65536)
        if ds is None:
          ds = self._builder.as_dataset(
              split=source, shuffle_files=False,
              decoders={self._image_key: tfds.decode.SkipDecoding()}).batch(65536)
        ds = ds.map(lambda e: tf.cast(e[label_key], tf.int32))
        parts = list(ds.as_numpy_iterator())
        if not parts:
          raise ValueError(f"{self.name}: split {source!r} is empty")
        labels = np.concatenate(parts)
        check_labels(labels, self.num_classes, f"{self.name}/{source}")
      self._source_labels[source] = labels
    return self._source_labels[source]

  def _selection(self, split: str) -> tuple[str, np.ndarray, np.ndarray]:
    """``(source split, indices into it, labels)`` of a split: the hold-out,
    the per-class subset and the example limits, from the labels alone."""
    if split not in self._selections:
      plan = self.split_plan()
      sel = {}
      if split == "test" or plan["validation"] is not None:
        source = plan[split]
        labels = self._labels(source)
        sel[split] = (source, np.arange(len(labels)), labels)
      else:
        source = plan["train"]
        labels = self._labels(source)
        val = holdout_mask(labels, self._spec, self.num_classes,
                           self._validation_seed, self.name)
        index = np.arange(len(labels))
        sel["train"] = (source, index[~val], labels[~val])
        sel["validation"] = (source, index[val], labels[val])
      if self._per_class and "train" in sel:
        source, index, labels = sel["train"]
        sel["train"] = (source, *per_class_subset(
            index, labels, self._per_class, self.name, self._subset_seed))
      for name, limit in self._max_examples.items():
        if name in sel:
          source, index, labels = sel[name]
          sel[name] = (source, index[:limit], labels[:limit])
      self._selections.update(sel)
    return self._selections[split]

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 (N, H, W, C), labels int32 (N,))`` of a split."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if split not in self._arrays:
      source, index, labels = self._selection(split)
      images, all_labels = self._read(source)
      whole = len(index) == len(all_labels) and np.array_equal(
          index, np.arange(len(index)))
      self._arrays[split] = (images if whole else images[index], labels)
    return self._arrays[split]

  def num_examples(self, split: str) -> int:
    """A split's size: from the builder's split sizes where they decide it,
    else from the labels alone (no image is decoded)."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    n = None
    if (split not in self._selections and self._folder is None
        and not self._per_class):
      n = self._size_from_builder(split)
    if n is None:
      return len(self._selection(split)[2])
    limit = self._max_examples.get(split)
    return min(n, limit) if limit else n

  def _size_from_builder(self, split: str) -> int | None:
    plan = self.split_plan()
    sizes = self._builder.info.splits
    try:
      if split == "test" or plan["validation"] is not None:
        return int(sizes[plan[split]].num_examples) or None
      total = int(sizes[plan["train"]].num_examples)
    except (KeyError, ValueError, TypeError):  # unknown to the builder (mock data)
      return None
    if not total:
      return None
    count = holdout_count(total, self._spec, self.name)
    if count is None:
      return None
    return count if split == "validation" else total - count

  @property
  def info(self) -> DatasetInfo:
    return DatasetInfo(
        name=self.name, num_classes=self.num_classes,
        image_shape=self.image_shape,
        num_examples={s: self.num_examples(s) for s in SPLITS})

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images, in [0, 1] units."""
    return batching.channel_mean_std(self.arrays("train")[0])


def get_info(name: str, **kwargs: Any) -> DatasetInfo:
  """Number of classes, image shape and split sizes of a data set."""
  return Dataset(name, **kwargs).info


# ------------------------------------------------------------------- batching


# Each data set's splits as TF constants, made once (a run evaluates the same
# split many times; copying a split into TF each time cost seconds), with the
# batch functions traced over them.
_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class _SplitTensors:
  images: np.ndarray  # the arrays the tensors were made from
  labels: np.ndarray
  images_t: Any
  labels_t: Any
  # The traced batch function of each setting (see _load_function).
  loads: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict)


def _as_tensors(dataset, split: str, images: np.ndarray, labels: np.ndarray
                ) -> _SplitTensors:
  tf, _ = tf_modules()
  try:
    cached = _TENSORS.setdefault(dataset, {})
  except TypeError:  # not weak-referenceable: no cache
    cached = {}
  entry = cached.get(split)
  if entry is None or entry.images is not images or entry.labels is not labels:
    entry = _SplitTensors(images, labels, tf.constant(images),
                          tf.constant(labels))
    cached[split] = entry
  return entry


def _load_function(tensors: _SplitTensors, *, seed: int, augment: bool,
                   mean, std, crop_padding: int, rows: slice, batch_size: int):
  """The batch ``{image, label, mask}`` of a row of indices, as one
  ``tf.function`` per setting, kept with the split's tensors. tf.data traces
  a Python map function again for each pipeline (one per epoch and per
  evaluation); a traced function it only calls: a pipeline took 90-160 ms of
  CPU to make before, 50-65 ms after (docs/speed.md). The same ops."""
  tf, _ = tf_modules()
  key = (seed if augment else None, augment, crop_padding, rows.start,
         rows.stop, batch_size,
         None if mean is None else (tuple(np.ravel(mean).tolist()),
                                    tuple(np.ravel(std).tolist())))
  load = tensors.loads.get(key)
  if load is not None:
    return load
  images_t, labels_t = tensors.images_t, tensors.labels_t

  def load(index, mask, step):
    image = tf.cast(tf.gather(images_t, index), tf.float32) / 255.0
    if augment:
      image = batching.augment(image, tf.stack([tf.cast(seed, tf.int64), step]),
                               crop_padding, rows, batch_size)
    if mean is not None:
      image = (image - mean) / std
    return {"image": image, "label": tf.gather(labels_t, index), "mask": mask}

  load = tensors.loads[key] = tf.function(load, autograph=False)
  return load


def _ordered_pass(images: np.ndarray, labels: np.ndarray, index: np.ndarray,
                  mask: np.ndarray, mean, std
                  ) -> Iterator[dict[str, np.ndarray]]:
  """An evaluation pass without augmentation, one batch per row of ``index``,
  cut by NumPy: making a tf.data pipeline took 50-65 ms of CPU, several times
  a small split's whole pass. The same values as the tf.data path: the cast
  from uint8 is exact and each division or subtraction is rounded once, as
  IEEE float32 has it (tests/test_data.py checks all 256 pixel values)."""
  for rows, real in zip(index, mask):
    image = images[rows].astype(np.float32) / np.float32(255.0)
    if mean is not None:
      image = (image - mean) / std
    yield {"image": image, "label": labels[rows],
           "mask": real.astype(np.float32)}


def iterate(dataset, split: str, batch_size: int, *, train: bool, seed: int,
            start_step: int, augment: bool, normalize: bool, crop_padding: int,
            process_index: int, process_count: int, prefetch: int = 2
            ) -> Iterator[dict[str, np.ndarray]]:
  """:func:`discrim_jax.data.make_iterator` for a data set held in memory
  (:class:`Dataset`, or any object with ``arrays(split)``): tf.data cuts the
  training batches by index and augments them; NumPy cuts an evaluation pass
  that is not augmented (:func:`_ordered_pass`)."""
  rows = batching.process_rows(batch_size, process_index, process_count)
  images, labels = dataset.arrays(split)
  mean = std = None
  if normalize:
    mean, std = dataset.mean_std()

  def pipeline(index: np.ndarray, mask: np.ndarray, first_step: int):
    tf, _ = tf_modules()
    load = _load_function(_as_tensors(dataset, split, images, labels),
                          seed=seed, augment=augment, mean=mean, std=std,
                          crop_padding=crop_padding, rows=rows,
                          batch_size=batch_size)
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
    index = index.reshape(num_batches, batch_size)
    mask = mask.reshape(num_batches, batch_size)
    if augment:
      yield from pipeline(index, mask, 0)
    else:
      yield from _ordered_pass(images, labels, index[:, rows], mask[:, rows],
                               mean, std)
    return

  num_steps = batching.num_train_steps(n, batch_size, f"{dataset.name}/{split}")
  epoch, offset = divmod(start_step, num_steps)
  ones = np.ones((num_steps, batch_size), bool)
  while True:
    order = batching.epoch_order(n, seed, epoch)
    order = order[:num_steps * batch_size].reshape(num_steps, -1)
    yield from pipeline(order[offset:], ones[offset:], epoch * num_steps + offset)
    epoch, offset = epoch + 1, 0


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  return dataset.num_examples("train") // batch_size


def to_global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assembles each process's rows into global ``jax.Array``s with ``sharding``.

  ``sharding`` is typically ``NamedSharding(mesh, PartitionSpec('data'))``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}
