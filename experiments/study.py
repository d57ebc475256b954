r"""Where, if anywhere, does the loss help? One command per study.

  python experiments/study.py --config=experiments/configs/fashion_mnist.py \
    --study=scarcity --workdir=workdirs/study_scarcity --seeds=5

Studies: scarcity (20/100/500 images per class and the base config), capacity
(the base width vs full width), lambda, layer, start (the loss's knobs at
--regime images per class). Any data set works through --config. Finished
runs are never redone: rerun the command to resume; --cells trains only the
named cells (the table covers every finished one). See discrim_jax/study.py.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from discrim_jax import cli
from discrim_jax.cli import parse_flags, run_with_one_line_errors

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base experiment config (experiments/configs/*.py[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the study's runs and results.")
_STUDY = flags.DEFINE_enum("study", "scarcity",
                           ["scarcity", "capacity", "lambda", "layer", "start"],
                           "Which study.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per objective and cell.")
_REGIME = flags.DEFINE_integer("regime", 100, "Images per class of the capacity "
                               "and knob cells.")
_OBJECTIVES = flags.DEFINE_list("objectives", None, "Objectives (default: the "
                                "study's: CE, Gini+KL and the baselines for "
                                "scarcity; CE and Gini+KL for capacity; Gini+KL "
                                "for the knobs).")
_CELLS = flags.DEFINE_list("cells", None, "Train only these cells.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps of the capacity "
                              "cells (default 600, as the scarcity cells).")
_VMAP_SEEDS = flags.DEFINE_bool(
    "vmap_seeds", False, "Train an objective's missing seeds together under "
    "jax.vmap (faster only where measured: see the README's study section).")
_SHARD = flags.DEFINE_string(
    "shard", "", "I/N: train only shard I of N of the study's runs (0 <= I < "
    "N), e.g. from a SLURM job array: --shard=$SLURM_ARRAY_TASK_ID/N. Shards "
    "share the workdir; the one that finds every run done writes the tables.")
_LIST = flags.DEFINE_bool("list", False, "Print the study's runs (with the "
                          "shard each belongs to, given --shard's N) and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from discrim_jax import report, study  # pylint: disable=g-import-not-at-top
  if run_with_one_line_errors(lambda: cli.dry_run(
      f"study {_STUDY.value}", [c.config for c in study.cells(
          _STUDY.value, _CONFIG.value, 10, regime=_REGIME.value,
          steps=_STEPS.value)])):
    return

  shard = run_with_one_line_errors(lambda: study.parse_shard(_SHARD.value))
  if _LIST.value:
    run_with_one_line_errors(lambda: _print_runs(study, shard))
    return

  def run():
    kwargs = dict(seeds=_SEEDS.value, regime=_REGIME.value,
                  objectives=_OBJECTIVES.value, only=_CELLS.value,
                  vmap_seeds=_VMAP_SEEDS.value, steps=_STEPS.value, shard=shard)
    if shard is None:  # one process: the whole workdir is this run's
      with cli.in_workdir(_WORKDIR.value):
        return study.run_study(_STUDY.value, _CONFIG.value, _WORKDIR.value,
                               **kwargs)
    # Shards share the workdir: each run's own lock keeps them apart.
    cli.route_logs(f"{_WORKDIR.value}/shard_{shard[0]}_of_{shard[1]}")
    return study.run_study(_STUDY.value, _CONFIG.value, _WORKDIR.value, **kwargs)

  results = run_with_one_line_errors(run)
  if results is None:
    print(f"shard {_SHARD.value} done; the tables are written by the shard "
          "that finishes last")
    return
  print(report.study_markdown(results))
  print(f"table, JSON and plots in {_WORKDIR.value}")


def _print_runs(study, shard):
  """One line per run: index, shard, cell, objective, seed, folder."""
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  num_classes = runtime.load_dataset_of(_CONFIG.value).num_classes
  runs = study.study_runs(study.cells(
      _STUDY.value, _CONFIG.value, num_classes, regime=_REGIME.value,
      objectives=tuple(_OBJECTIVES.value) if _OBJECTIVES.value else None,
      steps=_STEPS.value), _SEEDS.value, _CELLS.value)
  n = shard[1] if shard else 1
  for k, r in enumerate(runs):
    print(f"{k}\tshard {k % n}/{n}\t{r.cell}\t{r.objective}\tseed {r.seed}"
          f"\t{r.runs_in}/{r.objective}/seed{r.seed}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
