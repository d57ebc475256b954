r"""Does the loss beat CE once everything is tuned alike? One command.

  python experiments/verdict.py --config=experiments/configs/fashion_mnist.py \
    --workdir=workdirs/verdict_fashion --per_class=20,500

Every objective (CE included) gets the same tuning budget on validation; each
chosen setting is then trained on 10 fresh seeds, and only those runs are
compared with tuned CE (paired intervals, Holm over every comparison). See
discrim_jax/verdict.py for the protocol. Finished runs are never redone:
rerun the command to resume. --shard=I/N divides the runs between processes
(a SLURM job array); a shard done with its own runs trains any other that
no process has started, and the shard that finishes the last run writes the
results. --report writes what is finished so far without training.
--recorded=PATH counts the runs an earlier verdict.json records as finished
(its "runs" ledger), so a wiped workdir resumes from the committed results.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the runs and results.")
_PER_CLASS = flags.DEFINE_list("per_class", ["20", "500"],
                               "The regimes: training images per class.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of every run.")
_BATCH = flags.DEFINE_integer("batch", 100, "Batch size of every run.")
_CANDIDATES = flags.DEFINE_integer(
    "candidates", 4, "Tuning settings of every objective (the defaults and "
    "the first N-1 drawn ones; fewer: the first of the same draws).")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", None, "Objectives (default: CE, CE+Gini+KL and the baselines).")
_SHARD = flags.DEFINE_string("shard", "", "I/N: train only shard I of N.")
_CAPACITY = flags.DEFINE_list(
    "capacity", [], "Width multipliers of the capacity analysis (e.g. "
    "0.25,0.5: 128 and 256 features for the configs' ResNet-18 at 1/8), "
    "trained after each regime's confirmation.")
_CAPACITY_PER_CLASS = flags.DEFINE_list(
    "capacity_per_class", None, "The regimes of the capacity analysis, by "
    "images per class (e.g. 20; default: every regime of --per_class).")
_RECORDED = flags.DEFINE_string(
    "recorded", None, "An earlier verdict.json (e.g. the committed one): the "
    "runs it records count as finished, so a lost workdir resumes from it.")
_REPORT = flags.DEFINE_bool(
    "report", False, "Train nothing: write the results of the finished runs "
    "(marked incomplete while runs are missing).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable-next=g-import-not-at-top
  from discrim_jax import config_lib, study, verdict, verdict_plan, verdict_report

  def regimes():
    try:
      sizes = [int(n) for n in _PER_CLASS.value]
    except ValueError:
      sizes = [0]
    if not sizes or min(sizes) < 1:
      raise config_lib.ConfigError(
          f"--per_class={','.join(_PER_CLASS.value)} must be positive whole "
          "numbers, e.g. --per_class=20,500")
    if _CANDIDATES.value < 1:
      raise config_lib.ConfigError(
          f"--candidates={_CANDIDATES.value} must be at least 1 (the defaults), "
          "e.g. --candidates=4")
    return [verdict_plan.Regime(f"{n}_per_class", n, _STEPS.value, _BATCH.value,
                           _CANDIDATES.value) for n in sizes]

  if run_with_one_line_errors(lambda: cli.dry_run("verdict", [
      verdict_plan.regime_config(_CONFIG.value, r, 10) for r in regimes()])):
    return
  shard = run_with_one_line_errors(lambda: study.parse_shard(_SHARD.value))
  objectives = tuple(_OBJECTIVES.value or config_lib.COMPARED_OBJECTIVES)

  def widths():
    try:
      out = tuple(float(w) for w in _CAPACITY.value)
    except ValueError:
      out = (0.0,)
    if any(w <= 0 for w in out):
      raise config_lib.ConfigError(
          f"--capacity={','.join(_CAPACITY.value)} must be positive width "
          "multipliers, e.g. --capacity=0.25,0.5")
    return out

  def capacity_per_class():
    if _CAPACITY_PER_CLASS.value is None:
      return None
    try:
      return tuple(int(n) for n in _CAPACITY_PER_CLASS.value)
    except ValueError:
      raise config_lib.ConfigError(
          f"--capacity_per_class={','.join(_CAPACITY_PER_CLASS.value)} must "
          "be images per class of regimes in --per_class, e.g. "
          "--capacity_per_class=20") from None

  def run():
    recorded = _RECORDED.value and verdict.load_recorded(
        _RECORDED.value, _CONFIG.value, regimes())
    if shard is None:
      with cli.in_workdir(_WORKDIR.value):
        return verdict.run_verdict(_CONFIG.value, _WORKDIR.value, regimes(),
                                   objectives, train=not _REPORT.value,
                                   widths=widths(), recorded=recorded,
                                   capacity_per_class=capacity_per_class())
    cli.route_logs(f"{_WORKDIR.value}/shard_{shard[0]}_of_{shard[1]}")
    return verdict.run_verdict(_CONFIG.value, _WORKDIR.value, regimes(),
                               objectives, shard, train=not _REPORT.value,
                               widths=widths(), recorded=recorded,
                               capacity_per_class=capacity_per_class())

  results = run_with_one_line_errors(run)
  if results is None:
    print(f"shard {_SHARD.value} done; other runs are missing: the shard that "
          "finishes the last one writes the results (or rerun with --report)")
    return
  print(verdict_report.markdown(results))
  print(f"verdict.md and verdict.json in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
