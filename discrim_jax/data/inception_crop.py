"""The ImageNet training crop (Inception-style, as big_vision's
``inception_crop``): a window of 8-100% of the image's area with aspect
3/4-4/3, resized to the target and flipped with probability 1/2, for
streamed images larger than the CIFAR recipe's 64 pixels
(:mod:`discrim_jax.data.streaming`). Decoded images take it in NumPy
(:func:`random_resized_crop`); JPEG records in a TensorFlow graph that
decodes only the window (:func:`jpeg_crop`).
"""

from __future__ import annotations

import numpy as np

from discrim_jax.data import tfds_access as access


def crop_window(h: int, w: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
  """``(top, left, height, width)`` of an Inception-style crop (area 8-100%,
  aspect 3/4-4/3; 10 tries, then the centre square)."""
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = int(round(np.sqrt(area / ratio))), int(round(np.sqrt(area * ratio)))
    if 0 < ch <= h and 0 < cw <= w:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  side = min(h, w)
  return (h - side) // 2, (w - side) // 2, side, side


def jpeg_crop(shape):
  """``crop(jpeg, key) -> float32 shape in [0, 1]``, in a TensorFlow graph:
  the ImageNet training crop of one encoded JPEG, what big_vision's
  Inception crop does. The window (area 8-100%, aspect 3/4-4/3, from the
  size in the JPEG header) and the flip are drawn by stateless ops from
  ``key`` (an int64 pair), so a key gives the same crop in any batch and
  process; only the window is decoded (``decode_and_crop_jpeg``), then
  resized bilinearly to ``shape``."""
  tf = access.tf_modules()[0]
  size, channels = tuple(shape[:2]), shape[-1]

  def crop(data, key):
    box_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key))
    begin, window, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), tf.zeros([0, 0, 4], tf.float32),
        seed=box_key, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.image.decode_and_crop_jpeg(
        data, tf.stack([begin[0], begin[1], window[0], window[1]]),
        channels=channels)
    image = tf.image.resize(image, size, method="bilinear") / 255.0
    return tf.image.stateless_random_flip_left_right(image, flip_key)
  return crop


def random_resized_crop(image: np.ndarray, shape, rng: np.random.Generator
                         ) -> np.ndarray:
  """Inception-style crop (area 8-100%, aspect 3/4-4/3; 10 tries, then the
  centre), resized to ``shape``, flipped with probability 1/2."""
  if image.ndim == 2:
    image = image[..., None]
  top, left, ch, cw = crop_window(*image.shape[:2], rng)
  crop = image[top:top + ch, left:left + cw]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(crop.squeeze(-1) if crop.shape[-1] == 1 else crop)
  out = np.asarray(pil.resize((shape[1], shape[0]), Image.BILINEAR))
  out = out.reshape(shape)
  return out[:, ::-1] if rng.random() < 0.5 else out
