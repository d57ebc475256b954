"""A TFDS builder for the Fashion-MNIST files that Debian's package ships.

TFDS's own ``fashion_mnist`` builder downloads from the internet. This one
reads the four upstream idx files (``train-images-idx3-ubyte.gz`` etc.) from a
local folder, so the project's default run and its tests work offline on the
real data. The files come from Debian's ``dataset-fashion-mnist`` package,
installed by ``make data`` (``apt-get install``, or ``apt-get download`` +
``dpkg -x`` into ``~/.cache/discrim_jax/deb`` where there is no root).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
               "shirt", "sneaker", "bag", "ankle boot")
ENV_VAR = "DISCRIM_JAX_FASHION_MNIST_DIR"
_DEBIAN_DIR = "usr/share/datasets/fashion-mnist"
HOW_TO_GET = (
    "install Debian's package with `make data` (or `sudo apt-get install "
    "dataset-fashion-mnist`), or point ${env} at a folder holding the four "
    "idx .gz files").replace("${env}", ENV_VAR)


def candidate_dirs() -> list[Path]:
  dirs = []
  if os.environ.get(ENV_VAR):
    dirs.append(Path(os.environ[ENV_VAR]))
  dirs.append(Path("/") / _DEBIAN_DIR)
  dirs.append(Path.home() / ".cache" / "discrim_jax" / "deb" / _DEBIAN_DIR)
  return dirs


def find_files() -> Path:
  """Returns the first folder holding all four idx files, or raises."""
  needed = [f for pair in FILES.values() for f in pair]
  for d in candidate_dirs():
    if all((d / f).is_file() for f in needed):
      return d
  raise FileNotFoundError(
      f"Fashion-MNIST idx files not found in any of "
      f"{[str(d) for d in candidate_dirs()]}; {HOW_TO_GET}")


def read_idx(path: Path) -> np.ndarray:
  """Reads an (optionally gzipped) idx file: images (N, H, W) or labels (N,)."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  if magic not in (2049, 2051):
    raise ValueError(f"{path} is not an idx1/idx3 ubyte file (magic {magic})")
  ndim = magic & 0xFF
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  offset = 4 + 4 * ndim
  array = np.frombuffer(data, np.uint8, offset=offset)
  if array.size != int(np.prod(dims)):
    raise ValueError(f"{path} is truncated: header says {dims}, "
                     f"found {array.size} values")
  return array.reshape(dims)


class DebianFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017) read from local idx files."""

  VERSION = tfds.core.Version("1.0.0")
  READS_LOCAL_FILES = True  # preparing it needs no network
  RELEASE_NOTES = {"1.0.0": "Read from Debian's dataset-fashion-mnist files."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    folder = find_files()
    return {split: self._generate_examples(folder / images, folder / labels)
            for split, (images, labels) in FILES.items()}

  def _generate_examples(self, images_path, labels_path):
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if len(images) != len(labels):
      raise ValueError(f"{images_path} has {len(images)} images but "
                       f"{labels_path} has {len(labels)} labels")
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}
