"""What the verdict trains (``discrim_jax.verdict``), fixed before any run:
each objective's tuning candidates, the seeds, each regime's config, every
run with the folder it lives in, the regimes of the capacity analysis, and
the rule that says whether a step budget was enough (:func:`plateau`)."""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import dataclasses
import math
from typing import Any
import zlib

from etils import epath
import numpy as np

from discrim_jax import config_lib
from discrim_jax import study
from discrim_jax import workdir as workdir_lib

NUM_CANDIDATES = 4
TUNING_SEEDS = (0, 1)
FRESH_SEEDS = tuple(range(100, 110))
# Log-uniform ranges: the learning rate and weight decay of every objective,
# and each term weight from a tenth to ten times its default.
SEARCH = {"optimizer.lr": (0.03, 0.3), "optimizer.weight_decay": (1e-4, 3e-3)}
TERM_WEIGHTS = {"gini": ("loss.lambda_gini",), "kl": ("loss.lambda_kl",),
                "center": ("baseline.center.weight",),
                "opl": ("baseline.opl.weight",),
                "supcon": ("baseline.supcon.weight",)}


# Capacity, a secondary analysis with its own Holm family: CE and the loss
# at their tuned settings on wider models (``--capacity``), paired on the
# first fresh seeds; the base width's pairs are its confirmation runs.
CAPACITY_OBJECTIVES = ("ce", "gini_kl")
CAPACITY_SEEDS = FRESH_SEEDS[:5]


@dataclasses.dataclass(frozen=True)
class Regime:
  """A data set at ``per_class`` training images of each class, trained
  ``steps`` steps of ``batch``; every objective tuned over ``candidates``
  settings (the first ``candidates`` of the same draws, whatever the
  number)."""
  name: str
  per_class: int
  steps: int = study.STEPS
  batch: int = study.BATCH
  candidates: int = NUM_CANDIDATES


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def candidates(objective: str, base, number: int = NUM_CANDIDATES
               ) -> list[dict[str, float]]:
  """The ``number`` tuning settings of ``objective`` (dotted fields and
  values): candidate 0 is ``base``'s own, the rest drawn from
  :data:`SEARCH` (fewer settings are the first of the same draws)."""
  fields = list(SEARCH) + [f for t in config_lib.objective_terms(objective)
                           for f in TERM_WEIGHTS[t]]
  ranges = {f: SEARCH.get(f) or (0.1 * _get(base, f), 10 * _get(base, f))
            for f in fields}
  rng = np.random.default_rng(zlib.crc32(objective.encode()))
  out = [{f: float(_get(base, f)) for f in fields}]
  for _ in range(number - 1):
    out.append({f: float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                for f, (lo, hi) in ranges.items()})
  return out


def regime_config(base, regime: Regime, num_classes: int):
  """``base`` at the regime's size, each seed drawing its own images, no
  representation metrics (the verdict is on accuracy)."""
  config = study.scarcity_config(base, regime.per_class, num_classes,
                                 steps=regime.steps, batch=regime.batch)
  return config_lib.with_fields(config, resample_subset=True,
                                **{"representation.enabled": False})


@dataclasses.dataclass(frozen=True)
class Run:
  regime: str
  phase: str  # "tune", "confirm" or "capacity"
  objective: str
  candidate: int | None
  seed: int
  width: float | None = None  # capacity runs: the model's width multiplier

  def folder(self, out: epath.Path) -> epath.Path:
    where = out / self.regime / self.phase
    if self.candidate is not None:
      where = where / f"c{self.candidate}"
    if self.width is not None:
      where = where / f"width_{self.width:g}"
    return workdir_lib.run_dir(where, self.objective, self.seed)

  @property
  def key(self) -> str:
    """The run's folder under the workdir: its name in the ledger."""
    return self.folder(epath.Path()).as_posix()


def tuning_runs(regimes, objectives) -> list[Run]:
  return [Run(r.name, "tune", o, k, s) for r in regimes for o in objectives
          for k in range(r.candidates) for s in TUNING_SEEDS]


def confirm_runs(regimes, objectives) -> list[Run]:
  return [Run(r.name, "confirm", o, None, s) for r in regimes
          for o in objectives for s in FRESH_SEEDS]


def capacity_runs(regimes, widths) -> list[Run]:
  return [Run(r.name, "capacity", o, None, s, w) for r in regimes
          for w in widths for o in CAPACITY_OBJECTIVES for s in CAPACITY_SEEDS]


def run_config(regime_config_, run: Run, setting: dict[str, float]):
  """The config ``run`` trains: its regime's, with the objective's
  setting (and, for capacity runs, the width)."""
  width = {} if run.width is None else {"model_kwargs.width_multiplier": run.width}
  return config_lib.with_fields(regime_config_, **setting, **width)


def capacity_regimes(regimes, widths, per_class) -> dict[str, tuple[float, ...]]:
  """``{regime name: widths}`` of the capacity analysis."""
  sizes = [r.per_class for r in regimes]
  if per_class is not None and not set(per_class) <= set(sizes):
    raise config_lib.ConfigError(
        f"--capacity_per_class={','.join(map(str, per_class))} names regimes "
        f"this command does not train; choose among --per_class="
        f"{','.join(map(str, sizes))}")
  return {r.name: tuple(widths) for r in regimes
          if per_class is None or r.per_class in per_class}


# The step budget is enough where tuned CE has plateaued: its mean
# validation accuracy over the fresh seeds rose by less than this over the
# last sixth of training (the last evaluation interval of 600 steps).
PLATEAU_POINTS = 0.5


def plateau(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """CE's mean validation curve over its confirmation runs, and whether
  the last sixth of the steps added less than ``PLATEAU_POINTS``."""
  steps = [s for s, _ in runs[0]["validation_curve"]]
  mean = np.mean([[a for _, a in r["validation_curve"]] for r in runs], axis=0)
  back = steps[-1] - steps[-1] // 6
  at = max(i for i, s in enumerate(steps) if s <= back)
  gain = 100 * float(mean[-1] - mean[at])
  return {"steps": steps, "mean_validation_accuracy": [float(m) for m in mean],
          "last_sixth_gain_points": gain, "from_step": steps[at],
          "plateaued": gain < PLATEAU_POINTS, "rule_points": PLATEAU_POINTS}
