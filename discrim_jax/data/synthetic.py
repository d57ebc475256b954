"""Random images with a data set's shape: for benchmarks and for building steps."""

from __future__ import annotations

import numpy as np

from discrim_jax.data import batching


class SyntheticDataset:
  """Uniform random uint8 images and labels, with :class:`Dataset`'s interface."""

  def __init__(self, *, num_classes: int = 100,
               image_shape: tuple[int, int, int] = (32, 32, 3),
               num_examples: int = 256, seed: int = 0):
    self.name = "synthetic"
    self.num_classes = num_classes
    self.image_shape = tuple(image_shape)
    rng = np.random.default_rng(seed)
    self._arrays = (
        rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8),
        rng.integers(0, num_classes, num_examples).astype(np.int32))

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    del split  # every split is the same random sample
    return self._arrays

  def num_examples(self, split: str) -> int:
    return len(self.arrays(split)[1])

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    return batching.channel_mean_std(self._arrays[0])

  def batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """The first ``batch_size`` images as the steps take a batch (what
    ``make_iterator`` yields unaugmented), without tf.data: for timing and
    running steps where TensorFlow is not installed."""
    images, labels = self._arrays
    return {"image": images[:batch_size].astype(np.float32) / 255.0,
            "label": labels[:batch_size],
            "mask": np.ones(batch_size, np.float32)}
