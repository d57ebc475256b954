"""Image folders read exactly: every file under a class folder counts (in
sub-folders, of any extension), anything else is a one-line error naming
it, and every image mode decodes to the intensities it holds."""

from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from discrim_jax import data
from discrim_jax.data import folder as folder_lib


def _save(path: Path, array, mode=None, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path, format=fmt)


def _tree(root: Path, per_class=10):
  rng = np.random.default_rng(0)
  for c, name in enumerate(["coat", "trouser"]):
    for i in range(per_class):
      _save(root / "train" / name / f"{i}.png",
            rng.integers(0, 256, (8, 8), dtype=np.uint8))
  return root


def test_subfolders_and_any_extension_count(tmp_path):
  root = _tree(tmp_path / "r")
  rng = np.random.default_rng(1)
  for i in range(3):
    _save(root / "train" / "trouser" / "extra" / f"{i}.png",
          rng.integers(0, 256, (8, 8), dtype=np.uint8))
  _save(root / "train" / "coat" / "a.tif", rng.integers(0, 256, (8, 8), dtype=np.uint8))
  (root / "train" / "coat" / ".DS_Store").write_bytes(b"junk")  # hidden: not data
  folder = folder_lib.ImageFolder(root, image_size=8)
  # train/ alone: 10% of each class (at least one) is the test split.
  counts = {s: len(folder.files[s][0]) for s in folder.splits}
  assert counts == {"train": 22, "test": 2}
  all_files = folder.files["train"][0] + folder.files["test"][0]
  assert root / "train" / "trouser" / "extra" / "2.png" in all_files
  assert root / "train" / "coat" / "a.tif" in all_files


def test_train_only_folder_trains_with_held_out_validation_and_test(tmp_path):
  root = _tree(tmp_path / "r")
  ds = data.Dataset(f"folder:{root}", image_size=8)
  sizes = [ds.num_examples(s) for s in ("train", "validation", "test")]
  assert sum(sizes) == 20 and min(sizes) > 0, sizes


@pytest.mark.parametrize("case", ["not_an_image", "dangling_link", "file_in_train",
                                  "bomb_first", "float_image"])
def test_what_is_not_an_image_is_named(case, tmp_path):
  root = _tree(tmp_path / "r")
  expected = {
      "not_an_image": r"1 of 19 train files cannot be read as images: "
                      r"train/coat/notes.txt",
      "dangling_link": r"train/trouser/gone.png is a link to nothing",
      "file_in_train": r"train/readme.md is not a folder; train/ must hold only "
                       r"class folders",
      "bomb_first": r"cannot read .*train/coat/0.png.*DecompressionBomb|"
                    r"decompression bomb",
      "float_image": r"cannot be read as images: train/coat/f.tif.*float",
  }[case]
  if case == "not_an_image":
    (root / "train" / "coat" / "notes.txt").write_text("hello")
  elif case == "dangling_link":
    (root / "train" / "trouser" / "gone.png").symlink_to(root / "nowhere.png")
  elif case == "file_in_train":
    (root / "train" / "readme.md").write_text("x")
  elif case == "bomb_first":
    _save(root / "train" / "coat" / "0.png", np.zeros((200, 200), np.uint8))
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100  # 40,000 pixels is a "bomb" past 200
  elif case == "float_image":
    _save(root / "train" / "coat" / "f.tif", np.ones((8, 8), np.float32), "F")
  try:
    with pytest.raises(folder_lib.FolderError, match=expected) as e:
      data.Dataset(f"folder:{root}", image_size=8).arrays("train")
  finally:
    if case == "bomb_first":
      Image.MAX_IMAGE_PIXELS = limit
  assert "\n" not in str(e.value)


# ------------------------------------------------------- decoding, mode by mode

_RNG = np.random.default_rng(5)
_GREY8 = _RNG.integers(0, 256, (6, 7), dtype=np.uint8)
_GREY16 = _RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
_RGB = _RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
_ALPHA = _RNG.integers(0, 256, (6, 7), dtype=np.uint8)


def _luma(rgb):
  """Pillow's L: ITU-R 601-2, R*299/1000 + G*587/1000 + B*114/1000, rounded
  half up in fixed point (its own integer formula)."""
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _cases():
  """mode -> (saved image, expected grey (H, W), expected colour (H, W, 3))."""
  bits = _GREY8 > 127
  grey16 = np.round(_GREY16.astype(np.float64) * 255 / 65535).astype(np.uint8)
  palette = Image.fromarray(_RGB).quantize(16)  # P: indices into 16 colours
  pal_rgb = np.asarray(palette.convert("RGB"))
  return {
      "1": (Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8), None),
      "L": (Image.fromarray(_GREY8), _GREY8, None),
      "I;16": (Image.fromarray(_GREY16), grey16, None),
      "LA": (Image.merge("LA", [Image.fromarray(_GREY8), Image.fromarray(_ALPHA)]),
             _GREY8, None),
      "RGB": (Image.fromarray(_RGB), _luma(_RGB), _RGB),
      "RGBA": (Image.merge("RGBA", [*Image.fromarray(_RGB).split(),
                                    Image.fromarray(_ALPHA)]), _luma(_RGB), _RGB),
      "P": (palette, _luma(pal_rgb), pal_rgb),
      "CMYK": (Image.fromarray(_RGB).convert("CMYK"), None,
               np.asarray(Image.fromarray(_RGB).convert("CMYK").convert("RGB"))),
  }


@pytest.mark.parametrize("mode", sorted(_cases()))
def test_every_mode_decodes_to_its_intensities(mode, tmp_path):
  image, grey, colour = _cases()[mode]
  fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
  path = tmp_path / f"x.{fmt.lower()}"
  image.save(path, format=fmt)
  with Image.open(path) as loaded:
    if grey is not None:
      np.testing.assert_array_equal(folder_lib.decode(loaded, 1)[..., 0], grey)
    if colour is not None:
      np.testing.assert_array_equal(folder_lib.decode(loaded, 3), colour)
    elif grey is not None:  # grey in a colour data set: the same in 3 channels
      np.testing.assert_array_equal(folder_lib.decode(loaded, 3),
                                    np.repeat(grey[..., None], 3, -1))
