"""Which example each process reads at ``(seed, step)``, and the CIFAR-style
augmentation: written once, for both readers, so that the in-memory and the
streamed path give the same batches.

* Training: epoch ``e`` visits the split in :func:`epoch_order` (a pure
  function of ``(seed, e)``); step ``s`` of the run is batch ``s mod
  num_steps`` of epoch ``s // num_steps``, the last partial batch of each
  epoch dropped; each process takes its :func:`process_rows` of it.
* Evaluation: one ordered pass, the last batch padded with example 0 and
  masked.
* Normalisation: :func:`channel_mean_std` of the training images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from discrim_jax.data.tfds_access import tf_modules


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which training epoch ``epoch`` visits ``n`` examples."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``[N, H, W, C]`` uint8 images in [0, 1]
  units: the statistics ``normalize`` uses, alike for every reader."""
  scaled = images.astype(np.float32) / 255.0
  return scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))


def num_train_steps(n: int, batch_size: int, where: str) -> int:
  """Training steps per epoch over ``n`` examples (ValueError if none)."""
  if n // batch_size == 0:
    raise ValueError(f"{where} has {n} examples, fewer than one batch of "
                     f"{batch_size}; lower the batch size")
  return n // batch_size


def augment(images: Any, seed: Any, pad: int, rows: slice,
             global_batch: int) -> Any:
  """Random crop with ``pad``-pixel zero padding and horizontal flip, per image.

  The random draws are made for the whole global batch and this process keeps
  its ``rows``, so the augmentation does not depend on the number of hosts.
  """
  tf, _ = tf_modules()
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


def process_rows(batch_size: int, process_index: int,
                 process_count: int) -> slice:
  """This process's rows of every global batch of ``batch_size``."""
  if batch_size % process_count:
    raise ValueError(
        f"batch size {batch_size} is not divisible by the number of processes "
        f"{process_count}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)
