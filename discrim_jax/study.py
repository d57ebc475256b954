"""Studies: where, if anywhere, does the loss help? (issue #20)

A study is a list of cells; a cell is a config (a base config with a few
fields changed) on which objectives are compared over the same seeds with
:func:`discrim_jax.compare.run_comparison` (CE always included as the paired
reference, except in the knob cells, which pair with the CE runs of their
regime's scarcity cell: CE does not depend on the loss's knobs). Runs live in
``WORKDIR/CELL/OBJECTIVE/seedN``; finished runs are never redone, so a study
resumes across sessions by rerunning its command.

Studies (``STUDIES``):

* ``scarcity``: 20, 100 and 500 training images per class for a fixed number
  of steps (600 of 100 images: converged on these sizes), plus the base
  config itself (Fashion-MNIST: the 20,000-image, 3-epoch setting);
* ``capacity``: the loss layer with the base width's features (ResNet-18 at
  width 1/8: 64) against full width (512), at the regime's images per class;
* ``lambda``: lambda_gini x lambda_kl in {0.1, 0.5, 1, 2}^2 at the regime;
* ``layer``: the loss on stage3, stage4, pre_logits, stage3+stage4;
* ``start``: the auxiliary terms from 0%, 10% or 50% of training on.

Knob cells whose config is the regime's own (e.g. start at 10%) reuse the
regime cell's runs rather than retrain them.

Outputs in ``WORKDIR``, named by the study: ``STUDY.md``, ``STUDY.json`` (per cell and objective:
test accuracy and the representation metrics with paired differences to CE
and 95% t-intervals, and the cell's wall time) and plots (``scarcity.png``,
``lambda.png``).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import dataclasses
import json
import math
from typing import Any

from absl import logging
from etils import epath

from discrim_jax import compare
from discrim_jax import config_lib
from discrim_jax import report
from discrim_jax import stats as stats_lib
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import ConfigError

PER_CLASS = (20, 100, 500)
STEPS = 600  # training steps of the scarcity cells
BATCH = 100
LAMBDAS = (0.1, 0.5, 1.0, 2.0)
LAYERS = {"stage3": ("stage3",), "stage4": ("stage4",),
          "pre_logits": ("pre_logits",), "stage3+stage4": ("stage3", "stage4")}
START_FRACTIONS = (0.0, 0.1, 0.5)


@dataclasses.dataclass
class Cell:
  name: str
  config: Any
  objectives: tuple[str, ...]
  pair_with: str | None = None  # the cell whose CE runs are the reference
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  # The folder of the cell's runs: another cell's where the configs are the
  # same (a knob at the regime's own setting), so that they are not retrained.
  runs_in: str = ""

  def __post_init__(self):
    self.runs_in = self.runs_in or self.name


def scarcity_config(base, per_class: int, num_classes: int, *,
                    steps: int | None = None, batch: int | None = None):
  """``base`` trained on ``per_class`` images of each class for about
  ``steps`` steps of ``batch``, evaluated 6 times, the auxiliary terms from
  10% of training on."""
  steps, batch = steps or STEPS, batch or BATCH
  images = per_class * num_classes
  batch = min(batch, images)
  steps_per_epoch = images // batch
  epochs = max(1, math.ceil(steps / steps_per_epoch))
  return config_lib.with_fields(base, train_per_class=per_class, train_subset=0,
              batch_size=batch, num_epochs=epochs,
              eval_every_epochs=max(1, epochs // 6),
              log_every_steps=min(50, steps_per_epoch * max(1, epochs // 6)),
              **{"loss.start_epoch": 0.1 * epochs})


def cells(study: str, base, num_classes: int, *, regime: int = 100,
          objectives: tuple[str, ...] | None = None,
          steps: int | None = None) -> list[Cell]:
  """The cells of a study on ``base`` (a data set of ``num_classes``);
  ``regime``: images per class of the capacity and knob cells; ``steps``:
  training steps of the capacity cells (default ``STEPS``; full width costs
  ~20x a step of the 1/8-width model on a CPU)."""
  if steps is not None and study != "capacity":
    raise ConfigError(f"--steps={steps} applies to the capacity study only; "
                      f"the {study} study trains {STEPS} steps (drop --steps)")
  if study == "scarcity":
    objectives = objectives or config_lib.COMPARED_OBJECTIVES
    out = [Cell(f"{n}_per_class", scarcity_config(base, n, num_classes), objectives,
                info={"per_class": n}) for n in PER_CLASS]
    # The base config's images per class, where it says (its train_subset:
    # the first N images, about N / classes of each).
    per_class = base.train_subset // num_classes if base.get("train_subset") else None
    out.append(Cell("base", base, objectives, info={"per_class": per_class,
                                                    "base": True}))
    return out
  regime_config = scarcity_config(base, regime, num_classes)
  reference = f"{regime}_per_class"
  # Capacity compares CE with the loss; a knob cell's CE is the regime cell's.
  objectives = objectives or (("ce", "gini_kl") if study == "capacity"
                              else ("gini_kl",))
  if study == "capacity":
    width = base.model_kwargs.get("width_multiplier", 1.0)
    steps = steps or STEPS
    config = scarcity_config(base, regime, num_classes, steps=steps)
    name = reference + ("" if steps == STEPS else f"_{steps}_steps")
    out = [Cell(f"{name}_width_{w:g}",
                config_lib.with_fields(config, **{"model_kwargs.width_multiplier": w}),
                objectives, info={"width": w, "steps": steps})
           for w in sorted({width, 1.0})]
  elif study == "lambda":
    out = [Cell(f"{reference}_gini{g:g}_kl{k:g}",
                config_lib.with_fields(regime_config, **{"loss.lambda_gini": g,
                                       "loss.lambda_kl": k}),
                objectives, reference,
                {"lambda_gini": g, "lambda_kl": k})
           for g in LAMBDAS for k in LAMBDAS]
  elif study == "layer":
    out = [Cell(f"{reference}_layer_{name}",
                config_lib.with_fields(regime_config, **{"loss.layers": layers}),
                objectives, reference, {"layers": name})
           for name, layers in LAYERS.items()]
  elif study == "start":
    epochs = regime_config.num_epochs
    out = [Cell(f"{reference}_start_{f:g}",
                config_lib.with_fields(regime_config, **{"loss.start_epoch": f * epochs}),
                objectives, reference, {"start_fraction": f})
           for f in START_FRACTIONS]
  else:
    raise ConfigError(f"unknown study {study!r}; use one of "
                      "scarcity, capacity, lambda, layer, start (--study=...)")
  # A cell that would be the same run as the regime cell's (the identity a
  # workdir is checked against) is that cell: its runs, not retrained.
  regime_identity = config_lib.identity(regime_config)
  for cell in out:
    if config_lib.identity(cell.config) == regime_identity:
      cell.runs_in = reference
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a study: a cell's objective at one seed, kept in
  ``WORKDIR/runs_in/OBJECTIVE/seedN`` (``runs_in``: the cell whose folder
  holds it)."""
  cell: str
  runs_in: str
  objective: str
  seed: int


def study_runs(all_cells: list[Cell], seeds: int,
               only: list[str] | None = None) -> list[Run]:
  """Every distinct run of the cells (those in ``only``, when given), in a
  fixed order: the list that shards divide."""
  out, seen = [], set()
  for cell in all_cells:
    if only and cell.name not in only:
      continue
    for objective in cell.objectives:
      for seed in range(seeds):
        if (cell.runs_in, objective, seed) not in seen:
          seen.add((cell.runs_in, objective, seed))
          out.append(Run(cell.name, cell.runs_in, objective, seed))
  return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
  """``"i/n"`` (shard i of n, 0 <= i < n) as ``(i, n)``; None for ""."""
  if not text:
    return None
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ConfigError(f"--shard={text!r} must be I/N with 0 <= I < N, e.g. "
                      "--shard=0/4 for the first of four shards")
  return i, n


def shard_of(runs: list[Run], shard: tuple[int, int] | None) -> list[Run]:
  """Shard ``(i, n)`` of ``runs``: every n-th run from the i-th."""
  if shard is None:
    return list(runs)
  i, n = shard
  return runs[i::n]


def run_study(study: str, base, workdir: str, *, seeds: int = 5,
              regime: int = 100, objectives=None, only: list[str] | None = None,
              vmap_seeds: bool = False, steps: int | None = None,
              shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
  """Trains what is missing of every cell (or of the cells named in
  ``only``; with ``vmap_seeds``, an objective's missing seeds together),
  then writes the study's table, JSON and plots. With ``shard=(i, n)``,
  trains only shard i of n of the runs (:func:`study_runs`), so that n
  processes (a SLURM job array) share the study; the tables are written by
  whichever finds every run done, and None is returned until then."""
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  out = epath.Path(workdir)
  num_classes = runtime.load_dataset_of(base).num_classes
  all_cells = cells(study, base, num_classes, regime=regime,
                    objectives=tuple(objectives) if objectives else None,
                    steps=steps)
  by_name = {cell.name: cell for cell in all_cells}
  mine = shard_of(study_runs(all_cells, seeds, only), shard)
  groups: dict[tuple[str, str], list[int]] = {}
  for r in mine:
    groups.setdefault((r.cell, r.objective), []).append(r.seed)
  for (name, objective), group in groups.items():
    cell = by_name[name]
    compare.train_all(cell.config, out / cell.runs_in, [objective], group,
                      vmap_seeds=vmap_seeds)
  missing = [r for r in study_runs(all_cells, seeds) if not workdir_lib.finished(
      workdir_lib.run_dir(out / r.runs_in, r.objective, r.seed))]
  if shard is not None and missing:
    logging.info("shard %d/%d done; %d runs of other shards still missing",
                 *shard, len(missing))
    return None
  results = summarize(out, all_cells, seeds)
  (out / f"{study}.json").write_text(json.dumps(results, indent=2, allow_nan=False)
                                     + "\n")
  (out / f"{study}.md").write_text(report.study_markdown(results))
  report.plot_study(out, results, LAMBDAS)
  return results


def _finished(path: epath.Path, objectives, seeds: int) -> bool:
  return all(workdir_lib.finished(workdir_lib.run_dir(path, o, s))
             for o in objectives for s in range(seeds))


def summarize(out: epath.Path, all_cells: list[Cell], seeds: int) -> dict[str, Any]:
  """Per finished cell and objective: each metric's mean, std and paired
  difference to CE; the cell's wall time (sum of its runs')."""
  rows = {}
  for cell in all_cells:
    path = out / cell.runs_in
    if not _finished(path, cell.objectives, seeds):
      rows[cell.name] = {"info": cell.info, "finished": False}
      continue
    objectives = list(cell.objectives)
    reference = out / (cell.pair_with or cell.name)
    results = compare.summarize(path, objectives, seeds)["results"]
    ce = None
    if "ce" in results:
      ce = results["ce"]
    elif _finished(reference, ["ce"], seeds):
      ce = compare.summarize(reference, ["ce"], seeds)["results"]["ce"]
    cell_rows = {}
    for objective, row in results.items():
      metrics = {}
      for name, stats in row["metrics"].items():
        values = [r["metrics"][name] for r in row["runs"]]
        # Per seed, so that every figure can be recomputed from the JSON.
        entry = {"mean": stats["mean"], "std": stats["std"], "values": values}
        if ce is not None and objective != "ce":
          base = [r["metrics"].get(name) for r in ce["runs"]]
          if None not in base:
            entry["ce_values"] = base
            entry.update(stats_lib.paired(values, base))
        metrics[name] = entry
      cell_rows[objective] = {
          "metrics": metrics, "seeds": [r["seed"] for r in row["runs"]],
          "validation_accuracy": [r["best_validation_accuracy"]
                                  for r in row["runs"]],
          "identity": _identity(path, objective)}
    wall = sum(_run_wall_time(workdir_lib.run_dir(path, o, s))
               for o in objectives for s in range(seeds))
    rows[cell.name] = {"info": cell.info, "finished": True, "runs_in": cell.runs_in,
                       "paired_with": (cell.pair_with or cell.name) if ce else None,
                       "wall_time_s": wall, "objectives": cell_rows}
  _holm_over_study(rows)
  return {"seeds": seeds, "cells": rows}


def _identity(path: epath.Path, objective: str) -> dict[str, Any] | None:
  """The config identity of an objective's runs in a cell (seed 0's)."""
  try:
    return json.loads((workdir_lib.run_dir(path, objective, 0)
                       / workdir_lib.IDENTITY).read_text())
  except (OSError, ValueError):
    return None


def _holm_over_study(rows: dict[str, Any]) -> None:
  """Holm over every distinct comparison of test accuracy with CE in the
  study (a cell that reuses another's runs is that comparison again)."""
  family = [(name, o) for name, cell in rows.items() if cell.get("finished")
            and cell.get("runs_in", name) == name
            for o, row in cell["objectives"].items()
            if row["metrics"]["test_accuracy"].get("p_t") is not None]
  adjusted = stats_lib.holm([rows[n]["objectives"][o]["metrics"]["test_accuracy"]
                             ["p_t"] for n, o in family])
  by_runs = {(n, o): p for (n, o), p in zip(family, adjusted)}
  for name, cell in rows.items():
    if not cell.get("finished"):
      continue
    for o, row in cell["objectives"].items():
      key = (cell.get("runs_in", name), o)
      if key in by_runs:
        row["metrics"]["test_accuracy"]["p_holm"] = by_runs[key]


def _run_wall_time(run: epath.Path) -> float:
  """A run's share of wall time: seeds trained together (vmapped) each
  record the group's time, which counts once."""
  summary = workdir_lib.read_summary(run)
  return summary["wall_time_s"] / len(summary.get("trained_with_seeds", [0]))


