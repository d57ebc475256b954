"""``fonts``: 100 printed characters rendered from the fonts of Debian's font
packages, 32x32 grey (in the spirit of notMNIST): a many-class data set that
any machine can make offline once the packages are installed (``make fonts``).

* **Classes**: digits, Latin, Greek and Cyrillic letters and a few symbols,
  chosen so that no two share a glyph shape (no Latin ``A`` beside Greek
  ``Α``, no ``0`` beside ``O``, no ``c`` beside ``C``: glyphs are scaled to a
  common size, so case alone would not tell them apart).
* **Fonts**: every ``.ttf``/``.otf`` file under the font folders whose
  character map covers all 100 classes. Fonts are grouped by the first word
  of their family name (``Noto``, ``DejaVu``, ``Liberation``...), clones of
  one design joined (``SUPERFAMILIES``), and groups, in sorted order, go to test (every 5th from the
  first), validation (every 5th from the second) and train: **train,
  validation and test typefaces are disjoint**, so the test asks for
  generalisation to unseen typefaces.
* **Rendering** (the light augmentation): each font draws each character
  ``VARIANTS[split]`` times, rotated by up to 8 degrees, its ink scaled so
  that the longer side is 20-26 pixels, centred and shifted by up to 2 pixels;
  every draw from a generator seeded by (font file name, class, variant), so
  the bytes do not depend on the order or the machine's file listing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

CLASSES = ("23456789"  # no 0 (O) or 1 (l, I)
           "ABCDEFGHJKLMNPQRTUVWXYZ"  # no I, O, S (S/s differ in size only)
           "abdefghijkmnpqrtuy"  # no c o s v w x z (their capitals), l (I)
           "ΓΔΘΛΞΠΣΦΨΩ"  # Greek capitals unlike Latin ones
           "αβγδεζηλμξπστφψως"  # Greek small letters unlike Latin ones
           "БДЖИЙЦЧШЩЪЫЭЮЯ"  # Cyrillic capitals unlike Latin/Greek/digits
           "&@#?%§£€¥+")
PACKAGES = ("fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation",
            "fonts-freefont-ttf", "fonts-urw-base35", "fonts-croscore",
            "fonts-crosextra-carlito", "fonts-crosextra-caladea",
            "fonts-open-sans", "fonts-roboto-unhinted", "fonts-linuxlibertine",
            "fonts-ebgaramond", "fonts-noto-core", "fonts-texgyre",
            "fonts-paratype", "fonts-lato", "fonts-gfs-didot",
            "fonts-gfs-artemisia")
# Typefaces drawn from one design under other names are one group, whatever
# their family names (first words): the croscore fonts are Liberation's
# designs; GNU FreeFont and TeX Gyre derive from URW's; Carlito from Lato;
# Noto Sans from Open Sans.
SUPERFAMILIES = {"Arimo": "Liberation", "Tinos": "Liberation",
                 "Cousine": "Liberation", "FreeSans": "URW", "FreeSerif": "URW",
                 "FreeMono": "URW", "Nimbus": "URW", "C059": "URW",
                 "P052": "URW", "Z003": "URW", "D050000L": "URW", "TeX": "URW",
                 "Carlito": "Lato", "Open": "Noto"}
VARIANTS = {"train": 4, "validation": 2, "test": 2}
SIZE = 32
ENV_VAR = "DISCRIM_JAX_FONTS_DIR"
HOW_TO_GET = ("install Debian's font packages with `make fonts` (apt-get "
              f"install {' '.join(PACKAGES)}), or point ${ENV_VAR} at a "
              "folder of .ttf/.otf files")


def font_dirs() -> list[Path]:
  """Where fonts are looked for: $DISCRIM_JAX_FONTS_DIR alone where set,
  else the system's fonts and those ``make fonts`` unpacks without root."""
  if os.environ.get(ENV_VAR):
    return [Path(os.environ[ENV_VAR])]
  return [Path("/usr/share/fonts"),
          Path.home() / ".cache" / "discrim_jax" / "fonts" / "usr/share/fonts"]


def superfamily(family: str) -> str:
  """The group of a font family: its first word, clones joined."""
  first = family.split()[0]
  return SUPERFAMILIES.get(first, first)


def _covers_all(path: Path) -> str | None:
  """The font's family name when its character map has every class."""
  from fontTools import ttLib  # pylint: disable=g-import-not-at-top
  try:
    font = ttLib.TTFont(str(path), lazy=True)
    cmap = font.getBestCmap() or {}
    if not all(ord(c) in cmap for c in CLASSES):
      return None
    names = font["name"]
    family = names.getDebugName(16) or names.getDebugName(1)
    return family or None
  except Exception:  # pylint: disable=broad-except
    return None  # not a font fontTools can read: not used


def split_fonts() -> dict[str, list[Path]]:
  """The font files of each split (see the module's docstring)."""
  files = sorted({p.resolve() for d in font_dirs() if d.is_dir()
                  for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf")},
                 key=lambda p: p.name)
  groups: dict[str, list[Path]] = {}
  seen = set()
  for path in files:
    if path.name in seen:  # the same file from two packages
      continue
    family = _covers_all(path)
    if family:
      seen.add(path.name)
      groups.setdefault(superfamily(family), []).append(path)
  if len(groups) < 3:
    raise FileNotFoundError(
        f"fonts: {len(groups)} font families under "
        f"{[str(d) for d in font_dirs()]} cover all {len(CLASSES)} characters "
        f"(3 or more needed: train, validation, test); {HOW_TO_GET}")
  out = {"train": [], "validation": [], "test": []}
  for i, name in enumerate(sorted(groups)):
    split = {0: "test", 1: "validation"}.get(i % 5, "train")
    out[split] += groups[name]
  return out


def render(path: Path, char: str, variant: int) -> np.ndarray:
  """One SIZE x SIZE uint8 drawing of ``char`` in font ``path``."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  seed = hashlib.sha256(f"{path.name}|{char}|{variant}".encode()).digest()
  rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
  angle, longer = rng.uniform(-8, 8), rng.uniform(20, 26)
  dx, dy = rng.integers(-2, 3, size=2)
  font = ImageFont.truetype(str(path), 64)
  canvas = Image.new("L", (160, 160), 0)
  ImageDraw.Draw(canvas).text((80, 80), char, fill=255, font=font, anchor="mm")
  canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC)
  box = canvas.getbbox()
  if box is None:
    raise ValueError(f"{path.name} draws nothing for {char!r}")
  ink = canvas.crop(box)
  scale = longer / max(ink.size)
  w, h = (max(1, round(s * scale)) for s in ink.size)
  ink = ink.resize((w, h), Image.Resampling.LANCZOS)
  out = Image.new("L", (SIZE, SIZE), 0)
  out.paste(ink, ((SIZE - w) // 2 + int(dx), (SIZE - h) // 2 + int(dy)))
  return np.asarray(out, np.uint8)


class DebianFonts(tfds.core.GeneratorBasedBuilder):
  """100 characters rendered from Debian's fonts; disjoint typefaces."""

  VERSION = tfds.core.Version("1.0.0")
  READS_LOCAL_FILES = True  # preparing it needs no network
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(SIZE, SIZE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASSES)),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    fonts = split_fonts()
    return {split: self._generate_examples(split, files)
            for split, files in fonts.items()}

  def _generate_examples(self, split, files):
    for path in files:
      for label, char in enumerate(CLASSES):
        for v in range(VARIANTS[split]):
          image = render(path, char, v)
          yield f"{path.name}|{label}|{v}", {"image": image[..., None],
                                              "label": label}
