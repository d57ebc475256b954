"""A TFDS data set of N random records, for measuring the streaming path.

``SyntheticRecords(num_records=N, data_dir=...)`` prepares N random 32x32x3
images with labels in 10 classes (test split: N/10, at least 100), in
ArrayRecord when asked (``download_and_prepare(file_format="array_record")``):
what ``experiments/bench_input.py`` and the tests stream to show that memory
does not grow with the number of records.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

SHAPE = (32, 32, 3)
NUM_CLASSES = 10


class SyntheticRecords(tfds.core.GeneratorBasedBuilder):
  """Pseudo-random uint8 images and labels; record i is a function of i."""

  VERSION = tfds.core.Version("1.0.0")
  READS_LOCAL_FILES = True  # generated, nothing to download

  def __init__(self, *, num_records: int, **kwargs):
    self.num_records = num_records
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, self.num_records),
            "test": self._generate_examples(self.num_records,
                                            max(100, self.num_records // 10))}

  def _generate_examples(self, first: int, count: int):
    # A cheap hash of (record, pixel): random-looking, a function of i alone.
    pixels = np.arange(np.prod(SHAPE), dtype=np.uint64) + 1
    for i in range(first, first + count):
      image = ((pixels * np.uint64(2654435761 * (i + 1))) >> np.uint64(13)) & np.uint64(255)
      yield i, {"image": image.astype(np.uint8).reshape(SHAPE),
                "label": (i * 7919) % NUM_CLASSES}


class JpegRecords(SyntheticRecords):
  """ImageNet-sized JPEGs for the 224-px input benchmark, made from the real
  Fashion-MNIST images the project has: record i is training image i (mod
  60,000), upscaled to 300-400 x 350-450 pixels (about 350 x 400 on
  average), tinted per channel and given a per-record grain so that the
  JPEG holds texture at realistic sizes; a function of i alone."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    from discrim_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
    folder = fashion_mnist.find_files()
    images, labels = (fashion_mnist.read_idx(folder / f)
                      for f in fashion_mnist.FILES["train"])
    return {"train": self._generate_examples(images, labels, 0, self.num_records),
            "test": self._generate_examples(images, labels, self.num_records,
                                            max(100, self.num_records // 10))}

  def _generate_examples(self, images, labels, first: int, count: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for i in range(first, first + count):
      rng = np.random.default_rng(i)
      h, w = int(rng.integers(300, 401)), int(rng.integers(350, 451))
      grey = Image.fromarray(images[i % len(images)]).resize((w, h), Image.BICUBIC)
      tint = rng.uniform(0.5, 1.0, size=3)
      grain = rng.normal(0, 12, size=(h, w, 1))
      image = np.clip(np.asarray(grey, np.float32)[..., None] * tint + 30 * (1 - tint)
                      + grain, 0, 255).astype(np.uint8)
      yield i, {"image": image, "label": int(labels[i % len(labels)])}
