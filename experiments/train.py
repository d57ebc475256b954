r"""Trains one model: ``train_and_evaluate(config, workdir)`` behind absl flags.

  python experiments/train.py --config=experiments/configs/fashion_mnist.py \
    --workdir=workdirs/fmnist [--config.FIELD=VALUE ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from discrim_jax import cli
from discrim_jax.cli import parse_flags, run_with_one_line_errors

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize() for multi-host runs (auto: when the "
    "environment names several processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that --help stays fast and TF/JAX start after flag parsing.
  from discrim_jax import train  # pylint: disable=g-import-not-at-top

  if run_with_one_line_errors(
      lambda: cli.dry_run(f"train into {_WORKDIR.value}", [_CONFIG.value])):
    return

  def run():
    cli.maybe_initialize_distributed(_DISTRIBUTED.value)
    with cli.in_workdir(_WORKDIR.value):
      config = _CONFIG.value  # a config file that fails to load raises here
      return train.train_and_evaluate(config, _WORKDIR.value)

  summary = run_with_one_line_errors(run)
  print(f"test accuracy {summary['test_accuracy']:.4f} (best validation "
        f"{summary['best_validation_accuracy']:.4f} at step "
        f"{summary['best_validation_step']}); summary in "
        f"{_WORKDIR.value}/summary.json")
  if "knn/pre_logits" in summary:
    print(f"features at pre_logits: kNN accuracy {summary['knn/pre_logits']:.4f}"
          f", linear probe {summary['probe/pre_logits']:.4f}, NC1 "
          f"{summary['nc1/pre_logits']:.3g} "
          f"({summary['representation_time_s']:.0f} s to measure)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
