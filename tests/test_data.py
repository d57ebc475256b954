"""Input pipeline tests: CIFAR-100 / Caltech-101 under TFDS mock data, real Fashion-MNIST."""

import itertools
import tempfile
import threading
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from discrim_jax import data
from discrim_jax.data import batching
from discrim_jax.data import fashion_mnist
from discrim_jax.data import tfds_access
from discrim_jax.data import tfds_prepare
from discrim_jax.data.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def cifar():
  with tfds.testing.mock_data(num_examples=230):
    ds = data.Dataset("cifar100", validation_size=30)
    for split in data.SPLITS:
      ds.arrays(split)  # read while the mock is active
  return ds


@pytest.fixture(scope="module")
def caltech():
  with tfds.testing.mock_data(num_examples=120):
    ds = data.Dataset("caltech101", image_size=40)
    for split in data.SPLITS:
      ds.arrays(split)
  return ds


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_cifar100_info_shapes_and_ranges(cifar):
  info = cifar.info
  assert info.num_classes == 100 and info.image_shape == (32, 32, 3)
  assert info.num_examples == {"train": 200, "validation": 30, "test": 230}
  batch = next(data.make_iterator(cifar, "train", 16, train=True))
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert 0 <= batch["label"].min() and batch["label"].max() < 100


def test_each_mock_reads_its_own_examples():
  # Decoded splits are kept per process, but not those of a mock: another
  # mock of the same data set (a test before this one, say) has other examples.
  for n in (40, 60):
    with tfds.testing.mock_data(num_examples=n):
      ds = data.Dataset("cifar100", validation_size=10)
      read = {split: len(ds.arrays(split)[1]) for split in data.SPLITS}
      assert read == {"train": n - 10, "validation": 10, "test": n}


def test_caltech101_resized_and_per_class_holdout(caltech):
  info = caltech.info
  assert info.num_classes == 102 and info.image_shape == (40, 40, 3)
  _, train_labels = caltech.arrays("train")
  _, val_labels = caltech.arrays("validation")
  counts = np.bincount(val_labels, minlength=102)
  all_counts = np.bincount(np.concatenate([train_labels, val_labels]), minlength=102)
  # 5 per class, keeping at least one training image of each class.
  np.testing.assert_array_equal(counts, np.minimum(5, np.maximum(all_counts - 1, 0)))
  batch = next(data.make_iterator(caltech, "test", 8, train=False))
  assert batch["image"].shape == (8, 40, 40, 3)


def _rows(images):
  return {img.tobytes() for img in images}


@pytest.mark.parametrize("fixture", ["cifar", "caltech"])
def test_validation_disjoint_from_train(fixture, request):
  ds = request.getfixturevalue(fixture)
  train, val = _rows(ds.arrays("train")[0]), _rows(ds.arrays("validation")[0])
  assert val and not train & val


def test_augmentation_only_in_train(cifar):
  images, labels = cifar.arrays("train")
  raw = {img.tobytes(): i for i, img in enumerate(images)}
  batch = next(data.make_iterator(cifar, "train", 32, train=True, augment=False))
  # Without augmentation a batch holds exact training images.
  for img in batch["image"]:
    assert np.round(img * 255).astype(np.uint8).tobytes() in raw
  aug = next(data.make_iterator(cifar, "train", 32, train=True))
  changed = [np.round(img * 255).astype(np.uint8).tobytes() not in raw
             for img in aug["image"]]
  assert sum(changed) > 16  # crops and flips alter most images
  evaluated = next(data.make_iterator(cifar, "validation", 30, train=False))
  np.testing.assert_array_equal(
      np.round(evaluated["image"] * 255).astype(np.uint8),
      cifar.arrays("validation")[0])


def test_same_seed_same_batches_and_other_seed_differs(cifar):
  a = take(data.make_iterator(cifar, "train", 16, train=True, seed=3), 3)
  b = take(data.make_iterator(cifar, "train", 16, train=True, seed=3), 3)
  c = take(data.make_iterator(cifar, "train", 16, train=True, seed=4), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_reshuffle_and_resume_matches_uninterrupted(cifar):
  steps = data.steps_per_epoch(cifar, 32)  # 200 // 32 = 6
  full = take(data.make_iterator(cifar, "train", 32, train=True, seed=1), 2 * steps + 2)
  assert not np.array_equal(full[0]["label"], full[steps]["label"])
  for start in (4, steps, steps + 3):
    resumed = take(data.make_iterator(cifar, "train", 32, train=True, seed=1,
                                      start_step=start), 3)
    for x, y in zip(full[start:start + 3], resumed):
      np.testing.assert_array_equal(x["image"], y["image"])


def test_every_eval_example_seen_once_with_mask(cifar):
  images, labels = cifar.arrays("test")
  batches = list(data.make_iterator(cifar, "test", 64, train=False))
  assert len(batches) == 4  # 230 = 3 * 64 + 38, the last padded
  assert all(b["image"].shape[0] == 64 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  assert mask.sum() == 230 and not mask[230:].any()
  seen = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(seen, labels)


def test_processes_split_each_global_batch(cifar):
  for train in (True, False):
    whole = take(data.make_iterator(cifar, "test" if not train else "train", 32,
                                    train=train, process_index=0, process_count=1), 4)
    parts = [take(data.make_iterator(cifar, "test" if not train else "train", 32,
                                     train=train, process_index=p, process_count=2), 4)
             for p in range(2)]
    for step, batch in enumerate(whole):
      for key in batch:
        np.testing.assert_array_equal(
            batch[key], np.concatenate([parts[0][step][key], parts[1][step][key]]))
  with pytest.raises(ValueError, match="batch size 33 is not divisible .* 2"):
    next(data.make_iterator(cifar, "train", 33, train=True, process_index=0,
                            process_count=2))


def test_normalize_uses_training_statistics(cifar):
  batch = next(data.make_iterator(cifar, "train", 200, train=False, normalize=True))
  # The batch is the whole training split (200 of 230 mock images), so its
  # statistics are the normalisation's up to rounding: the float32 images
  # (relative 2**-24 each) and NumPy's pairwise sums over 2e5 values
  # (~log2(2e5) * 2**-24 ~ 1e-6 of the values' scale, ~1): 1e-4 and 1e-3
  # are 100x and more above that.
  np.testing.assert_allclose(batch["image"].mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(batch["image"].std(axis=(0, 1, 2)), 1.0, atol=1e-3)


class _EveryPixelValue:
  """Five 16x16 RGB images in which every channel holds each uint8 value once."""
  name = "every_pixel_value"

  def __init__(self):
    values = np.arange(256, dtype=np.uint8)
    self.images = np.stack([
        np.stack([np.roll(values, 7 * k + c) for c in range(3)], -1)
        .reshape(16, 16, 3) for k in range(5)])
    self.labels = np.arange(5, dtype=np.int32)

  def arrays(self, split):
    del split
    return self.images, self.labels

  def mean_std(self):
    return batching.channel_mean_std(self.images)


def test_evaluation_batches_equal_the_tensorflow_ops_bit_for_bit():
  """An evaluation pass without augmentation is cut by NumPy; its values are
  what TensorFlow's ops give (the tf.data path's cast, division by 255 and
  normalisation) for every uint8 value in every channel, exactly: the cast
  is exact and each division or subtraction is one IEEE float32 rounding in
  both, so no tolerance is needed on any CPU."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = _EveryPixelValue()
  for normalize in (False, True):
    batches = list(data.make_iterator(ds, "test", 2, train=False,
                                      normalize=normalize, process_index=0,
                                      process_count=1))
    expected = tf.cast(ds.images, tf.float32) / 255.0
    if normalize:
      mean, std = ds.mean_std()
      expected = (expected - mean) / std
    image = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert image.dtype == np.float32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0])  # 5 = 2 + 2 + 1
    np.testing.assert_array_equal(image[:5], expected.numpy())
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches])[:5], ds.labels)


def test_global_batch_sharded_over_data_axis(cifar):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batch = next(data.make_iterator(cifar, "train", 16, train=True))
  arrays = data.to_global_batch(batch, sharding)
  assert arrays["image"].shape == (16, 32, 32, 3)
  assert arrays["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match=r"unknown data set 'mnits'.*'caltech101'"):
    data.get_info("mnits")
  with pytest.raises(ValueError, match="unknown split 'val'"):
    data.Dataset("cifar100").arrays("val")


def test_labels_out_of_range_rejected():
  with pytest.raises(ValueError, match=r"cifar100/train: 2 label\(s\) outside \[0, 100\)"):
    data.check_labels(np.array([0, 5, 100, -1]), 100, "cifar100/train")
  data.check_labels(np.array([0, 99]), 100, "ok")


def test_image_size_only_for_caltech():
  with pytest.raises(ValueError, match="image_size=64 is only supported for caltech101"):
    data.Dataset("cifar100", image_size=64)


# ----------------------------------------------------------- real Fashion-MNIST


def test_fashion_mnist_real_files(fashion_data_dir):
  ds = data.Dataset("fashion_mnist", data_dir=fashion_data_dir)
  info = ds.info
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
  assert info.num_examples["train"] + info.num_examples["validation"] == 60_000
  assert info.num_examples["test"] == 10_000
  _, test_labels = ds.arrays("test")
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
  batch = next(data.make_iterator(ds, "train", 128, train=True))
  assert batch["image"].shape == (128, 28, 28, 1)


def test_fashion_mnist_idx_reader_rejects_corrupt_files(tmp_path):
  bad = tmp_path / "bad-idx1-ubyte"
  bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist.read_idx(bad)
  bad.write_bytes(b"garbage!")
  with pytest.raises(ValueError, match="not an idx"):
    fashion_mnist.read_idx(bad)


def test_fashion_mnist_missing_files_say_how_to_get_them(monkeypatch, tmp_path):
  monkeypatch.setattr(fashion_mnist, "candidate_dirs", lambda: [tmp_path])
  with pytest.raises(FileNotFoundError, match="make data"):
    fashion_mnist.find_files()


def test_synthetic_batch_is_what_the_iterator_yields():
  dataset = SyntheticDataset(num_classes=10, image_shape=(8, 8, 3), num_examples=16)
  batch = dataset.batch(8)
  first = next(data.make_iterator(dataset, "validation", 8, train=False,
                                  process_index=0, process_count=1))
  assert set(batch) == set(first)
  for key in first:
    assert batch[key].dtype == first[key].dtype, key
    np.testing.assert_array_equal(batch[key], first[key], err_msg=key)


def test_split_sizes_without_decoding_images(fashion_data_dir, monkeypatch):
  """get_info answers from the builder's split sizes (and the hold-out's
  count); sizes equal those of the arrays themselves."""
  ds = data.Dataset("fashion_mnist", data_dir=fashion_data_dir)
  monkeypatch.setattr(data.pipeline.Dataset, "_decode",
                      lambda *a: pytest.fail("decoded images for a size"))
  info = data.get_info("fashion_mnist", data_dir=fashion_data_dir)
  assert info.num_examples == {"train": 55000, "validation": 5000, "test": 10000}
  monkeypatch.undo()
  assert [len(ds.arrays(s)[1]) for s in ("train", "validation", "test")] == [
      55000, 5000, 10000]


def test_batched_read_equals_tfds_own_read(fashion_data_dir, tmp_path):
  """A split parsed a batch at a time gives TFDS's own per-example read,
  value for value and in order: raw uint8 Tensor features (the Debian
  Fashion-MNIST) and PNG-encoded Image features (TFDS's DummyMnist), whole
  splits and slices. Two files (``train+test``) are left to TFDS."""
  fashion = tfds_access.open_builder(tfds_access.spec_for("fashion_mnist", ""),
                                     fashion_data_dir)
  dummy = tfds.testing.DummyMnist(data_dir=str(tmp_path))
  dummy.download_and_prepare()
  keys = ("image", "label")
  for builder, split in [(fashion, "train[:3000]"), (fashion, "test[9000:]"),
                         (dummy, "train"), (dummy, "test[3:17]")]:
    batches = tfds_access.batched_examples(builder, split, keys, batch_size=512)
    got = list(batches.as_numpy_iterator())
    expected = next(builder.as_dataset(split=split, shuffle_files=False)
                    .batch(10**6).as_numpy_iterator())
    for key in keys:
      value = np.concatenate([b[key] for b in got])
      assert value.dtype == expected[key].dtype, (split, key)
      np.testing.assert_array_equal(value, expected[key], err_msg=f"{split} {key}")
  assert tfds_access.batched_examples(dummy, "train+test", keys) is None


def test_runs_preparing_one_folder_at_once_prepare_it_once(tmp_path,
                                                          monkeypatch):
  """Two runs that find a data set unprepared at the same moment (a
  sharded verdict's shards on a fresh machine): one prepares it, the other
  waits and reads what it wrote. Without the lock both prepare and the
  second's rename onto the first's folder fails; each preparation here
  first sleeps 0.5 s so that both threads are past the first check. Each
  run has a temporary folder of its own (as SLURM jobs on one node may):
  the lock is the data folder's, not the temporary folder's."""
  calls, errors = [], []
  data_dir = tmp_path / "data"
  temp_of = {}  # a run's thread name -> its temporary folder
  monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temp_of.get(
      threading.current_thread().name, tmp_path)))

  def builder():
    b = tfds.testing.DummyMnist(data_dir=str(data_dir))
    b.READS_LOCAL_FILES = True  # prepare needs no network for it
    real = b.download_and_prepare

    def slow(**kwargs):
      calls.append(1)
      time.sleep(0.5)
      real(**kwargs)
    b.download_and_prepare = slow
    return b

  def prepare(b):
    try:
      tfds_prepare.prepare(b, "dummy_mnist", download=False)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  builders = [builder(), builder()]
  threads = [threading.Thread(target=prepare, args=(b,), name=f"run{i}")
             for i, b in enumerate(builders)]
  for t in threads:
    temp_of[t.name] = tmp_path / t.name
    temp_of[t.name].mkdir()
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(calls) == 1, (errors, calls)
  for b in builders:  # the one that waited knows the splits the other wrote
    assert b.info.splits["train"].num_examples == 20


def test_native_stderr_filter_drops_only_the_named_lines(capfd):
  """What native code writes to file descriptor 2 while TensorFlow loads is
  passed on without its known notes (tfds_access._TF_LOADING_NOISE): any
  other line, an error's included, still reaches the console."""
  import os  # pylint: disable=g-import-not-at-top
  with tfds_access.native_stderr_without(("oneDNN custom operations are on",)):
    os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n"
                b"E0000 something went wrong\n")
  assert capfd.readouterr().err == "E0000 something went wrong\n"
  with tfds_access.native_stderr_without(()):  # nothing named: untouched
    os.write(2, b"oneDNN custom operations are on\n")
  assert capfd.readouterr().err == "oneDNN custom operations are on\n"
  saved = os.dup(2)
  os.close(2)  # a process whose stderr is closed still loads TensorFlow
  try:
    with tfds_access.native_stderr_without(("oneDNN",)):
      pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
