"""The offline 100-class data set: classes no two of which share a shape,
disjoint typefaces per split, the same bytes from every build."""

import hashlib
from pathlib import Path
import re
import shutil

import numpy as np
import pytest

from discrim_jax import data
from discrim_jax.data import fonts

REPO = Path(__file__).resolve().parents[1]
# Characters that print alike: at most one of each row may be a class.
LOOKALIKES = ["AΑА", "BΒВ", "EΕЕ", "HΗН", "KΚК", "MΜМ", "OΟО0oοо", "PΡР",
              "TΤТ", "XΧХ", "CС", "cс", "yу", "eе", "pрρ", "xхχ", "ΓГ", "ΠП",
              "ΦФ", "ΛЛ", "З3", "lI1|!", "Ββß", "ΣƩ", "Ьb", "ΘѲ"]
# Capitals whose small letter is the same shape: glyphs are scaled to one size.
SAME_SHAPE_CASES = "CcOoSsVvWwXxZz"
_CORE = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")


def test_one_hundred_classes_none_alike():
  assert len(fonts.CLASSES) == len(set(fonts.CLASSES)) == 100
  for row in LOOKALIKES:
    assert len(set(row) & set(fonts.CLASSES)) <= 1, row
  for upper, lower in zip(SAME_SHAPE_CASES[::2], SAME_SHAPE_CASES[1::2]):
    assert not {upper, lower} <= set(fonts.CLASSES), (upper, lower)


def test_makefile_installs_the_packages_the_module_names():
  text = (REPO / "Makefile").read_text()
  listed = re.search(r"FONT_PACKAGES := (.*?)\n(?!\s)", text, re.S).group(1)
  assert tuple(listed.replace("\\", " ").split()) == fonts.PACKAGES


def _dejavu_folder(tmp_path):
  """The DejaVu core fonts (``make test`` installs them where missing),
  copied into a folder of their own."""
  found = {p.name: p for d in fonts.font_dirs() if d.is_dir()
           for p in d.rglob("DejaVu*.ttf")}
  missing = [n for n in _CORE if n not in found]
  if missing:
    pytest.fail(f"DejaVu fonts {missing} not under {fonts.font_dirs()}: "
                "install fonts-dejavu-core (`make dejavu`)", pytrace=False)
  folder = tmp_path / "fonts"
  folder.mkdir()
  for name in _CORE:
    shutil.copy(found[name], folder)
  return folder


def test_builds_disjoint_typefaces_with_the_same_bytes(tmp_path, monkeypatch):
  monkeypatch.delenv(fonts.ENV_VAR, raising=False)
  monkeypatch.setenv(fonts.ENV_VAR, str(_dejavu_folder(tmp_path)))
  # DejaVu alone is one superfamily: too few for three splits, in one line.
  with pytest.raises(FileNotFoundError, match="make fonts"):
    fonts.split_fonts()
  # Its three families as groups: Sans (test), Sans Mono (validation), Serif.
  monkeypatch.setattr(fonts, "superfamily", lambda family: family)
  split = fonts.split_fonts()
  assert {k: sorted(p.name for p in v) for k, v in split.items()} == {
      "test": ["DejaVuSans-Bold.ttf", "DejaVuSans.ttf"],
      "validation": ["DejaVuSansMono-Bold.ttf", "DejaVuSansMono.ttf"],
      "train": ["DejaVuSerif-Bold.ttf", "DejaVuSerif.ttf"]}
  digests = []
  for build in ("a", "b"):
    ds = data.Dataset("fonts", data_dir=str(tmp_path / build))
    assert ds.num_classes == 100
    h = hashlib.sha256()
    for name in ("train", "validation", "test"):
      images, labels = ds.arrays(name)
      per_font = fonts.VARIANTS[name] * 2  # two fonts per split here
      np.testing.assert_array_equal(np.bincount(labels, minlength=100),
                                    [per_font] * 100)
      assert images.shape[1:] == (32, 32, 1) and images.max() == 255
      h.update(images.tobytes() + labels.tobytes())
    digests.append(h.hexdigest())
  assert digests[0] == digests[1]
