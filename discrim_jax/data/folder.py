"""A folder of images as a data set: ``--config.dataset=folder:/path/to/root``.

Layout (as TFDS's ``ImageFolder`` and torchvision's ``ImageFolder``)::

  root/train/<class>/**/<image files>
  root/validation/<class>/...   (optional; else held out of train)
  root/test/<class>/...         (optional; else validation is the test split)

With ``train/`` alone, a fixed 10% of each class (seed 0) is the test split
and the app holds validation out of the rest.

Class names are the sorted folder names under ``train/``; the label of a class
is its index in that list (the training app writes it to the workdir as
``classes.json``). Every file under a class folder counts, in sub-folders
too (names starting with ``.`` excepted, as ``.DS_Store``), whatever its
extension: each must be an image Pillow reads. Images are decoded to their
true intensities (1-bit, 8-bit, 16-bit grey, palette, grey or colour with
alpha, CMYK: see :func:`decode`), resized so that their shorter side is
``image_size``, then centre-cropped to a square; the first training image
decides grey (1 channel) or colour (3).

Everything that would make a run train on less than the folder holds is an
error that names the path: no ``train/``, no class folders, a file where a
class folder should be, a class without images, a class in
``validation/``/``test/`` that ``train/`` lacks, a link to nothing, files that
cannot be read as images (how many, and which).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np

PREFIX = "folder:"
SPLIT_DIRS = ("train", "validation", "test")
# With train/ alone: the share of each class held out as the test split.
TEST_FRACTION = 0.1


class FolderError(ValueError):
  """A folder that cannot be used as it is; the message names the path."""


def _visible(entries):
  return sorted(p for p in entries if not p.name.startswith("."))


def _images_in(folder: Path, root: Path) -> list[Path]:
  """Every file under ``folder``, sub-folders included; a link to nothing is
  a FolderError."""
  out = []
  for path in _visible(folder.rglob("*")):
    if any(part.startswith(".") for part in path.relative_to(folder).parts):
      continue
    if path.is_symlink() and not path.exists():
      raise FolderError(f"{PREFIX}{root}: {path.relative_to(root)} is a link to "
                        "nothing; fix or remove it")
    if path.is_file():
      out.append(path)
  return out


def _class_folders(folder: Path, root: Path) -> list[str]:
  entries = _visible(folder.iterdir())
  files = [p for p in entries if not p.is_dir()]
  if files:
    raise FolderError(
        f"{PREFIX}{root}: {files[0].relative_to(root)} is not a folder; "
        f"{folder.name}/ must hold only class folders ({folder}/<class>/...)")
  return [p.name for p in entries]


_GREY = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "La")


def decode(image, channels: int) -> np.ndarray:
  """A Pillow image as uint8 ``(H, W, channels)`` holding its intensities:
  1-bit as 0/255, 16-bit grey scaled by 255/65535 (rounded), palettes
  through their colours, alpha dropped, CMYK and other colour modes through
  Pillow's RGB conversion; colour to grey by ITU-R 601-2 luma (Pillow's
  ``L``). Float images, whose range is unknown, are refused (ValueError)."""
  mode = image.mode
  if mode == "F":
    raise ValueError("32-bit float image: its intensity range is unknown; save "
                     "it as 8- or 16-bit")
  if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise ValueError(f"{mode} image with values in [{values.min()}, "
                       f"{values.max()}], beyond 16 bits")
    grey = np.round(values * (255 / 65535)).astype(np.uint8)
    return grey[..., None] if channels == 1 else np.repeat(grey[..., None], 3, -1)
  if mode == "1":
    image = image.convert("L")  # 0/255
  if channels == 1:
    return np.asarray(image.convert("L"))[..., None]
  if mode in _GREY or mode == "L":
    grey = np.asarray(image.convert("L"))
    return np.repeat(grey[..., None], 3, -1)
  return np.asarray(image.convert("RGB"))


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
    self.class_names = _class_folders(train, self.root)
    if not self.class_names:
      raise FolderError(f"{where}: train/ holds no class folders; expected "
                        f"{train}/<class>/<image files>")
    self.files: dict[str, tuple[list[Path], np.ndarray]] = {}
    for split in SPLIT_DIRS:
      folder = self.root / split
      if not folder.is_dir():
        continue
      classes = _class_folders(folder, self.root)
      unknown = sorted(set(classes) - set(self.class_names))
      if unknown:
        raise FolderError(
            f"{where}: class folder(s) {unknown} in {split}/ but not in train/; "
            "every class must have training images")
      paths, labels = [], []
      for label, name in enumerate(self.class_names):
        found = (_images_in(folder / name, self.root)
                 if (folder / name).is_dir() else [])
        if split == "train" and not found:
          raise FolderError(f"{where}: class {name!r} has no files in "
                            f"{folder / name}")
        paths += found
        labels += [label] * len(found)
      if not paths:
        raise FolderError(f"{where}: {split}/ holds no files")
      self.files[split] = (paths, np.asarray(labels, np.int32))
    if set(self.files) == {"train"}:
      self._hold_out_test()
    from PIL import Image  # pylint: disable=g-import-not-at-top
    first = self.files["train"][0][0]
    try:
      with Image.open(first) as im:
        self.channels = 1 if im.mode in _GREY + ("F",) else 3
        self.image_size = image_size or min(im.size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise FolderError(f"{where}: cannot read {first} as an image ({e}); fix "
                        "or remove it") from None

  def _hold_out_test(self) -> None:
    """train/ alone: a fixed TEST_FRACTION of each class (at least one
    image, none of a class of one) becomes the test split."""
    paths, labels = self.files["train"]
    rng = np.random.default_rng(0)
    test = np.zeros(len(paths), bool)
    for c in range(len(self.class_names)):
      members = np.flatnonzero(labels == c)
      k = max(1, round(TEST_FRACTION * len(members))) if len(members) > 1 else 0
      test[rng.choice(members, k, replace=False)] = True
    pick = lambda mask: ([p for p, m in zip(paths, mask) if m], labels[mask])
    self.files = {"train": pick(~test), "test": pick(test)}

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
        array = resize_and_crop(decode(im, self.channels), self.image_size)
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
