"""What a data set is and how TFDS gives it: the catalogue (the paper's data
sets, the offline ``fashion_mnist``, any TFDS name), splits and hold-outs,
label checks, and TensorFlow/TFDS themselves, imported on first use.

Both readers (in memory, :mod:`discrim_jax.data.pipeline`; streamed,
:mod:`discrim_jax.data.streaming`) build on this module; neither imports the
other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Spec:
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
SPECS = {
    "cifar100": Spec("cifar100", "test", holdout=4000),
    "caltech101": Spec("caltech101", "test", holdout_per_class=5,
                        resize="stretch"),
    "fashion_mnist": Spec("debian_fashion_mnist", "test", holdout=5000),
    # 100 characters from Debian's fonts; its own validation typefaces.
    "fonts": Spec("debian_fonts"),
}


DATASETS = tuple(sorted(SPECS))


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
def tf_modules():
  """(tensorflow, tensorflow_datasets), imported on first use.

  Only reading and batching data need them: the models, the losses and the
  compiled steps also run where JAX alone is installed (an accelerator image).
  """
  quiet = os.environ.get("DISCRIM_JAX_QUIET_TFDS")  # set by cli.route_logs
  try:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_without(_TF_LOADING_NOISE if quiet else ()):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading data sets needs tensorflow and tensorflow-datasets ({e}); "
        "install the project's dependencies: pip install -e .") from e
  # TensorFlow must not grab the accelerators JAX is going to use.
  tf.config.set_visible_devices([], "GPU")
  if quiet:
    tfds.disable_progress_bar()
  return tf, tfds


# What TensorFlow's native libraries print on every import, whatever
# TF_CPP_MIN_LOG_LEVEL says (they log before it is read): an INFO note that
# oneDNN is on, once per library, each after absl's warning that logging is
# not initialised yet. Four lines on every run's console that say nothing
# about the run.
_TF_LOADING_NOISE = ("oneDNN custom operations are on",
                     "before absl::InitializeLog() is called")


@contextlib.contextmanager
def native_stderr_without(noise: tuple[str, ...]):
  """For the block, what is written to file descriptor 2 (native libraries'
  logs included) is held back, then passed on without the lines containing
  one of ``noise``. No-op for an empty ``noise``, or where there is no
  descriptor 2 or no temporary file to hold it in."""
  held = saved = None
  try:
    if noise:
      held = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
      saved = os.dup(2)
  except OSError:  # no descriptor 2 (a closed stderr) or no temporary file
    saved = None
  if saved is None:
    if held is not None:
      held.close()
    yield
    return
  sys.stderr.flush()
  with held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors="replace").splitlines(keepends=True)
      kept = "".join(l for l in lines if not any(n in l for n in noise))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def parse_holdout(text: str) -> dict[str, Any]:
  """``"5000"`` (images), ``"0.1"`` (a fraction of train) or ``"5/class"``
  -> the matching :class:`Spec` field; ``""`` -> {} (the data set's
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


def spec_for(name: str, holdout: str) -> Spec:
  spec = SPECS.get(name) or Spec(name, holdout_fraction=DEFAULT_HOLDOUT_FRACTION)
  fields = parse_holdout(holdout)
  if fields:
    spec = dataclasses.replace(spec, **{**dict(
        holdout=0, holdout_per_class=0, holdout_fraction=0.0), **fields})
  return spec


def open_builder(spec: Spec, data_dir: str | None) -> Any:
  _, tfds = tf_modules()
  if spec.tfds_name == "debian_fashion_mnist":
    from discrim_jax.data.fashion_mnist import DebianFashionMnist  # pylint: disable=g-import-not-at-top
    return DebianFashionMnist(data_dir=data_dir)
  if spec.tfds_name == "debian_fonts":
    from discrim_jax.data.fonts import DebianFonts  # pylint: disable=g-import-not-at-top
    return DebianFonts(data_dir=data_dir)
  try:
    return tfds.builder(spec.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"unknown data set {spec.tfds_name!r}: not one of {list(DATASETS)}, "
        "not a TFDS catalogue name (tfds.list_builders()) and not "
        "folder:/path/to/images (--config.dataset=...)") from None


def mocked(builder: Any) -> bool:
  """Whether ``tfds.testing.mock_data`` stands in for the builder's files."""
  return builder.download_and_prepare.__name__ == "mock_download_and_prepare"


def batched_examples(builder: Any, split: str, keys: tuple[str, ...],
                     batch_size: int = 4096) -> Any:
  """The features ``keys`` of a prepared TFDS split as a ``tf.data.Dataset``
  of batches (dicts of decoded tensors) in the order ``builder.as_dataset(
  split, shuffle_files=False)`` gives them; None where this cannot read the
  split (the caller reads it through TFDS).

  TFDS parses one example at a time; a whole batch of serialized examples
  parses in one ``tf.io.parse_example``. On Fashion-MNIST's 60,000 training
  images that is 0.2 s against 2.4 s (and the start of every run reads them).
  Read this way: one TFRecord file, or a slice of one (several are
  interleaved by TFDS, an order this does not reproduce), whose features
  have a fixed shape once serialized; decoding is each feature's own batch
  decoder.
  """
  tf, tfds = tf_modules()
  if mocked(builder) or builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    return None
  try:
    instructions = builder.info.splits[split].file_instructions
  except (KeyError, ValueError):
    return None
  if len(instructions) != 1 or not os.path.exists(instructions[0].filename):
    return None
  features = builder.info.features
  raw = serialized_batch_parser(builder, keys)
  if raw is None:
    return None

  def parse(records):
    return {k: features[k].decode_batch_example(v) for k, v in raw(records).items()}

  (file,) = instructions
  records = tf.data.TFRecordDataset(file.filename).skip(file.skip).take(file.take)
  return records.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def serialized_batch_parser(builder: Any, keys: tuple[str, ...]) -> Any:
  """``parse(records) -> {key: batch}``: the features ``keys`` of a batch of
  serialized examples in one ``tf.io.parse_example``, as stored (an image
  still encoded); None unless each has a fixed shape once serialized."""
  tf, tfds = tf_modules()
  from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  serialized = {k: features[k].get_serialized_info() for k in keys}
  if not all(isinstance(info, tfds.features.TensorInfo) and None not in info.shape
             and not info.sequence_rank for info in serialized.values()):
    return None
  specs = example_parser.ExampleParser(serialized).flat_feature_specs

  def parse(records):
    parsed = tf.io.parse_example(records, specs)
    return {k: tf.cast(parsed[k], serialized[k].tf_dtype) for k in keys}
  return parse


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
  _, tfds = tf_modules()
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


def split_plan(available: list[str], spec: Spec, splits: dict[str, str],
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


def holdout_mask(labels: np.ndarray, spec: Spec, num_classes: int, seed: int,
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
  mask[rng.permutation(n)[:holdout_count(n, spec, name)]] = True
  return mask


def holdout_count(n: int, spec: Spec, name: str) -> int | None:
  """How many of ``n`` training examples a total or fractional hold-out
  takes (None for a per-class one, which depends on the labels)."""
  if spec.holdout_per_class:
    return None
  count = spec.holdout or int(round(spec.holdout_fraction * n))
  if not 1 <= count < n:
    raise ValueError(
        f"{name}: the train split has {n} examples, too few to hold out "
        f"{count} for validation (--config.validation_holdout=...)")
  return count


def per_class_subset(images, labels, per_class: int, name: str,
                     seed: int | None = None):
  """``per_class`` examples of each class, in their order: the first ones,
  or with ``seed`` a random draw of them (the same for the same seed)."""
  keep = np.zeros(len(labels), bool)
  rng = None if seed is None else np.random.default_rng([seed, per_class])
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"{name}: class {c} has {len(members)} training "
                       f"examples, fewer than train_per_class={per_class}")
    if rng is not None:
      members = np.sort(rng.choice(members, per_class, replace=False))
    keep[members[:per_class]] = True
  return images[keep], labels[keep]
