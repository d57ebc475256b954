r"""Trains each objective over seeds (all of them by default); writes table and plots.

  python experiments/compare.py --config=experiments/configs/fashion_mnist.py \
    --workdir=workdirs/fmnist_compare --seeds=5

Finished runs are not redone; rerun the same command to resume.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from discrim_jax import cli
from discrim_jax.cli import parse_flags, run_with_one_line_errors
from discrim_jax.config_lib import OBJECTIVES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for all runs and results.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per objective.")
_OBJECTIVES = flags.DEFINE_list("objectives", list(OBJECTIVES),
                                "Objectives to compare.")
_VMAP_SEEDS = flags.DEFINE_bool(
    "vmap_seeds", False,
    "Train each objective's seeds together: the app's step under jax.vmap "
    "over the seeds. Measure first (experiments/bench.py --vmap_seeds): on a "
    "2-core CPU, full-width ResNet-18 trained 0.36x as fast per seed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from discrim_jax import compare, report  # pylint: disable=g-import-not-at-top
  from discrim_jax import config_lib  # pylint: disable=g-import-not-at-top
  if run_with_one_line_errors(lambda: cli.dry_run(
      f"compare {_OBJECTIVES.value} over {_SEEDS.value} seeds",
      [config_lib.with_fields(_CONFIG.value, objective=o)
       for o in _OBJECTIVES.value])):
    return

  def run():
    with cli.in_workdir(_WORKDIR.value):
      return compare.run_comparison(
          _CONFIG.value, _WORKDIR.value, objectives=_OBJECTIVES.value,
          seeds=_SEEDS.value, vmap_seeds=_VMAP_SEEDS.value)

  results = run_with_one_line_errors(run)
  print(report.markdown_table(results))
  print(f"table, JSON and plots in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
