"""Users' own data: any TFDS name, an image folder, streaming, offline errors."""

import itertools
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from discrim_jax import config_lib
from discrim_jax import data
from discrim_jax import run_spec
from discrim_jax import train
from discrim_jax.data import folder as folder_lib
from discrim_jax.data import inception_crop
from discrim_jax.data import tfds_access
from discrim_jax.data import tfds_prepare
from discrim_jax.data import streaming
from discrim_jax.data import synthetic_records

REPO = Path(__file__).resolve().parents[1]


class Interrupt(Exception):
  pass


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ------------------------------------------------------------ any TFDS name


def test_tfds_catalogue_name_trains_the_smoke_recipe(tmp_path, smoke_config):
  config = smoke_config(dataset="cifar10", num_epochs=1,
                        **{"data_dir": str(tmp_path / "tfds")})
  with tfds.testing.mock_data(num_examples=400):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    names = tfds.builder("cifar10").info.features["label"].names
  assert summary["total_steps"] == 5 and 0 <= summary["test_accuracy"] <= 1
  classes = json.loads((tmp_path / "run" / "classes.json").read_text())
  assert classes == names and len(classes) == 10


def test_own_validation_split_and_images_of_any_size_cropped():
  # imagenette has train and validation splits and images of varying size:
  # validation becomes the test split, validation is held out of train.
  with tfds.testing.mock_data(num_examples=50):
    ds = data.Dataset("imagenette", image_size=24, holdout="0.2")
    assert ds.image_shape == (24, 24, 3) and ds.num_classes == 10
    images, _ = ds.arrays("train")
    assert images.shape[1:] == (24, 24, 3) and images.dtype == np.uint8
    assert ds.num_examples("train") == 40 and ds.num_examples("validation") == 10
    assert ds.num_examples("test") == 50
    named = data.Dataset("mnist", splits={"train": "train[:20]",
                                          "validation": "train[20:30]"})
    assert named.image_shape == (28, 28, 1)
    # (mock_data serves any split name; the plan is what a real run reads.)
    assert named.split_plan() == {"train": "train[:20]", "validation": "train[20:30]",
                             "test": "test"}


@pytest.mark.parametrize("available,splits,expected", [
    (["train", "test"], {}, {"train": "train", "validation": None, "test": "test"}),
    (["train", "validation"], {}, {"train": "train", "validation": None,
                                   "test": "validation"}),
    (["train", "validation", "test"], {}, {"train": "train",
                                           "validation": "validation",
                                           "test": "test"}),
    (["train"], {"test": "train[90%:]", "train": "train[:90%]"},
     {"train": "train[:90%]", "validation": None, "test": "train[90%:]"}),
])
def test_split_plan(available, splits, expected):
  spec = tfds_access.spec_for("any", "")
  assert tfds_access.split_plan(available, spec, splits, "any") == expected


def test_split_plan_without_test_split_says_how_to_name_one():
  with pytest.raises(ValueError, match=r"no test or validation split.*"
                     r"--config.splits.test='train\[80%:\]'"):
    tfds_access.split_plan(["train"], tfds_access.spec_for("any", ""), {}, "any")


@pytest.mark.parametrize("text,fields", [
    ("5000", {"holdout": 5000}), ("0.1", {"holdout_fraction": 0.1}),
    ("5/class", {"holdout_per_class": 5}), ("", {})])
def test_holdout_parsing(text, fields):
  assert data.parse_holdout(text) == fields


@pytest.mark.parametrize("text", ["-3", "1.5", "x/class", "ten"])
def test_bad_holdout_is_a_config_error(text, smoke_config):
  with pytest.raises(config_lib.ConfigError, match=rf"hold-out '{text}'.*validation_holdout"):
    run_spec.resolve(smoke_config(validation_holdout=text), 1)


def test_unknown_name_says_what_names_work():
  with pytest.raises(ValueError, match=r"unknown data set 'no_such_data'.*"
                     r"TFDS catalogue name.*folder:/path"):
    data.Dataset("no_such_data")


# ----------------------------------------------------------------- offline


def test_unprepared_data_without_download_fails_at_once(tmp_path):
  start = time.time()
  with pytest.raises(ValueError, match=r"'cifar10' is not prepared in .*"
                     r"config.download is False.*tfds build cifar10"):
    data.Dataset("cifar10", data_dir=str(tmp_path), download=False).arrays("test")
  assert time.time() - start < 30


def test_unprepared_data_without_network_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_prepare, "network_available",
                      lambda: "storage.googleapis.com:443 unreachable: test")
  with pytest.raises(ValueError, match=r"cannot be downloaded \(storage.*unreachable"
                     r".*copy DIR here and pass --config.data_dir=DIR"):
    data.Dataset("cifar10", data_dir=str(tmp_path)).arrays("train")


def test_cli_offline_error_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  start = time.time()
  result = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "train.py"),
       "--config=" + str(REPO / "experiments" / "configs" / "fashion_mnist.py"),
       "--config.dataset=cifar10", f"--config.data_dir={tmp_path / 'tfds'}",
       "--config.download=False", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "tfds build cifar10" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert time.time() - start < 120


# ------------------------------------------------------------- image folder


def _image(path: Path, size, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _folder(root: Path, per_class=12, test_per_class=4):
  for c, name in enumerate(["zebra", "apple", "moth"]):
    for i in range(per_class):
      _image(root / "train" / name / f"{i}.png", (20 + i, 16), seed=100 * c + i)
    for i in range(test_per_class):
      _image(root / "test" / name / f"{i}.jpg", (16, 18), seed=1000 + 100 * c + i)
  return root


def test_image_folder_reads_sorted_classes_any_size(tmp_path):
  root = _folder(tmp_path / "imgs")
  ds = data.Dataset(f"folder:{root}", image_size=16, holdout="6")
  assert ds.class_names == ["apple", "moth", "zebra"] and ds.num_classes == 3
  assert ds.image_shape == (16, 16, 3)
  assert [ds.num_examples(s) for s in ("train", "validation", "test")] == [30, 6, 12]
  images, labels = ds.arrays("test")
  assert images.shape == (12, 16, 16, 3)
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 4))
  # The file decoded and centre-cropped as documented.
  expected = folder_lib.resize_and_crop(
      np.asarray(Image.open(root / "test" / "apple" / "0.jpg").convert("RGB")), 16)
  np.testing.assert_array_equal(images[0], expected)


def test_image_folder_trains_and_writes_its_class_map(tmp_path, smoke_config):
  root = _folder(tmp_path / "imgs", per_class=40)
  config = smoke_config(dataset=f"folder:{root}", image_size=16, num_epochs=1,
                        batch_size=16, eval_batch_size=16, train_subset=0,
                        eval_subset=0, validation_holdout="0.2")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["total_steps"] == 96 // 16
  assert json.loads((tmp_path / "run" / "classes.json").read_text()) == [
      "apple", "moth", "zebra"]


def _bad_folders(tmp_path):
  missing = tmp_path / "missing"
  no_train = tmp_path / "no_train"
  (no_train / "test" / "a").mkdir(parents=True)
  no_classes = tmp_path / "no_classes"
  (no_classes / "train").mkdir(parents=True)
  empty_class = _folder(tmp_path / "empty_class")
  (empty_class / "train" / "ghost").mkdir()
  test_only = _folder(tmp_path / "test_only")
  _image(test_only / "test" / "yeti" / "0.png", (8, 8))
  unreadable = _folder(tmp_path / "unreadable")
  for i in range(7):
    (unreadable / "train" / "moth" / f"broken{i}.jpg").write_bytes(b"not a jpeg")
  return {
      "missing": (missing, r"no such folder"),
      "no_train": (no_train, r"has no train/ folder"),
      "no_classes": (no_classes, r"train/ holds no class folders"),
      "empty_class": (empty_class, r"class 'ghost' has no files"),
      "test_only": (test_only, r"class folder\(s\) \['yeti'\] in test/ but not in train/"),
      "unreadable": (unreadable, r"7 of 43 train files cannot be read as images: "
                                 r"train/moth/broken0.jpg, .* and 2 more.*fix or remove"),
  }


@pytest.mark.parametrize("case", ["missing", "no_train", "no_classes",
                                  "empty_class", "test_only", "unreadable"])
def test_bad_image_folder_errors_name_the_path(case, tmp_path):
  root, match = _bad_folders(tmp_path)[case]
  with pytest.raises(folder_lib.FolderError, match=match) as e:
    data.Dataset(f"folder:{root}", image_size=8).arrays("train")
  assert str(root) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def fashion_array_record(tmp_path_factory, fashion_data_dir):
  """An ArrayRecord copy of the real Fashion-MNIST (prepared once)."""
  path = str(tmp_path_factory.mktemp("tfds_array_record"))
  streaming.StreamingDataset("fashion_mnist", data_dir=path)
  return path


_LIMITS = {"train": 640, "validation": 200, "test": 200}


def test_streaming_gives_the_in_memory_batches(fashion_array_record,
                                               fashion_data_dir):
  streamed = streaming.StreamingDataset("fashion_mnist",
                                        data_dir=fashion_array_record,
                                        max_examples=_LIMITS)
  memory = data.Dataset("fashion_mnist", data_dir=fashion_data_dir,
                        max_examples=_LIMITS)
  for split, train_mode, start in (("train", True, 7), ("test", False, 0)):
    kwargs = dict(train=train_mode, seed=3, start_step=start, process_index=1,
                  process_count=2)
    pairs = zip(data.make_iterator(memory, split, 64, **kwargs),
                data.make_iterator(streamed, split, 64, **kwargs))
    count = 0
    for a, b in itertools.islice(pairs, 14):
      assert set(a) == set(b)
      for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split}/{key}")
      count += 1
    assert count == (14 if train_mode else 4)  # 200 test examples: 4 batches


def test_streaming_run_resumes_exactly_mid_epoch(fashion_array_record, tmp_path,
                                                 smoke_config, read_metrics):
  config = smoke_config(data_in_memory=False, data_dir=fashion_array_record)
  train.train_and_evaluate(config, str(tmp_path / "whole"))

  def die_at(step):
    if step == 7:  # mid-epoch 2
      raise Interrupt()

  with pytest.raises(Interrupt):
    train.train_and_evaluate(config, str(tmp_path / "cut"), step_callback=die_at)
  train.train_and_evaluate(config, str(tmp_path / "cut"))
  assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "cut")


def test_streaming_refuses_tfrecord_data_and_per_class_holdouts(fashion_data_dir):
  with pytest.raises(ValueError, match=r"prepared in .* as tfrecord.*"
                     r"tfds build fashion_mnist --file_format=array_record"):
    streaming.StreamingDataset("fashion_mnist", data_dir=fashion_data_dir)
  with pytest.raises(ValueError, match=r"per-class validation hold-out.*0.1"):
    streaming.StreamingDataset("caltech101")


_PEAK_RSS = """
import re, sys
from discrim_jax.data import make_iterator, streaming, synthetic_records
def rss_kib():
  return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read())[1])
n = int(sys.argv[1])
before = rss_kib()  # after the imports, before the data set is opened
ds = streaming.StreamingDataset(
    "synthetic_records", builder=synthetic_records.SyntheticRecords(
        num_records=n, data_dir=sys.argv[2]))
it = make_iterator(ds, "train", 128, train=True, seed=0, process_index=0,
                   process_count=1)
for _ in range(60):
  next(it)
assert ds.index_bytes() <= 16 * n
print(n, before, rss_kib())
"""


def test_streaming_memory_does_not_grow_with_the_records(tmp_path):
  """The host memory that opening the data set and reading 60 batches adds
  (RSS after minus RSS after the imports), for 2,000 and 16,000 records of
  3,072 bytes. A reader that held every record would add the 14,000 extra
  records' 43 MB (more with its containers); what streaming adds per record
  is the index, 16 bytes (0.2 MB here), so the bound is half of those 43 MB.
  (A process that also holds an array of every record differs by 44 MB.)
  The rest is allocator noise: up to 90 MB between runs on the same data
  with glibc's default per-thread arenas under grain's 16 reader threads;
  0-5 MB in five pairs of runs with MALLOC_ARENA_MAX=2, which the measuring
  processes get."""
  env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_ARENA_MAX="2")
  sizes = (2_000, 16_000)
  added = {}
  for n in sizes:
    # Written here: the measuring process only reads (TFDS keeps what it
    # wrote in the writer's memory).
    synthetic_records.SyntheticRecords(
        num_records=n, data_dir=str(tmp_path / str(n))
    ).download_and_prepare(file_format="array_record")
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(n),
                             str(tmp_path / str(n))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _, before, after = map(int, result.stdout.split()[-3:])
    added[n] = after - before  # KiB
  record_bytes = np.prod(synthetic_records.SHAPE)
  all_records_kib = (sizes[1] - sizes[0]) * record_bytes / 1024
  assert abs(added[sizes[1]] - added[sizes[0]]) < all_records_kib / 2, added


@pytest.fixture(name="jpeg_records", scope="module")
def jpeg_records_fixture(tmp_path_factory):
  """96 training records of ImageNet-sized JPEGs, streamed at 96 px."""
  builder = synthetic_records.JpegRecords(
      num_records=96, data_dir=str(tmp_path_factory.mktemp("jpeg")))
  builder.download_and_prepare(file_format="array_record")
  return streaming.StreamingDataset("jpeg_records", builder=builder,
                                    image_size=96)


def test_jpeg_records_stream_the_same_batches_from_any_step(jpeg_records):
  """Large JPEG records take the tf.data crop stage: float images in [0, 1], the
  records' labels, and a stream started at step 3 (a resumed run) gives the
  batch an unbroken stream gives there, bit for bit, as do two hosts
  together."""
  ds = jpeg_records
  assert ds.jpeg and ds.image_shape == (96, 96, 3)
  kwargs = dict(train=True, seed=5, augment=True, normalize=False,
                crop_padding=4, process_index=0, process_count=1)
  batches = list(itertools.islice(
      streaming.iterate(ds, "train", 16, start_step=0, **kwargs), 4))
  resumed = next(streaming.iterate(ds, "train", 16, start_step=3, **kwargs))
  for key, value in batches[3].items():
    np.testing.assert_array_equal(value, resumed[key], err_msg=key)
  image = batches[0]["image"]
  assert image.shape == (16, 96, 96, 3) and image.dtype == np.float32
  assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
  assert not np.array_equal(image, batches[1]["image"])
  # Two hosts' batches are the halves of one host's: each example's crop is
  # drawn from its place in the global batch, not in its host's stream.
  halves = [next(streaming.iterate(ds, "train", 16, start_step=2, **{
      **kwargs, "process_index": i, "process_count": 2})) for i in (0, 1)]
  for key, value in batches[2].items():
    np.testing.assert_array_equal(
        value, np.concatenate([h[key] for h in halves]), err_msg=key)
  # The first epoch's order is the in-memory path's; the labels are the records'.
  order = data.batching.epoch_order(ds.num_examples("train"), 5, 0)
  assert batches[0]["label"].tolist() == [ds.record("train", int(i))[1]
                                          for i in order[:16]]


def test_jpeg_batch_crop_is_the_documented_recipe(jpeg_records):
  """The streamed crop of a record is TensorFlow's Inception crop of the
  whole decoded image (window and flip drawn statelessly from the key),
  resized bilinearly, with the record's label."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds, shape = jpeg_records, (96, 96, 3)
  positions = [0, 5, 17, 40, 63, 64]
  keys = np.array([[7, p] for p in positions], np.int64)
  records = ds.serialized("train", positions)
  streamed = inception_crop.jpeg_crop(shape)
  jpegs, labels = ds.parse_batch(tf.constant(records))
  for j, p in enumerate(positions):
    assert labels[j] == ds.record("train", p)[1]
    encoded = jpegs[j]
    fast = streamed(encoded, tf.constant(keys[j])).numpy()
    whole = tf.io.decode_jpeg(encoded, channels=3).numpy()
    box_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(keys[j]))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        whole.shape, tf.zeros([0, 0, 4]), seed=box_key, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    (top, left), (h, w) = begin[:2].numpy(), size[:2].numpy()
    crop = tf.image.resize(whole[top:top + h, left:left + w], shape[:2]) / 255.0
    expected = tf.image.stateless_random_flip_left_right(crop, flip_key).numpy()
    # libjpeg decodes a window as it decodes the whole image except, at
    # times, a few pixels at the window's edge (chroma upsampling there sees
    # other neighbours): 2 levels in one of these records. Bilinear
    # resampling is a convex combination, so the outputs differ by at most
    # that gap; 1e-6 more allows the graph to round the division by 255
    # otherwise (a few float32 ulps of values <= 1).
    window = tf.io.decode_and_crop_jpeg(encoded, [top, left, h, w], channels=3)
    gap = np.abs(window.numpy().astype(int)
                 - whole[top:top + h, left:left + w]).max()
    np.testing.assert_allclose(fast, expected, rtol=0, atol=gap / 255 + 1e-6)
