"""Input pipelines: TFDS (or an image folder) for reading, tf.data for
augmentation and batching.

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
import functools
import os
import socket
from typing import Any
import weakref

import numpy as np

from discrim_jax.data import folder as folder_lib

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: str
  test_split: str = ""  # "": the test split, else validation
  # Validation hold-out from the train split: a total, a fraction or per class.
  holdout: int = 0
  holdout_per_class: int = 0
  holdout_fraction: float = 0.0
  resize: str = ""  # "stretch" (as the paper's Caltech-101) or "crop"


# The paper's data sets and the offline default, with the reference recipe's
# validation hold-outs; any other TFDS name holds out 10% of train when it has
# no validation split.
_SPECS = {
    "cifar100": _Spec("cifar100", "test", holdout=4000),
    "caltech101": _Spec("caltech101", "test", holdout_per_class=5,
                        resize="stretch"),
    "fashion_mnist": _Spec("debian_fashion_mnist", "test", holdout=5000),
}
DATASETS = tuple(sorted(_SPECS))
DEFAULT_CALTECH_SIZE = 224
DEFAULT_HOLDOUT_FRACTION = 0.1
# Images of varying size with no config.image_size are cropped to this.
DEFAULT_IMAGE_SIZE = 224


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


def parse_holdout(text: str) -> dict[str, Any]:
  """``"5000"`` (images), ``"0.1"`` (a fraction of train) or ``"5/class"``
  -> the matching :class:`_Spec` field; ``""`` -> {} (the data set's
  default)."""
  text = str(text).strip()
  if not text:
    return {}
  try:
    if text.endswith("/class"):
      value = int(text[:-len("/class")])
      if value >= 1:
        return {"holdout_per_class": value}
    elif "." in text:
      value = float(text)
      if 0 < value < 1:
        return {"holdout_fraction": value}
    elif int(text) >= 1:
      return {"holdout": int(text)}
  except ValueError:
    pass
  raise ValueError(f"validation hold-out {text!r} is not a count (5000), a "
                   "fraction in (0, 1) (0.1) or a number per class (5/class) "
                   "(--config.validation_holdout=...)")


def _spec(name: str, holdout: str) -> _Spec:
  spec = _SPECS.get(name) or _Spec(name, holdout_fraction=DEFAULT_HOLDOUT_FRACTION)
  fields = parse_holdout(holdout)
  if fields:
    spec = dataclasses.replace(spec, **{**dict(
        holdout=0, holdout_per_class=0, holdout_fraction=0.0), **fields})
  return spec


def _builder(spec: _Spec, data_dir: str | None) -> Any:
  _, tfds = _tf()
  if spec.tfds_name == "debian_fashion_mnist":
    from discrim_jax.data.fashion_mnist import DebianFashionMnist  # pylint: disable=g-import-not-at-top
    return DebianFashionMnist(data_dir=data_dir)
  try:
    return tfds.builder(spec.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"unknown data set {spec.tfds_name!r}: not one of {list(DATASETS)}, "
        "not a TFDS catalogue name (tfds.list_builders()) and not "
        "folder:/path/to/images (--config.dataset=...)") from None


def network_available(host: str = "storage.googleapis.com", port: int = 443,
                      timeout: float = 5.0) -> str | None:
  """None when ``host`` answers within ``timeout`` seconds, else why not."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return None
  except OSError as e:
    return f"{host}:{port} unreachable: {e}"


def prepare(builder: Any, name: str, *, download: bool,
            file_format: str | None = None) -> None:
  """Prepares a TFDS data set where it is not yet, failing within seconds
  with one line (what was searched, how to get the data) when it is neither
  prepared nor downloadable."""
  if builder.is_prepared():
    return
  # Builders of local files (Debian's Fashion-MNIST) and tfds.testing's
  # mock_data (whose download_and_prepare is a no-op) need no network.
  local = (getattr(builder, "READS_LOCAL_FILES", False)
           or builder.download_and_prepare.__name__ == "mock_download_and_prepare")
  searched = str(builder.data_dir)
  way_out = (f"prepare it where there is network (`tfds build {name} "
             "--data_dir=DIR`), copy DIR here and pass --config.data_dir=DIR")
  if not local:
    if not download:
      raise ValueError(f"data set {name!r} is not prepared in {searched} and "
                       f"config.download is False: {way_out}")
    offline = network_available()
    if offline is not None:
      raise ValueError(f"data set {name!r} is not prepared in {searched} and "
                       f"cannot be downloaded ({offline}): {way_out}")
  kwargs = {"file_format": file_format} if file_format else {}
  if local:  # its own errors say how to get the files
    builder.download_and_prepare(**kwargs)
    return
  try:
    builder.download_and_prepare(**kwargs)
  except (OSError, AssertionError) as e:  # download / manual-dir failures
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise ValueError(f"data set {name!r} could not be prepared in {searched} "
                     f"({type(e).__name__}: {first}): {way_out}") from None


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises ValueError if any label lies outside [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(
        f"{where}: {bad.size} label(s) outside [0, {num_classes}), e.g. "
        f"{bad[:5].tolist()}; the data and the number of classes disagree")


def feature_keys(builder: Any, name: str) -> tuple[str, str]:
  """The (image, label) feature names of a TFDS builder; ValueError unless
  the label is a class label."""
  _, tfds = _tf()
  keys = builder.info.supervised_keys
  image_key, label_key = (keys if isinstance(keys, tuple) and len(keys) == 2
                          and all(isinstance(k, str) for k in keys)
                          else ("image", "label"))
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"data set {name!r} has no ({image_key!r}, {label_key!r}) "
                     f"features; it has {list(features)}: not an image "
                     "classification data set")
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise ValueError(f"data set {name!r}: feature {label_key!r} is not a class "
                     "label; not an image classification data set")
  return image_key, label_key


# (builder folder, split, image shape, resize, keys) -> decoded arrays.
_DECODED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def split_plan(available: list[str], spec: _Spec, splits: dict[str, str],
               name: str) -> dict[str, str | None]:
  """``{train, validation, test}`` -> the TFDS split (None: validation held
  out of train)."""
  train = splits.get("train") or "train"
  test = (splits.get("test") or spec.test_split
          or ("test" if "test" in available else
              "validation" if "validation" in available else ""))
  if not test:
    raise ValueError(
        f"data set {name!r} has no test or validation split (splits: "
        f"{available}); name one, e.g. --config.splits.train='train[:80%]' "
        "--config.splits.test='train[80%:]'")
  validation = splits.get("validation") or (
      "validation" if "validation" in available and test != "validation"
      and not spec.test_split else None)
  return {"train": train, "validation": validation, "test": test}


def holdout_mask(labels: np.ndarray, spec: _Spec, num_classes: int, seed: int,
                 name: str) -> np.ndarray:
  """The examples of the train split held out for validation (fixed seed)."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  mask = np.zeros(n, bool)
  if spec.holdout_per_class:
    k = spec.holdout_per_class
    for c in range(num_classes):
      members = np.flatnonzero(labels == c)
      # Keep at least one training image of every class.
      take = min(k, max(len(members) - 1, 0))
      mask[rng.permutation(members)[:take]] = True
    return mask
  count = spec.holdout or int(round(spec.holdout_fraction * n))
  if not 1 <= count < n:
    raise ValueError(
        f"{name}: the train split has {n} examples, too few to hold out "
        f"{count} for validation (--config.validation_holdout=...)")
  mask[rng.permutation(n)[:count]] = True
  return mask


def per_class_subset(images, labels, per_class: int, name: str):
  """The first ``per_class`` examples of each class, in their order."""
  keep = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"{name}: class {c} has {len(members)} training "
                       f"examples, fewer than train_per_class={per_class}")
    keep[members[:per_class]] = True
  return images[keep], labels[keep]


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
  """

  def __init__(self, name: str, *, data_dir: str | None = None,
               image_size: int | None = None, validation_seed: int = 0,
               validation_size: int | None = None, holdout: str = "",
               splits: dict[str, str] | None = None, download: bool = True,
               max_examples: dict[str, int] | None = None,
               train_per_class: int = 0):
    self.name = name
    self._per_class = train_per_class
    self._max_examples = {k: v for k, v in (max_examples or {}).items() if v}
    self._splits = {k: v for k, v in (splits or {}).items() if v}
    unknown = set(self._splits) - set(SPLITS)
    if unknown:
      raise ValueError(f"unknown split name(s) {sorted(unknown)}; name some of "
                       f"{list(SPLITS)} (--config.splits...)")
    self._validation_seed = validation_seed
    self._download = download
    self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._folder = None
    if validation_size is not None:
      if validation_size < 1:
        raise ValueError(f"validation_size must be >= 1, got {validation_size}")
      per_class = name in _SPECS and _SPECS[name].holdout_per_class
      holdout = f"{validation_size}/class" if per_class else str(validation_size)
    if name.startswith(folder_lib.PREFIX):
      self._folder = folder_lib.ImageFolder(name[len(folder_lib.PREFIX):],
                                            image_size or 0)
      self._spec = _spec(name, holdout)
      self.num_classes = self._folder.num_classes
      self.class_names = list(self._folder.class_names)
      self.image_shape = self._folder.image_shape
      return
    self._spec = _spec(name, holdout)
    self._builder = _builder(self._spec, data_dir)
    self._image_key, self._label_key = feature_keys(self._builder, name)
    label = self._builder.info.features[self._label_key]
    self.num_classes = int(label.num_classes)
    self.class_names = list(label.names)
    shape = tuple(self._builder.info.features[self._image_key].shape)
    channels = shape[-1] or 3
    if self._spec.resize == "stretch":
      size = image_size or DEFAULT_CALTECH_SIZE
    elif name in _SPECS and image_size not in (None, shape[0]):
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

  def _plan(self) -> dict[str, str | None]:
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
    # arrays are read-only: every later step takes copies or views.
    key = (str(self._builder.data_dir), split, self.image_shape,
           self._spec.resize, self._image_key, self._label_key)
    if key not in _DECODED:
      for other in [k for k in _DECODED if k[0] != key[0]]:
        del _DECODED[other]  # one data set at a time: bounded memory
      _DECODED[key] = self._decode(split)
    return _DECODED[key]

  def _decode(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = self._builder.as_dataset(split=split, shuffle_files=False)
    tf, _ = _tf()
    size = self.image_shape[:2]
    resize = self._spec.resize
    image_key, label_key = self._image_key, self._label_key

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

    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
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

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 (N, H, W, C), labels int32 (N,))`` of a split."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if split not in self._arrays:
      plan = self._plan()
      if split == "test":
        self._arrays["test"] = self._read(plan["test"])
      elif plan["validation"] is not None:
        self._arrays[split] = self._read(plan[split])
      else:
        images, labels = self._read(plan["train"])
        val = holdout_mask(labels, self._spec, self.num_classes,
                           self._validation_seed, self.name)
        self._arrays["train"] = (images[~val], labels[~val])
        self._arrays["validation"] = (images[val], labels[val])
      if self._per_class and "train" in self._arrays:
        self._arrays["train"] = per_class_subset(*self._arrays["train"],
                                                 self._per_class, self.name)
      for name, limit in self._max_examples.items():
        if name in self._arrays:
          self._arrays[name] = tuple(a[:limit] for a in self._arrays[name])
    return self._arrays[split]

  def num_examples(self, split: str) -> int:
    return len(self.arrays(split)[1])

  @property
  def info(self) -> DatasetInfo:
    return DatasetInfo(
        name=self.name, num_classes=self.num_classes,
        image_shape=self.image_shape,
        num_examples={s: self.num_examples(s) for s in SPLITS})

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


# Each data set's splits as TF constants, made once (a run evaluates the same
# split many times; copying a split into TF each time cost seconds).
_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_tensors(dataset, split: str, images: np.ndarray, labels: np.ndarray):
  tf, _ = _tf()
  try:
    cached = _TENSORS.setdefault(dataset, {})
  except TypeError:  # not weak-referenceable: no cache
    cached = {}
  entry = cached.get(split)
  if entry is None or entry[0] is not images or entry[1] is not labels:
    entry = (images, labels, tf.constant(images), tf.constant(labels))
    cached[split] = entry
  return entry[2], entry[3]


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
  augment = train if augment is None else augment
  if getattr(dataset, "streaming", False):
    from discrim_jax.data import streaming  # pylint: disable=g-import-not-at-top
    yield from streaming.make_iterator(
        dataset, split, batch_size, train=train, seed=seed,
        start_step=start_step, augment=augment, normalize=normalize,
        crop_padding=crop_padding, process_index=process_index,
        process_count=process_count, prefetch=prefetch)
    return
  rows = _process_range(batch_size, process_index, process_count)
  images, labels = dataset.arrays(split)
  mean = std = None
  if normalize:
    mean, std = dataset.mean_std()
  tf, _ = _tf()
  images_t, labels_t = _as_tensors(dataset, split, images, labels)

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
  return dataset.num_examples("train") // batch_size


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
