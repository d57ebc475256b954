r"""Training-pipeline throughput (images/s) per data set, host side only.

  python experiments/bench_input.py [--datasets=fashion_mnist,cifar100] \
      [--batch_size=256] [--steps=200]

Reading the split into memory is not timed; the figure is the rate at which
augmented training batches come out of tf.data. A data set that is not
available here (no internet for CIFAR-100/Caltech-101) is reported as such.
"""

import json
import os
import time

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_DATASETS = flags.DEFINE_list("datasets", ["fashion_mnist", "cifar100", "caltech101"],
                              "Data sets to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Batches timed after 10 warm-up batches.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder.")


def measure(name: str, batch_size: int, steps: int, data_dir=None) -> float:
  """Images/s of the augmented training iterator, after a warm-up."""
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  dataset = data.Dataset(name, data_dir=data_dir)
  dataset.arrays("train")
  it = data.make_iterator(dataset, "train", batch_size, train=True)
  for _ in range(10):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  rows = {}
  for name in _DATASETS.value:
    try:
      rows[name] = measure(name, _BATCH.value, _STEPS.value, _DATA_DIR.value)
    except Exception as e:  # pylint: disable=broad-except
      rows[name] = f"not available here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
  print(f"| data set | training pipeline, images/s (batch {_BATCH.value}) |")
  print("|---|---|")
  for name, value in rows.items():
    print(f"| {name} | {value if isinstance(value, str) else f'{value:,.0f}'} |")
  print(json.dumps({"batch_size": _BATCH.value, "images_per_s": rows}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
