r"""Training-pipeline throughput (images/s) per data set, host side only.

  python experiments/bench_input.py [--datasets=fashion_mnist,cifar100] \
      [--batch_size=256] [--steps=200]

Reading the split into memory is not timed; the figure is the rate at which
augmented training batches come out of tf.data. A data set that is not
available here (no internet for CIFAR-100/Caltech-101) is reported as such.
"""

import json
import os

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_DATASETS = flags.DEFINE_list("datasets", ["fashion_mnist", "cifar100", "caltech101"],
                              "Data sets to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Batches timed after 10 warm-up batches.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder.")


def main(argv):
  del argv
  from discrim_jax.data import measure_throughput  # pylint: disable=g-import-not-at-top
  rows = {}
  for name in _DATASETS.value:
    try:
      rows[name] = measure_throughput(name, _BATCH.value, _STEPS.value,
                                      data_dir=_DATA_DIR.value)
    except Exception as e:  # pylint: disable=broad-except
      rows[name] = f"not available here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
  print(f"| data set | training pipeline, images/s (batch {_BATCH.value}) |")
  print("|---|---|")
  for name, value in rows.items():
    print(f"| {name} | {value if isinstance(value, str) else f'{value:,.0f}'} |")
  print(json.dumps({"batch_size": _BATCH.value, "images_per_s": rows}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
