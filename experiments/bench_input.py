r"""Input pipelines: in memory vs streamed, images/s and peak RSS, beside the
rate at which the ResNet-18 train step consumes images.

  python experiments/bench_input.py [--records=10000,1000000] [--batches=200] \
      [--out=experiments/results/cpu/bench_input.json]

Each pipeline runs in its own process (so that its peak RSS is its own):
Fashion-MNIST read into memory; the same data streamed from an ArrayRecord
copy (prepared once in --array_record_dir); synthetic 32x32x3 data sets of
each --records size streamed (prepared once in --synthetic_dir: about 3 KB a
record on disk). All yield augmented training batches of --batch_size; the
first 10 batches are not timed. Then the app's train step (full-width
ResNet-18 on 32x32x3 batches, and the default Fashion-MNIST run's 1/8-width
ResNet-18 on 28x28x1) is timed on synthetic batches in this process.
"""

import json
import os
from pathlib import Path
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CACHE = Path.home() / ".cache" / "discrim_jax"
_RECORDS = flags.DEFINE_list("records", ["10000", "1000000"],
                             "Sizes of the streamed synthetic data sets.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed after 10 warm-up ones.")
_ARRAY_RECORD_DIR = flags.DEFINE_string(
    "array_record_dir", str(_CACHE / "tfds_array_record"),
    "TFDS data folder for the ArrayRecord copy of Fashion-MNIST.")
_SYNTHETIC_DIR = flags.DEFINE_string(
    "synthetic_dir", str(_CACHE / "synthetic_records"),
    "Folder for the synthetic ArrayRecord data sets (one sub-folder a size).")
_STEP_STEPS = flags.DEFINE_integer("step_steps", 10, "Train steps timed per model.")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
_WORKER = flags.DEFINE_string("worker", None, "(internal) run one pipeline.")


def _dataset(kind: str):
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  from discrim_jax.data import streaming, synthetic_records  # pylint: disable=g-import-not-at-top
  if kind == "memory":
    return data.Dataset("fashion_mnist")
  if kind == "stream":
    return streaming.StreamingDataset("fashion_mnist",
                                      data_dir=_ARRAY_RECORD_DIR.value)
  n = int(kind.split(":")[1])
  folder = str(Path(_SYNTHETIC_DIR.value) / str(n))
  if kind.startswith("prepare:"):
    synthetic_records.SyntheticRecords(num_records=n, data_dir=folder
                                       ).download_and_prepare(file_format="array_record")
    return None
  return streaming.StreamingDataset(
      "synthetic_records", builder=synthetic_records.SyntheticRecords(
          num_records=n, data_dir=folder))


def _worker(kind: str) -> None:
  """Times one pipeline; prints one JSON line."""
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  dataset = _dataset(kind)
  if dataset is None:  # prepared only
    print(json.dumps({"prepare_s": time.perf_counter() - start}))
    return
  if kind == "memory":
    dataset.arrays("train")  # read into memory (not timed below)
  setup = time.perf_counter() - start
  it = data.make_iterator(dataset, "train", _BATCH.value, train=True, seed=0,
                          process_index=0, process_count=1)
  for _ in range(10):
    next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  rate = _BATCHES.value * _BATCH.value / (time.perf_counter() - start)
  print(json.dumps({
      "images_per_s": rate, "setup_s": setup,
      "train_examples": dataset.num_examples("train"),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _run_worker(kind: str) -> dict:
  argv = [sys.executable, __file__, f"--worker={kind}",
          f"--batch_size={_BATCH.value}", f"--batches={_BATCHES.value}",
          f"--array_record_dir={_ARRAY_RECORD_DIR.value}",
          f"--synthetic_dir={_SYNTHETIC_DIR.value}"]
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  result = subprocess.run(argv, capture_output=True, text=True, env=env)
  if result.returncode:
    tail = [l for l in result.stderr.splitlines() if l.strip()][-1:]
    return {"error": tail[0][:300] if tail else f"exit {result.returncode}"}
  return json.loads(result.stdout.strip().splitlines()[-1])


def _train_step_rates() -> dict:
  """Images/s of the app's train step (CE+Gini+KL) on synthetic batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from discrim_jax import benchmarking  # pylint: disable=g-import-not-at-top
  from discrim_jax.data.synthetic import SyntheticDataset  # pylint: disable=g-import-not-at-top
  from discrim_jax import data, runtime  # pylint: disable=g-import-not-at-top
  rates = {}
  for name, width, shape, batch in (
      ("resnet18 full width, 32x32x3, batch 128", 1.0, (32, 32, 3), 128),
      ("resnet18 width 1/8, 28x28x1, batch 256 (make run)", 0.125, (28, 28, 1), 256)):
    config = benchmarking.app_config("resnet18", batch, "float32", True)
    config.model_kwargs.width_multiplier = width
    config.loss.layers = ("stage4",)
    program = runtime.build_from_config(config, dataset=SyntheticDataset(
        num_classes=100, image_shape=shape, num_examples=batch))
    batch_arrays = data.to_global_batch(
        program.dataset.batch(batch), program.batch_sharding)
    state = program.init_state(0)
    for _ in range(2):  # compile and warm up
      state, metrics = program.train_step(state, batch_arrays)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEP_STEPS.value):
      state, metrics = program.train_step(state, batch_arrays)
    jax.block_until_ready(metrics)
    rates[name] = _STEP_STEPS.value * batch / (time.perf_counter() - start)
  return rates


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  from discrim_jax import benchmarking  # pylint: disable=g-import-not-at-top
  # Preparing (once, cached) is not part of what is measured.
  prepared = {}
  if not Path(_ARRAY_RECORD_DIR.value).exists():
    print("preparing the ArrayRecord copy of Fashion-MNIST (once)...", flush=True)
    prepared["fashion_mnist"] = _run_worker("stream")
  for n in _RECORDS.value:
    if not (Path(_SYNTHETIC_DIR.value) / n).exists():
      print(f"preparing {int(n):,} synthetic records (once)...", flush=True)
      prepared[n] = _run_worker(f"prepare:{n}")
  rows = {"Fashion-MNIST in memory": _run_worker("memory"),
          "Fashion-MNIST streamed (ArrayRecord, grain)": _run_worker("stream")}
  for n in _RECORDS.value:
    rows[f"synthetic 32x32x3, {int(n):,} records, streamed"] = _run_worker(
        f"synthetic:{n}")
  steps_rates = _train_step_rates()
  slowest = min(steps_rates.values())
  print(f"| pipeline (batch {_BATCH.value}) | images/s | peak RSS (MB) | "
        "x the full-width ResNet-18 step |")
  print("|---|---|---|---|")
  full = steps_rates["resnet18 full width, 32x32x3, batch 128"]
  for name, row in rows.items():
    if "error" in row:
      print(f"| {name} | not measured: {row['error']} | | |")
      continue
    print(f"| {name} | {row['images_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} "
          f"| {row['images_per_s'] / full:.1f}x |")
  print()
  print("| train step (CE+Gini+KL, float32) | images/s |")
  print("|---|---|")
  for name, rate in steps_rates.items():
    print(f"| {name} | {rate:,.1f} |")
  results = {"machine": benchmarking.cpu_model(), "cpus": benchmarking.cpus(),
             "batch_size": _BATCH.value, "batches": _BATCHES.value,
             "pipelines": rows, "train_step_images_per_s": steps_rates,
             "slowest_step_images_per_s": slowest, "prepared": prepared}
  benchmarking.write(results, _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
