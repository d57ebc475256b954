"""Streaming input for data sets larger than host memory (grain over ArrayRecord).

``config.data_in_memory = False`` reads a TFDS data set record by record from
its prepared ArrayRecord files (``tfds`` ``as_data_source``, TFDS's current
path for JAX) with grain, instead of reading whole splits into memory.

Why grain over ArrayRecord rather than tf.data over per-process TFRecord
shards: ArrayRecord gives random access by record index, so each process
reads exactly its own rows of every global batch in an order that is a pure
function of ``(seed, epoch)`` (the same permutation as the in-memory path:
the same seed gives the same batches), and a resumed run starts at any step
without replaying the epoch: the step number, saved with every checkpoint,
is the iterator's whole state. Sharded TFRecord files give neither.

Memory: records are read and decoded on the fly by ``num_threads`` threads,
each making whole batches, into a prefetch buffer of ``max(prefetch,
num_threads)`` batches (JPEG training records: raw records, read by
``max(1, prefetch)`` threads, then a tf.data stage holding the crops in
flight on ``num_threads`` threads and one finished batch); what grows with
the data set is only the train split's index (8 bytes a record) and one
epoch's permutation of it.

Augmentation: images of at most 64 pixels get the in-memory path's CIFAR
recipe (4-pixel pad-and-crop and flip, drawn per global batch from
``(seed, step)`` with TensorFlow's stateless ops); larger ones the
ImageNet recipe (:mod:`discrim_jax.data.inception_crop`), random-resized
crop (scale 0.08-1, ratio 3/4-4/3) and flip,
drawn per example from ``(seed, place in the global stream)``, so that
every host draws its own rows' crops; JPEG records get it from a tf.data
stage after grain's read, decoding only each crop's window
(:func:`jpeg_batches`). Evaluation resizes the shorter side and
centre-crops.

TFDS prepares a data set in one file format per folder: a data set already
prepared as TFRecord in ``data_dir`` must be prepared again as ArrayRecord
in another folder (the error says how).
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
import io
import threading
from typing import Any

import numpy as np

from discrim_jax.data import folder as folder_lib
from discrim_jax.data import batching
from discrim_jax.data import inception_crop
from discrim_jax.data import tfds_access as access
from discrim_jax.data import tfds_prepare

ARRAY_RECORD = "array_record"
CIFAR_MAX_SIZE = 64  # up to this image side: the CIFAR recipe, else ImageNet's
MEAN_STD_SAMPLE = 10_000  # training images that normalize's statistics use


class StreamingDataset:
  """A TFDS data set read from its ArrayRecord files on demand.

  Takes :class:`discrim_jax.data.Dataset`'s arguments, except per-class
  hold-outs (those need every label: use a count or a fraction); ``builder``
  is a TFDS builder made already (one that ``tfds.builder`` cannot name).
  """

  streaming = True

  def __init__(self, name: str, *, data_dir: str | None = None,
               image_size: int | None = None, validation_seed: int = 0,
               holdout: str = "", splits: dict[str, str] | None = None,
               download: bool = True,
               max_examples: dict[str, int] | None = None,
               builder: Any = None, train_per_class: int = 0,
               train_subset_seed: int | None = None):
    del train_subset_seed  # only with train_per_class, refused below
    if train_per_class:
      raise ValueError(f"{name}: train_per_class needs every label in memory; "
                       "leave config.data_in_memory=True")
    if name.startswith(folder_lib.PREFIX):
      raise ValueError(f"{name}: an image folder is read into memory; "
                       "leave config.data_in_memory=True")
    self.name = name
    self._spec = access.spec_for(name, holdout)
    if self._spec.holdout_per_class:
      raise ValueError(
          f"{name}: a per-class validation hold-out needs every label in "
          "memory; stream with a count or a fraction "
          "(--config.validation_holdout=5000 or 0.1)")
    self._builder = builder or access.open_builder(self._spec, data_dir)
    self._image_key, self._label_key = access.feature_keys(self._builder, name)
    label = self._builder.info.features[self._label_key]
    self.num_classes = int(label.num_classes)
    self.class_names = list(label.names)
    shape = tuple(self._builder.info.features[self._image_key].shape)
    self._resize = None in shape[:2] or shape[0] != shape[1] or bool(
        image_size and image_size != shape[0])
    size = (image_size or access.DEFAULT_IMAGE_SIZE) if self._resize else shape[0]
    self.image_shape = (size, size, shape[-1] or 3)
    tfds_prepare.prepare(self._builder, name, download=download,
                     file_format=ARRAY_RECORD)
    formats = [str(self._builder.info.file_format.value)] + [
        str(f.value) for f in self._builder.info.alternative_file_formats]
    if ARRAY_RECORD not in formats:
      raise ValueError(
          f"{name} is prepared in {self._builder.data_dir} as {formats[0]}, and "
          "streaming reads ArrayRecord: prepare it in another folder with "
          f"`tfds build {name} --file_format=array_record --data_dir=DIR` "
          "and pass --config.data_dir=DIR (or leave config.data_in_memory=True)")
    # JPEG records stay encoded until used: training decodes only each
    # crop's window (jpeg_batches).
    feature = self._builder.info.features[self._image_key]
    self._jpeg = getattr(feature, "encoding_format", None) == "jpeg"
    self._parse_batch = None  # parse_batch's parser, made on first use
    decoders = ({self._image_key: access.tf_modules()[1].decode.SkipDecoding()}
                if self._jpeg else None)
    self._source, self._index = self._open_splits(
        splits, decoders, validation_seed, max_examples)
    self._lock = threading.Lock()

  def _open_splits(self, splits, decoders, validation_seed, max_examples):
    """Each split's data source (validation held out of train shares
    train's) and the record indices it reads, in order."""
    plan = access.split_plan(list(self._builder.info.splits), self._spec,
                             {k: v for k, v in (splits or {}).items() if v},
                             self.name)
    opened: dict[str, Any] = {}
    source: dict[str, Any] = {}
    for split in access.SPLITS:
      tfds_split = plan[split] if plan[split] is not None else plan["train"]
      if tfds_split not in opened:
        opened[tfds_split] = self._builder.as_data_source(
            split=tfds_split, file_format=ARRAY_RECORD, decoders=decoders)
      source[split] = opened[tfds_split]
    held_out = None
    if plan["validation"] is None:
      n = len(source["train"])
      # The hold-out of the in-memory path; a count or fraction needs no labels.
      held_out = access.holdout_mask(np.zeros(n, np.int32), self._spec,
                                     self.num_classes, validation_seed, self.name)
    index_of: dict[str, np.ndarray] = {}
    for split in access.SPLITS:
      if held_out is not None and split != "test":
        index = np.flatnonzero(held_out if split == "validation" else ~held_out)
      else:
        index = np.arange(len(source[split]))
      limit = (max_examples or {}).get(split, 0)
      index_of[split] = index[:limit] if limit else index
    return source, index_of

  def num_examples(self, split: str) -> int:
    return len(self._index[split])

  def index_bytes(self) -> int:
    """Host memory of the record indices (8 bytes per record; all the
    reader keeps per record)."""
    return sum(v.nbytes for v in self._index.values())

  def arrays(self, split: str):
    raise TypeError(f"{self.name} streams (config.data_in_memory=False): its "
                    f"{split} split is not held in memory")

  def record(self, split: str, position: int) -> tuple[np.ndarray, int]:
    """The ``position``-th example of a split: (uint8 image, label)."""
    example = self._source[split][int(self._index[split][position])]
    image = example[self._image_key]
    if self._jpeg:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(io.BytesIO(image)) as pil:
        image = pil.convert("RGB" if self.image_shape[-1] == 3 else "L")
    return np.asarray(image), int(example[self._label_key])

  @property
  def jpeg(self) -> bool:
    """Whether the records are JPEG-encoded: training crops then come from
    ``inception_crop.jpeg_crop``, which decodes only each crop's window."""
    return self._jpeg

  def serialized(self, split: str, positions) -> list[bytes]:
    """Records of a split as stored (serialized examples), for :meth:`parse`
    in a TensorFlow graph. One read each: array_record's batched read
    costs twice as much a record here (its thread pool)."""
    source = self._source[split].data_source
    return [source[i] for i in self._index[split][np.asarray(positions)].tolist()]

  def parse_batch(self, serialized):
    """In a TensorFlow graph: serialized records -> (encoded images, labels),
    the batch in one op."""
    if self._parse_batch is None:
      self._parse_batch = access.serialized_batch_parser(
          self._builder, (self._image_key, self._label_key))
      if self._parse_batch is None:
        raise ValueError(f"{self.name}: the image or label feature has no fixed "
                         "serialized shape; stream it with images of at most "
                         f"{CIFAR_MAX_SIZE} px or in memory")
    parsed = self._parse_batch(serialized)
    return parsed[self._image_key], parsed[self._label_key]

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the first 10,000 training images (after
    resizing), in [0, 1] units."""
    n = min(MEAN_STD_SAMPLE, self.num_examples("train"))
    return batching.channel_mean_std(np.stack(
        [_fit(self.record("train", i)[0], self.image_shape) for i in range(n)]))


def _fit(image: np.ndarray, shape) -> np.ndarray:
  """Shorter side resized to the target and centre-cropped (evaluation)."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape != tuple(shape):
    image = folder_lib.resize_and_crop(image, shape[0])
  return image.reshape(shape)


def jpeg_batches(dataset: StreamingDataset, shape, read: Iterator[dict],
                 batch: int, num_threads: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ``read``'s records (``{"records", "keys", "mask"}``, ``batch``
  of each) in a tf.data pipeline: each batch parsed in one op, then every
  record cropped by :func:`inception_crop.jpeg_crop` on ``num_threads`` threads across
  batch boundaries (no batch waits for its slowest record), in ``read``'s
  order."""
  tf = access.tf_modules()[0]
  crop = inception_crop.jpeg_crop(shape)
  parse = dataset.parse_batch
  spec = {"records": tf.TensorSpec([batch], tf.string),
          "keys": tf.TensorSpec([batch, 2], tf.int64),
          "mask": tf.TensorSpec([batch], tf.float32)}

  def parsed(example):
    jpegs, labels = parse(example["records"])
    return {"jpeg": jpegs, "label": tf.cast(labels, tf.int32),
            "key": example["keys"], "mask": example["mask"]}

  def cropped(example):
    return {"image": crop(example["jpeg"], example["key"]),
            "label": example["label"], "mask": example["mask"]}

  options = tf.data.Options()
  options.threading.private_threadpool_size = num_threads
  pipeline = (tf.data.Dataset.from_generator(lambda: read, output_signature=spec)
              .map(parsed).unbatch()
              .map(cropped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(batch).prefetch(1).with_options(options))
  return pipeline.as_numpy_iterator()


def _locator(dataset: StreamingDataset, split: str, batch_size: int,
             rows: slice, train: bool, seed: int, start_step: int):
  """``(locate, first, length)``: ``locate(position)`` is the ``(example,
  mask)`` this process reads at its ``position``-th place in its stream,
  in the in-memory path's order; the stream runs over ``[first, first +
  length)`` (training: from ``start_step``, endless)."""
  local = rows.stop - rows.start
  n = dataset.num_examples(split)
  if train:
    num_steps = batching.num_train_steps(n, batch_size, f"{dataset.name}/{split}")

    @functools.lru_cache(maxsize=2)
    def order(epoch):  # the in-memory path's permutation of the split
      return batching.epoch_order(n, seed, epoch)

    def locate(position):
      step, j = divmod(position, local)
      epoch, k = divmod(step, num_steps)
      with dataset._lock:  # pylint: disable=protected-access
        perm = order(epoch)
      return int(perm[k * batch_size + rows.start + j]), 1.0
    return locate, start_step * local, 2**62  # endless; grain's range is lazy
  num_batches = -(-n // batch_size)

  def locate(position):  # pylint: disable=function-redefined
    step, j = divmod(position, local)
    i = step * batch_size + rows.start + j
    return (i, 1.0) if i < n else (0, 0.0)  # padding: example 0, masked
  return locate, 0, num_batches * local


def iterate(dataset: StreamingDataset, split: str, batch_size: int, *,
            train: bool, seed: int, start_step: int, augment: bool,
            normalize: bool, crop_padding: int, process_index: int,
            process_count: int, num_threads: int = 16,
            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """:func:`discrim_jax.data.make_iterator` for a streamed data set: the same
  batches (order, padding, mask; for small images the same augmentation) as
  the in-memory path gives for the same seed and step."""
  import grain  # pylint: disable=g-import-not-at-top
  rows = batching.process_rows(batch_size, process_index, process_count)
  local = rows.stop - rows.start
  shape = dataset.image_shape
  small = shape[0] <= CIFAR_MAX_SIZE
  per_example_augment = augment and not small
  locate, first, length = _locator(dataset, split, batch_size, rows, train,
                                   seed, start_step)

  def slot(position):  # the example's place in the global stream, the same
    step, j = divmod(position, local)  # on every host: its augmentation key
    return step * batch_size + rows.start + j

  def load(position):
    i, mask = locate(position)
    image, label = dataset.record(split, i)
    if per_example_augment:
      image = inception_crop.random_resized_crop(image, shape,
                                  np.random.default_rng([seed, slot(position), 1]))
    else:
      image = _fit(image, shape)
    return {"image": image, "label": np.int32(label), "mask": np.float32(mask)}

  jpeg = per_example_augment and getattr(dataset, "jpeg", False)
  if jpeg:
    # JPEG training records: grain reads each batch's records raw; a
    # tf.data pipeline crops them (jpeg_batches).
    def read_batch(step):
      positions = np.arange(step * local, (step + 1) * local)
      located = [locate(p) for p in positions]
      return {"records": np.array(dataset.serialized(
                  split, [i for i, _ in located]), dtype=object),
              "keys": np.stack([np.full(local, seed), slot(positions)], 1),
              "mask": np.array([m for _, m in located], np.float32)}
    ds = grain.MapDataset.range(first // local, (first + length) // local
                                ).map(read_batch)
    read_threads = max(1, prefetch)
  else:
    ds = (grain.MapDataset.range(first, first + length).map(load)
          .batch(local, drop_remainder=False))
    read_threads = num_threads
  # Each thread makes a whole batch; the buffer is counted in batches.
  it = iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=max(prefetch, read_threads))))
  if jpeg:
    it = jpeg_batches(dataset, shape, it, local, num_threads)
  yield from _finished_batches(dataset, it, shape, rows, batch_size,
                               augment=augment and small, normalize=normalize,
                               crop_padding=crop_padding, seed=seed,
                               step=start_step if train else 0)


def _finished_batches(dataset, it, shape, rows, batch_size, *, augment: bool,
                      normalize: bool, crop_padding: int, seed: int, step: int):
  """The read batches as the step takes them: floats in [0, 1], small
  images augmented as the in-memory path does (``augment``), normalised."""
  mean = std = None
  if normalize:
    mean, std = dataset.mean_std()
  crop = None
  if augment:
    tf = access.tf_modules()[0]
    # The in-memory path's augmentation, as one graph traced once (in eager
    # mode TensorFlow's memory grew by ~2 MB a batch).
    crop = tf.function(
        lambda image, key: batching.augment(
            image, key, crop_padding, rows, batch_size),
        input_signature=[tf.TensorSpec((None,) + tuple(shape), tf.float32),
                         tf.TensorSpec((2,), tf.int64)])
  for batch in it:
    image = batch["image"]
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / 255.0
    if crop is not None:
      image = crop(image, np.array([seed, step], np.int64)).numpy()
    if normalize:
      image = (image - mean) / std
    yield {"image": image, "label": batch["label"].astype(np.int32),
           "mask": batch["mask"].astype(np.float32)}
    step += 1
