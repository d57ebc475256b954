r"""Input at 224 px: the streaming path against a tf.data reference, per core.

  python experiments/bench_input224.py [--records=2000] [--cores=1,2] \
      [--rounds=3] [--out=experiments/results/cpu/bench_input224.json]

Both read the same JPEG records (``synthetic_records.JpegRecords``: real
Fashion-MNIST images upscaled to about 350x400, tinted, with grain; ~115 KB a
record) and do the ImageNet training augmentation to 224x224x3 float32
batches: random-resized crop (area 8-100%, aspect 3/4-4/3), flip, scale to
[0, 1].

* **stream**: the app's streaming path (``config.data_in_memory=False``):
  grain over ArrayRecord reading each batch's records raw (in the order
  of the in-memory path, resumable at any step), then a tf.data stage
  parsing, cropping (only each crop's window decoded), resizing and
  flipping them on the cores' threads (``streaming.jpeg_batches``).
* **tf.data**: what big_vision does, over TFRecord: ``decode_and_crop_jpeg``
  of a ``sample_distorted_bounding_box`` window, resize, flip; parallel map
  with AUTOTUNE, batch, prefetch.

Each measurement is its own process pinned to the first N cores
(``os.sched_setaffinity``; tf.data's thread pool and the stream's threads
sized to N), alternating pipelines and core counts round by round; each
prints images/s over ``--batches`` batches after 3 untimed ones. The
summary gives images/s per core, median and min-max over rounds, the
ratio stream / tf.data per round, whether streaming is at least as fast
("met" only if every round says so; "inconclusive" when rounds disagree),
and how much each process's peak RSS grew over the timed batches.
"""

import json
import os
from pathlib import Path
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CACHE = Path.home() / ".cache" / "discrim_jax" / "jpeg_records"
_RECORDS = flags.DEFINE_integer("records", 2000, "Training records prepared.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Batches timed per measurement.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each pipeline, each core count).")
_CORES = flags.DEFINE_list("cores", ["1", "2"], "Core counts measured.")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
_WORKER = flags.DEFINE_string("worker", None, "(internal) stream|tfdata:CORES")

SIZE = 224


def _builder(file_format: str):
  from discrim_jax.data import synthetic_records  # pylint: disable=g-import-not-at-top
  folder = _CACHE / file_format / str(_RECORDS.value)
  builder = synthetic_records.JpegRecords(num_records=_RECORDS.value,
                                          data_dir=str(folder))
  builder.download_and_prepare(file_format=file_format)
  return builder


def _stream(cores: int):
  from discrim_jax.data import streaming  # pylint: disable=g-import-not-at-top
  ds = streaming.StreamingDataset("jpeg_records",
                                  builder=_builder("array_record"),
                                  image_size=SIZE)
  return streaming.iterate(
      ds, "train", _BATCH.value, train=True, seed=0, start_step=0, augment=True,
      normalize=False, crop_padding=4, process_index=0, process_count=1,
      num_threads=cores)


def _tfdata(cores: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = _builder("tfrecord").as_dataset(
      split="train", shuffle_files=True,
      decoders={"image": tfds.decode.SkipDecoding()})

  def augment(example):
    data = example["image"]
    shape = tf.image.extract_jpeg_shape(data)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize(image, (SIZE, SIZE), method="bilinear")
    image = tf.image.random_flip_left_right(image) / 255.0
    return {"image": image, "label": example["label"]}

  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  ds = (ds.repeat().shuffle(1000, seed=0).map(augment,
                                              num_parallel_calls=tf.data.AUTOTUNE)
        .batch(_BATCH.value, drop_remainder=True).prefetch(2)
        .with_options(options))
  return tfds.as_numpy(ds)


def _worker(spec: str) -> None:
  kind, cores = spec.split(":")
  cores = int(cores)
  os.sched_setaffinity(0, set(range(cores)))
  it = iter(_stream(cores) if kind == "stream" else _tfdata(cores))
  for _ in range(3):
    batch = next(it)
  assert batch["image"].shape == (_BATCH.value, SIZE, SIZE, 3), batch["image"].shape
  peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pylint: disable=unnecessary-lambda-assignment
  warm = peak()
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  rate = _BATCHES.value * _BATCH.value / (time.perf_counter() - start)
  print(json.dumps({"kind": kind, "cores": cores, "images_per_s": rate,
                    "peak_rss_mib": [warm, peak()]}))


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  print(f"preparing {_RECORDS.value} JPEG records (once) in {_CACHE}", flush=True)
  _builder("array_record")
  _builder("tfrecord")
  cores = [int(c) for c in _CORES.value]
  if max(cores) > len(os.sched_getaffinity(0)):
    raise app.UsageError(f"--cores={max(cores)} but this process may use "
                         f"{len(os.sched_getaffinity(0))}")
  rates = {(k, c): [] for k in ("stream", "tfdata") for c in cores}
  memory = {key: [] for key in rates}  # peak RSS after warm-up and at the end
  for r in range(_ROUNDS.value):
    for c in cores:
      for kind in ("stream", "tfdata"):
        out = subprocess.run(
            [sys.executable, __file__, f"--worker={kind}:{c}",
             f"--records={_RECORDS.value}", f"--batch_size={_BATCH.value}",
             f"--batches={_BATCHES.value}"],
            capture_output=True, text=True, check=False)
        if out.returncode:
          raise RuntimeError(f"{kind} on {c} cores failed:\n{out.stderr[-3000:]}")
        line = json.loads(out.stdout.strip().splitlines()[-1])
        rate = line["images_per_s"]
        rates[(kind, c)].append(rate)
        memory[(kind, c)].append(line["peak_rss_mib"])
        print(f"round {r}: {kind} on {c} core(s): {rate:.0f} img/s", flush=True)
  from discrim_jax import benchmarking  # pylint: disable=g-import-not-at-top
  summary = {"cpu": benchmarking.cpu_model(), "records": _RECORDS.value,
             "batch_size": _BATCH.value, "batches": _BATCHES.value,
             "rounds": _ROUNDS.value, "results": {}}
  for c in cores:
    ratio = [s / t for s, t in zip(rates[("stream", c)], rates[("tfdata", c)])]
    figure = benchmarking.round_ratios(rates[("stream", c)], rates[("tfdata", c)])
    # The target: streaming at least as fast per core as tf.data.
    target = benchmarking.verdict(figure, 1.0)
    summary["results"][f"{c}_cores"] = {
        **{f"{k}_images_per_s_per_core": [v / c for v in rates[(k, c)]]
           for k in ("stream", "tfdata")},
        "stream_over_tfdata": ratio, "at_least_tfdata": target,
        **{f"{k}_peak_rss_mib": memory[(k, c)] for k in ("stream", "tfdata")}}
    line = {k: statistics.median(rates[(k, c)]) / c for k in ("stream", "tfdata")}
    print(f"{c} core(s): stream {line['stream']:.0f}, tf.data "
          f"{line['tfdata']:.0f} img/s per core; stream/tf.data "
          f"{benchmarking.describe(figure)}; at least tf.data: {target}")
    grew = max(end - warm for warm, end in memory[("stream", c)])
    print(f"{c} core(s): streaming's peak RSS grew by at most {grew:.0f} MiB "
          f"over the {_BATCHES.value} timed batches (after warm-up: "
          f"{max(w for w, _ in memory[('stream', c)]):.0f} MiB)")
  if _OUT.value:
    Path(_OUT.value).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
