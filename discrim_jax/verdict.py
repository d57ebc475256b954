"""The verdict: every objective tuned alike on validation, then confirmed on
fresh seeds against tuned CE (issue #28).

For each regime (a data set at some images per class, trained a fixed number
of steps), the protocol is fixed before any run (its settings, seeds and
runs: ``discrim_jax.verdict_plan``):

1. **Tuning, the same budget for every objective**: the regime's
   ``candidates`` settings (``NUM_CANDIDATES`` unless the command says
   fewer) x ``TUNING_SEEDS``. Candidate 0 is the app's defaults; the others
   are drawn (log-uniformly, from a generator seeded by the objective's name)
   for the learning rate, the weight decay and each of the objective's own
   term weights (``SEARCH``; CE has only the first two).
2. **Choice on validation only**: the candidate with the highest mean best
   validation accuracy over the tuning seeds (ties: the lower index).
3. **Confirmation**: the chosen setting of each objective on the
   ``FRESH_SEEDS``, which tuning never used. With ``resample_subset`` each
   seed draws its own training images; CE and every objective share a seed's
   draw, initialisation and order, so the comparison is paired.
4. **Primary comparisons**, declared here: each objective's confirmation test
   accuracy against CE's, per regime; paired 95% t-intervals, t and exact
   sign-flip p-values, and Holm's correction over every primary comparison of
   the file (all regimes together).

Runs live in ``WORKDIR/REGIME/tune/cK/OBJECTIVE/seedS``,
``WORKDIR/REGIME/confirm/OBJECTIVE/seedS`` and (the capacity analysis)
``WORKDIR/REGIME/capacity/width_W/OBJECTIVE/seedS``; finished runs are
never redone, so the whole protocol resumes by rerunning its command.
``verdict.json`` keeps every run's seed and accuracies, so each figure
recomputes from it, and a
ledger of every finished run (``"runs"``): passed back as ``recorded``
(:func:`load_recorded`), an earlier ``verdict.json`` stands for its runs'
folders, so a lost or wiped workdir resumes from the committed file. Its
table and figures are ``discrim_jax.verdict_report``'s.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import dataclasses
import json
from typing import Any, Callable

from absl import logging
from etils import epath
import numpy as np

from discrim_jax import compare
from discrim_jax import config_lib
from discrim_jax import stats as stats_lib
from discrim_jax import study
from discrim_jax import verdict_plan as plan
from discrim_jax import verdict_report
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import ConfigError

def _record(out, run: plan.Run, recorded: dict[str, Any]
            ) -> dict[str, Any] | None:
  """A finished run's values (its folder's, else ``recorded``'s), or None."""
  folder = run.folder(out)
  if not workdir_lib.finished(folder):
    return recorded.get(run.key)
  s = workdir_lib.read_summary(folder)
  record = {"test_accuracy": s["test_accuracy"],
            "best_validation_accuracy": s["best_validation_accuracy"],
            "wall_time_s": s.get("wall_time_s")}
  if run.phase != "tune":  # the compared runs' curves (convergence)
    record["validation_curve"] = [
        [r["step"], r["accuracy"]] for r in workdir_lib.read_metrics(folder)
        if r["split"] == "validation"]
  return record


def load_recorded(path, base, regimes) -> dict[str, dict[str, Any]]:
  """The finished runs an earlier ``verdict.json`` records, by
  :attr:`plan.Run.key`: its ledger, or (files written before the ledger) what
  its tables keep: each tuning run's best validation accuracy, each
  confirmation and capacity run's accuracies and curve. A ConfigError
  unless the file was written for the same protocol: the base config's
  identity (files that record it), the same regimes under the same names,
  and each objective's tuning candidates."""
  results = workdir_lib.read_json(epath.Path(path))
  def refuse(what):
    raise ConfigError(f"--recorded={path} records runs of another verdict ({what}); "
                      "pass the verdict.json that this command wrote")
  if "base" in results:
    mine = json.loads(json.dumps(config_lib.identity(base)))
    if results["base"] != mine:
      refuse("base config differs in " + ", ".join(sorted(
          k for k in set(mine) | set(results["base"])
          if mine.get(k) != results["base"].get(k))))
  for regime in regimes:
    row = results["regimes"].get(regime.name)
    # Files written before regimes had ``candidates`` used the default.
    if row is not None and plan.Regime(**row["regime"]) != regime:
      refuse(f"{regime.name} is {row['regime']}, here {dataclasses.asdict(regime)}")
    for objective, entry in (row or {}).get("objectives", {}).items():
      if ([c["setting"] for c in entry["candidates"]]
          != plan.candidates(objective, base, regime.candidates)):
        refuse(f"the tuning candidates of {objective} differ")
  if "runs" in results:
    return results["runs"]
  out = {}
  for name, row in results["regimes"].items():
    for objective, entry in row["objectives"].items():
      for k, candidate in enumerate(entry["candidates"]):
        for seed, v in zip(results["protocol"]["tuning_seeds"],
                           candidate["validation_accuracy"]):
          if v is not None:
            out[plan.Run(name, "tune", objective, k, seed).key] = {
                "best_validation_accuracy": v}
      for r in entry["confirm"] or []:
        out[plan.Run(name, "confirm", objective, None, r["seed"]).key] = r
    widths = results["protocol"].get("capacity", {}).get("widths", [])
    for w, cell in row.get("capacity", {}).items():
      if float(w) not in widths:
        continue  # the base width: its runs are confirmation runs
      for objective, runs in cell["runs"].items():
        for r in runs or []:
          out[plan.Run(name, "capacity", objective, None, r["seed"],
                  float(w)).key] = r
  return {k: {f: v for f, v in r.items() if f != "seed"} for k, r in out.items()}


# ``finished(run)``: a finished run's values or None. While training, each
# call reads the run's folder (runs finish as the loop goes); the results
# read every folder once, into the ledger, and look runs up there.
Finished = Callable[[plan.Run], "dict[str, Any] | None"]


def _reader(out, recorded) -> Finished:
  return lambda run: _record(out, run, recorded or {})


def _tuning_values(finished: Finished, regime: plan.Regime, objective: str
                   ) -> list[list]:
  """Each candidate's best validation accuracies (None: not finished)."""
  def validation(run):
    r = finished(run)
    return None if r is None else r["best_validation_accuracy"]
  return [[validation(plan.Run(regime.name, "tune", objective, k, s))
           for s in plan.TUNING_SEEDS] for k in range(regime.candidates)]


def _choice(values: list[list]) -> int | None:
  if any(None in v for v in values):
    return None
  return int(np.argmax([float(np.mean(v)) for v in values]))  # first of ties


def choose(out, regime: plan.Regime, objective: str, recorded=None
           ) -> int | None:
  """The chosen candidate (validation only), or None until tuning is done."""
  return _choice(_tuning_values(_reader(out, recorded), regime, objective))


def _train(out, config, run: plan.Run) -> None:
  compare.train_all(config, run.folder(out).parent.parent, [run.objective],
                    [run.seed])


def _train_missing(out, base, regime: plan.Regime, config, runs, recorded
                   ) -> int:
  """Trains each of ``runs`` that is neither finished nor being trained by
  another process (its folder's lock), nor waiting on its objective's
  tuning; returns how many it finished (another pass is worth it only then:
  a run that ended without its summary is not tried again in a loop)."""
  trained = 0
  for run in runs:
    if _record(out, run, recorded) is not None:
      continue
    k = run.candidate
    if run.phase != "tune":
      k = choose(out, regime, run.objective, recorded)
      if k is None:
        logging.info("%s: tuning of %s not finished; its confirmation waits",
                     run.regime, run.objective)
        continue
    setting = plan.candidates(run.objective, base, regime.candidates)[k]
    folder = run.folder(out)
    try:
      with workdir_lib.locked(folder):  # the same lock as the run's own
        if workdir_lib.finished(folder):
          continue  # another process finished it since
        logging.info("%s candidate %d: %s", run.key, k, setting)
        _train(out, plan.run_config(config, run, setting), run)
    except workdir_lib.WorkdirBusy:
      logging.info("%s: another process is training it; skipped", run.key)
      continue
    trained += workdir_lib.finished(folder)
  return trained


def run_verdict(base, workdir: str, regimes: list[plan.Regime],
                objectives=config_lib.COMPARED_OBJECTIVES,
                shard: tuple[int, int] | None = None, *,
                train: bool = True, widths: tuple[float, ...] = (),
                recorded: dict[str, Any] | None = None,
                capacity_per_class: tuple[int, ...] | None = None
                ) -> dict[str, Any] | None:
  """Trains what is missing (tuning first, then each objective's chosen
  setting on the fresh seeds), then writes ``verdict.json``,
  ``verdict.md`` and the figures, and returns the results. With
  ``shard=(i, n)`` trains every n-th missing run from the i-th, then any
  other that no process has started (a shard done early helps the others),
  and passes again while it finds runs to train (confirmation runs wait on
  their objective's tuning); only a shard that finds every run finished
  writes the results: others return None. ``train=False`` trains nothing
  and writes what is finished so far (``complete`` false until every run
  is).
  ``widths``: the capacity analysis's width multipliers, trained after a
  regime's confirmation (CE and CE+Gini+KL, :data:`plan.CAPACITY_SEEDS`),
  in the regimes of ``capacity_per_class`` images per class (None: all).
  ``recorded`` (:func:`load_recorded`): runs finished elsewhere, which
  are neither trained again nor need their folders."""
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  if "ce" not in objectives:
    raise ConfigError("the verdict compares with CE: --objectives must "
                      f"include ce, got {list(objectives)}")
  if len({r.candidates for r in regimes}) != 1:
    raise ConfigError("one command tunes every regime with the same number of "
                      f"candidates, got {[r.candidates for r in regimes]}")
  if widths and not set(plan.CAPACITY_OBJECTIVES) <= set(objectives):
    raise ConfigError("--capacity compares "
                      f"{' and '.join(plan.CAPACITY_OBJECTIVES)}: "
                      f"--objectives must include both, got {list(objectives)}")
  capacity = plan.capacity_regimes(regimes, widths, capacity_per_class)
  out = epath.Path(workdir)
  recorded = recorded or {}
  num_classes = runtime.load_dataset_of(base).num_classes
  configs = {r.name: plan.regime_config(base, r, num_classes) for r in regimes}
  out.mkdir(parents=True, exist_ok=True)
  for regime in regimes if train else []:  # one regime, then the next
    runs = (plan.tuning_runs([regime], objectives)
            + plan.confirm_runs([regime], objectives)
            + plan.capacity_runs([regime], capacity.get(regime.name, ())))
    mine = study.shard_of(runs, shard)
    order = mine + [r for r in runs if r not in mine]
    while _train_missing(out, base, regime, configs[regime.name], order,
                         recorded):
      pass  # again: confirmation runs that waited on tuning may be ready
  results = summarize(out, base, regimes, objectives, widths, recorded,
                      capacity_per_class)
  if shard is not None and train and not results["complete"]:
    return None  # the shard that finishes the last run writes the results
  workdir_lib.write_atomically(
      out / "verdict.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
  workdir_lib.write_atomically(out / "verdict.md", verdict_report.markdown(results))
  verdict_report.plot(out, results)
  return results


def _confirmed(finished: Finished, regime: plan.Regime, objective: str,
               seeds=None, width: float | None = None
               ) -> list[dict[str, Any]] | None:
  runs = []
  phase = "confirm" if width is None else "capacity"
  for seed in plan.FRESH_SEEDS if seeds is None else seeds:
    r = finished(plan.Run(regime.name, phase, objective, None, seed, width))
    if r is None:
      return None
    runs.append({"seed": seed, **{f: r[f] for f in (
        "test_accuracy", "best_validation_accuracy", "validation_curve")}})
  return runs


def _capacity(finished: Finished, base, regime: plan.Regime, row, widths
              ) -> dict[str, Any]:
  """Per width (the base width from the confirmation runs): CE's and the
  loss's runs on :data:`plan.CAPACITY_SEEDS`, whether CE's mean validation
  curve over them plateaued (:func:`plan.plateau`), and their paired comparison,
  with Holm over the widths once all are in."""
  base_width = float(base.model_kwargs.get("width_multiplier", 1.0))
  table = {}
  for w in (base_width, *widths):
    runs = {}
    for o in plan.CAPACITY_OBJECTIVES:
      if w == base_width:
        confirmed = row["objectives"][o]["confirm"]
        runs[o] = confirmed and [r for r in confirmed
                                 if r["seed"] in plan.CAPACITY_SEEDS]
      else:
        runs[o] = _confirmed(finished, regime, o, plan.CAPACITY_SEEDS, w)
    entry = table[f"{w:g}"] = {"runs": runs}
    if runs["ce"]:  # converged at this width too? (the regime's rule)
      entry["ce_plateau"] = plan.plateau(runs["ce"])
    if all(runs.values()):
      ce, loss = (runs[o] for o in plan.CAPACITY_OBJECTIVES)
      entry["test_accuracy"] = stats_lib.paired(
          [r["test_accuracy"] for r in loss], [r["test_accuracy"] for r in ce])
  done = [e["test_accuracy"] for e in table.values() if "test_accuracy" in e]
  if len(done) == len(table):
    for t, p in zip(done, stats_lib.holm([t["p_t"] for t in done])):
      t["p_holm"] = p
  return table


def _correct(rows, objectives) -> tuple[int, bool]:
  """Adds each finished primary comparison's corrected p-value and
  simultaneous interval; returns the family's size and whether all of it
  is in."""
  # The family, declared before any result: every objective against CE in
  # every regime. Holm needs all of its p-values; until they are in, each
  # comparison gets Bonferroni's p over the whole family, which bounds its
  # Holm p from above.
  family = [(r, o) for r in rows for o in objectives if o != "ce"]
  done = [(r, o) for r, o in family if "test_accuracy" in rows[r]["objectives"][o]]
  primary = len(done) == len(family) and all(
      e["confirm"] for row in rows.values() for e in row["objectives"].values())
  ps = [rows[r]["objectives"][o]["test_accuracy"]["p_t"] for r, o in done]
  adjusted = (stats_lib.holm(ps) if primary
              else [None if p is None else min(1.0, len(family) * p) for p in ps])
  for (r, o), p in zip(done, adjusted):
    entry = rows[r]["objectives"][o]
    entry["test_accuracy"]["p_holm" if primary else "p_bonferroni"] = p
    # Bonferroni's simultaneous interval over the family (Holm's first step).
    ce = rows[r]["objectives"]["ce"]["confirm"]
    entry["simultaneous_ci"] = stats_lib.t_interval(
        [a["test_accuracy"] - b["test_accuracy"]
         for a, b in zip(entry["confirm"], ce)], 1 - 0.05 / len(family))
  return len(family), primary


def summarize(out, base, regimes, objectives, widths=(), recorded=None,
              capacity_per_class=None) -> dict[str, Any]:
  """Per regime and objective: every candidate's validation accuracies, the
  choice, the confirmation runs, and the paired comparison with CE; with
  ``widths``, the capacity analysis (of the regimes of
  ``capacity_per_class`` images per class; None: all); ``"runs"``, the ledger of every
  finished run (:func:`load_recorded`)."""
  capacity = plan.capacity_regimes(regimes, widths, capacity_per_class)
  ledger = _ledger(out, regimes, objectives, capacity, recorded or {})

  def finished(run):
    return ledger.get(run.key)

  rows: dict[str, Any] = {}
  for regime in regimes:
    row = rows[regime.name] = {"regime": dataclasses.asdict(regime),
                               "objectives": {}}
    for objective in objectives:
      values = _tuning_values(finished, regime, objective)
      entry = {"candidates": [
          {"setting": setting, "validation_accuracy": v}
          for setting, v in zip(
              plan.candidates(objective, base, regime.candidates), values)],
               "chosen": _choice(values)}
      entry["confirm"] = (_confirmed(finished, regime, objective)
                          if entry["chosen"] is not None else None)
      row["objectives"][objective] = entry
    ce = row["objectives"]["ce"]["confirm"]
    row["ce_plateau"] = plan.plateau(ce) if ce else None
    for objective, entry in row["objectives"].items():
      if objective != "ce" and ce and entry["confirm"]:
        entry["test_accuracy"] = stats_lib.paired(
            [r["test_accuracy"] for r in entry["confirm"]],
            [r["test_accuracy"] for r in ce])
  family, primary = _correct(rows, objectives)
  for regime in (r for r in regimes if capacity.get(r.name)):
    rows[regime.name]["capacity"] = _capacity(finished, base, regime,
                                              rows[regime.name], widths)
  complete = primary and all("test_accuracy" in e for row in rows.values()
                             for e in row.get("capacity", {}).values())
  return {"complete": complete,
          "protocol": {"candidates": regimes[0].candidates,
                       "tuning_seeds": list(plan.TUNING_SEEDS),
                       "fresh_seeds": list(plan.FRESH_SEEDS),
                       "search": {k: list(v) for k, v in plan.SEARCH.items()},
                       "term_weights": "0.1x to 10x the default, log-uniform",
                       "choice": "highest mean best validation accuracy",
                       "holm_family": family,
                       **({"capacity": {
                           "widths": list(widths),
                           "seeds": list(plan.CAPACITY_SEEDS),
                           "per_class": [r.per_class for r in regimes
                                         if r.name in capacity]}}
                          if widths else {})},
          "base": config_lib.identity(base),
          "regimes": rows,
          "runs": ledger}


def _ledger(out, regimes, objectives, capacity, recorded) -> dict[str, Any]:
  """Every finished run's values by :attr:`plan.Run.key`, including those whose
  regime or objective is not complete yet (``capacity``: the widths of each
  regime's capacity analysis, by regime name)."""
  runs = (plan.tuning_runs(regimes, objectives)
          + plan.confirm_runs(regimes, objectives)
          + [run for r in regimes
             for run in plan.capacity_runs([r], capacity.get(r.name, ()))])
  found = {run.key: _record(out, run, recorded) for run in runs}
  return {k: v for k, v in found.items() if v is not None}
