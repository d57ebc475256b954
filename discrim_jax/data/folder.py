"""A folder of images as a data set: ``--config.dataset=folder:/path/to/root``.

Layout (as TFDS's ``ImageFolder`` and torchvision's ``ImageFolder``)::

  root/train/<class>/*.{jpg,jpeg,png,bmp,gif,webp}
  root/validation/<class>/...   (optional; else held out of train)
  root/test/<class>/...         (optional; else validation is the test split)

Class names are the sorted folder names under ``train/``; the label of a class
is its index in that list (the training app writes it to the workdir as
``classes.json``). Images are decoded with Pillow and resized so that their
shorter side is ``image_size``, then centre-cropped to a square; the first
training image's mode decides grey (1 channel) or colour (3).

Everything that would make a run train on less than the folder holds is an
error that names the path: no ``train/``, no class folders, a class without
images, a class in ``validation/``/``test/`` that ``train/`` lacks, files that
cannot be read as images (how many, and which).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np

PREFIX = "folder:"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_DIRS = ("train", "validation", "test")


class FolderError(ValueError):
  """A folder that cannot be used as it is; the message names the path."""


def _images_in(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in EXTENSIONS)


class ImageFolder:
  """The files and labels of an image folder (scanned at once; decoded by
  :meth:`read`).

  Args:
    root: the folder holding ``train/`` (and optionally ``validation/``,
      ``test/``).
    image_size: side of the square images; 0 means the first training
      image's shorter side.
  """

  def __init__(self, root: str | os.PathLike, image_size: int = 0):
    self.root = Path(root).expanduser()
    where = f"{PREFIX}{self.root}"
    if not self.root.is_dir():
      raise FolderError(f"{where}: no such folder")
    train = self.root / "train"
    if not train.is_dir():
      raise FolderError(f"{where} has no train/ folder; expected "
                        f"{self.root}/train/<class>/<image files>")
    self.class_names = sorted(d.name for d in train.iterdir()
                              if d.is_dir() and not d.name.startswith("."))
    if not self.class_names:
      raise FolderError(f"{where}: train/ holds no class folders; expected "
                        f"{train}/<class>/<image files>")
    self.files: dict[str, tuple[list[Path], np.ndarray]] = {}
    for split in SPLIT_DIRS:
      folder = self.root / split
      if not folder.is_dir():
        continue
      classes = sorted(d.name for d in folder.iterdir()
                       if d.is_dir() and not d.name.startswith("."))
      unknown = sorted(set(classes) - set(self.class_names))
      if unknown:
        raise FolderError(
            f"{where}: class folder(s) {unknown} in {split}/ but not in train/; "
            "every class must have training images")
      paths, labels = [], []
      for label, name in enumerate(self.class_names):
        found = _images_in(folder / name) if (folder / name).is_dir() else []
        if split == "train" and not found:
          raise FolderError(
              f"{where}: class {name!r} has no images in {folder / name} "
              f"(looked for {', '.join(EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
      if not paths:
        raise FolderError(f"{where}: {split}/ holds no images "
                          f"({', '.join(EXTENSIONS)})")
      self.files[split] = (paths, np.asarray(labels, np.int32))
    from PIL import Image  # pylint: disable=g-import-not-at-top
    first = self.files["train"][0][0]
    try:
      with Image.open(first) as im:
        self.channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
        self.image_size = image_size or min(im.size)
    except OSError as e:
      raise FolderError(f"{where}: cannot read {first} as an image ({e}); fix "
                        "or remove it") from None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.files)

  def read(self, split: str, num_threads: int = 8
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images (N, S, S, C), int32 labels (N,))`` of a split;
    FolderError naming the files that cannot be decoded, if any."""
    paths, labels = self.files[split]
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      results = list(pool.map(self._load, paths))
    bad = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
    if bad:
      shown = ", ".join(str(p.relative_to(self.root)) for p, _ in bad[:5])
      more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
      raise FolderError(
          f"{PREFIX}{self.root}: {len(bad)} of {len(paths)} {split} files cannot "
          f"be read as images: {shown}{more} ({bad[0][1]}); fix or remove them")
    return np.stack(results), labels

  def _load(self, path: Path) -> np.ndarray | str:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with Image.open(path) as im:
        im = im.convert("L" if self.channels == 1 else "RGB")
        array = resize_and_crop(np.asarray(im), self.image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      return f"{type(e).__name__}: {e}"
    return array.reshape(self.image_shape)


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes ``image`` (H, W[, C], uint8) so that its shorter side is
  ``size`` (bilinear, antialiased) and centre-crops it to ``size x size``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  if (h, w) != (size, size):
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and
                          image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((nw, nh), Image.BILINEAR, reducing_gap=None))
    top, left = (nh - size) // 2, (nw - size) // 2
    image = resized[top:top + size, left:left + size].reshape(
        (size, size) + image.shape[2:])
  return image
