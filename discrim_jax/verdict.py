"""The verdict: every objective tuned alike on validation, then confirmed on
fresh seeds against tuned CE (issue #28).

For each regime (a data set at some images per class, trained a fixed number
of steps), the protocol is fixed before any run:

1. **Tuning, the same budget for every objective**: ``NUM_CANDIDATES``
   settings x ``TUNING_SEEDS``. Candidate 0 is the app's defaults; the others
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

Runs live in ``WORKDIR/REGIME/tune/cK/OBJECTIVE/seedS`` and
``WORKDIR/REGIME/confirm/OBJECTIVE/seedS``; finished runs are never redone, so
the whole protocol resumes by rerunning its command. ``verdict.json`` keeps
every run's seed and accuracies, so each figure recomputes from it.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import dataclasses
import json
import math
import zlib
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from discrim_jax import compare
from discrim_jax import config_lib
from discrim_jax import report
from discrim_jax import stats as stats_lib
from discrim_jax import study
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import ConfigError

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
  ``steps`` steps of ``batch``."""
  name: str
  per_class: int
  steps: int = study.STEPS
  batch: int = study.BATCH


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def candidates(objective: str, base) -> list[dict[str, float]]:
  """The tuning settings of ``objective`` (dotted fields and values):
  candidate 0 is ``base``'s own, the rest drawn from :data:`SEARCH`."""
  fields = list(SEARCH) + [f for t in config_lib.objective_terms(objective)
                           for f in TERM_WEIGHTS[t]]
  ranges = {f: SEARCH.get(f) or (0.1 * _get(base, f), 10 * _get(base, f))
            for f in fields}
  rng = np.random.default_rng(zlib.crc32(objective.encode()))
  out = [{f: float(_get(base, f)) for f in fields}]
  for _ in range(NUM_CANDIDATES - 1):
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


def tuning_runs(regimes, objectives) -> list[Run]:
  return [Run(r.name, "tune", o, k, s) for r in regimes for o in objectives
          for k in range(NUM_CANDIDATES) for s in TUNING_SEEDS]


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


def _validation(out, run: Run) -> float | None:
  folder = run.folder(out)
  if not workdir_lib.finished(folder):
    return None
  return workdir_lib.read_summary(folder)["best_validation_accuracy"]


def _tuning_values(out, regime: Regime, objective: str) -> list[list]:
  """Each candidate's best validation accuracies (None: not finished)."""
  return [[_validation(out, Run(regime.name, "tune", objective, k, s))
           for s in TUNING_SEEDS] for k in range(NUM_CANDIDATES)]


def _choice(values: list[list]) -> int | None:
  if any(None in v for v in values):
    return None
  return int(np.argmax([float(np.mean(v)) for v in values]))  # first of ties


def choose(out, regime: Regime, objective: str) -> int | None:
  """The chosen candidate (validation only), or None until tuning is done."""
  return _choice(_tuning_values(out, regime, objective))


def _train(out, config, run: Run) -> None:
  compare.train_all(config, run.folder(out).parent.parent, [run.objective],
                    [run.seed])


def run_verdict(base, workdir: str, regimes: list[Regime],
                objectives=config_lib.COMPARED_OBJECTIVES,
                shard: tuple[int, int] | None = None, *,
                train: bool = True, widths: tuple[float, ...] = ()
                ) -> dict[str, Any] | None:
  """Trains what is missing (tuning first, then each objective's chosen
  setting on the fresh seeds), then writes ``verdict.json``,
  ``verdict.md`` and the figures, and returns the results. With
  ``shard=(i, n)`` trains every n-th missing run from the i-th; a shard
  that finds confirmation waiting on another's tuning stops (rerunning it
  later goes on), and only a shard that finds every run finished writes the
  results: others return None. ``train=False`` trains nothing and writes
  what is finished so far (``complete`` false until every run is).
  ``widths``: the capacity analysis's width multipliers, trained after a
  regime's confirmation (CE and CE+Gini+KL, :data:`CAPACITY_SEEDS`)."""
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  if "ce" not in objectives:
    raise ConfigError("the verdict compares with CE: --objectives must "
                      f"include ce, got {list(objectives)}")
  if widths and not set(CAPACITY_OBJECTIVES) <= set(objectives):
    raise ConfigError(f"--capacity compares {' and '.join(CAPACITY_OBJECTIVES)}: "
                      f"--objectives must include both, got {list(objectives)}")
  out = epath.Path(workdir)
  num_classes = runtime.load_dataset_of(base).num_classes
  configs = {r.name: regime_config(base, r, num_classes) for r in regimes}
  by_name = {r.name: r for r in regimes}
  out.mkdir(parents=True, exist_ok=True)
  for regime in regimes if train else []:  # one regime, then the next
    runs = (tuning_runs([regime], objectives)
            + confirm_runs([regime], objectives)
            + capacity_runs([regime], widths))
    for run in study.shard_of(runs, shard):
      if workdir_lib.finished(run.folder(out)):
        continue
      k, phase = run.candidate, run.phase
      if phase != "tune":
        k = choose(out, by_name[run.regime], run.objective)
        if k is None:
          logging.info("%s: tuning of %s not finished; its confirmation waits",
                       run.regime, run.objective)
          continue
      setting = candidates(run.objective, base)[k]
      logging.info("%s %s %s candidate %d seed %d%s: %s", run.regime, phase,
                   run.objective, k, run.seed,
                   "" if run.width is None else f" width {run.width:g}", setting)
      _train(out, run_config(configs[run.regime], run, setting), run)
  results = summarize(out, base, regimes, objectives, widths)
  if shard is not None and train and not results["complete"]:
    return None  # the shard that finishes the last run writes the results
  workdir_lib.write_atomically(
      out / "verdict.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
  workdir_lib.write_atomically(out / "verdict.md", markdown(results))
  plot(out, results)
  return results


def _confirmed(out, regime: Regime, objective: str, seeds=None,
               width: float | None = None) -> list[dict[str, Any]] | None:
  runs = []
  phase = "confirm" if width is None else "capacity"
  for seed in FRESH_SEEDS if seeds is None else seeds:
    folder = Run(regime.name, phase, objective, None, seed, width).folder(out)
    if not workdir_lib.finished(folder):
      return None
    s = workdir_lib.read_summary(folder)
    curve = [[r["step"], r["accuracy"]] for r in workdir_lib.read_records(
        folder / "metrics.jsonl") if r["split"] == "validation"]
    runs.append({"seed": seed, "test_accuracy": s["test_accuracy"],
                 "best_validation_accuracy": s["best_validation_accuracy"],
                 "validation_curve": curve})
  return runs


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
          "plateaued": gain < PLATEAU_POINTS}


def _capacity(out, base, regime: Regime, row, widths) -> dict[str, Any]:
  """Per width (the base width from the confirmation runs): CE's and the
  loss's runs on :data:`CAPACITY_SEEDS` and their paired comparison, with
  Holm over the widths once all are in."""
  base_width = float(base.model_kwargs.get("width_multiplier", 1.0))
  table = {}
  for w in (base_width, *widths):
    runs = {}
    for o in CAPACITY_OBJECTIVES:
      if w == base_width:
        confirmed = row["objectives"][o]["confirm"]
        runs[o] = confirmed and [r for r in confirmed if r["seed"] in CAPACITY_SEEDS]
      else:
        runs[o] = _confirmed(out, regime, o, CAPACITY_SEEDS, w)
    entry = table[f"{w:g}"] = {"runs": runs}
    if all(runs.values()):
      ce, loss = (runs[o] for o in CAPACITY_OBJECTIVES)
      entry["test_accuracy"] = stats_lib.paired(
          [r["test_accuracy"] for r in loss], [r["test_accuracy"] for r in ce])
  done = [e["test_accuracy"] for e in table.values() if "test_accuracy" in e]
  if len(done) == len(table):
    for t, p in zip(done, stats_lib.holm([t["p_t"] for t in done])):
      t["p_holm"] = p
  return table


def summarize(out, base, regimes, objectives, widths=()) -> dict[str, Any]:
  """Per regime and objective: every candidate's validation accuracies, the
  choice, the confirmation runs, and the paired comparison with CE; with
  ``widths``, the capacity analysis."""
  rows: dict[str, Any] = {}
  for regime in regimes:
    row = rows[regime.name] = {"regime": dataclasses.asdict(regime),
                               "objectives": {}}
    for objective in objectives:
      values = _tuning_values(out, regime, objective)
      entry = {"candidates": [
          {"setting": setting, "validation_accuracy": v}
          for setting, v in zip(candidates(objective, base), values)],
               "chosen": _choice(values)}
      entry["confirm"] = (_confirmed(out, regime, objective)
                          if entry["chosen"] is not None else None)
      row["objectives"][objective] = entry
    ce = row["objectives"]["ce"]["confirm"]
    row["ce_plateau"] = plateau(ce) if ce else None
    for objective, entry in row["objectives"].items():
      if objective != "ce" and ce and entry["confirm"]:
        entry["test_accuracy"] = stats_lib.paired(
            [r["test_accuracy"] for r in entry["confirm"]],
            [r["test_accuracy"] for r in ce])
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
  for regime in regimes if widths else []:
    rows[regime.name]["capacity"] = _capacity(out, base, regime,
                                              rows[regime.name], widths)
  complete = primary and all("test_accuracy" in e for row in rows.values()
                             for e in row.get("capacity", {}).values())
  return {"complete": complete,
          "protocol": {"candidates": NUM_CANDIDATES,
                       "tuning_seeds": list(TUNING_SEEDS),
                       "fresh_seeds": list(FRESH_SEEDS),
                       "search": {k: list(v) for k, v in SEARCH.items()},
                       "term_weights": "0.1x to 10x the default, log-uniform",
                       "choice": "highest mean best validation accuracy",
                       "holm_family": len(family),
                       **({"capacity": {"widths": list(widths),
                                        "seeds": list(CAPACITY_SEEDS)}}
                          if widths else {})},
          "regimes": rows}


def _setting(entry) -> str:
  if entry["chosen"] is None:
    return "tuning"
  setting = entry["candidates"][entry["chosen"]]["setting"]
  return ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in setting.items())


def markdown(results: dict[str, Any]) -> str:
  """One table per regime: the tuned setting, the confirmation's test
  accuracy and its paired comparison with tuned CE."""
  family = results["protocol"]["holm_family"]
  lines = ["Each objective tuned on validation with the same budget "
           f"({results['protocol']['candidates']} settings x "
           f"{len(TUNING_SEEDS)} seeds), then trained on "
           f"{len(FRESH_SEEDS)} fresh seeds; Δ: paired difference to tuned "
           "CE on test, 95% t-interval; p (Holm) over the "
           f"{family} primary comparisons.", ""]
  if not results["complete"]:
    lines[-1:] = ["", f"**Not complete**: runs are missing. Until every one "
                  f"of the {family} primary comparisons is in, the p (Holm) "
                  "column gives Bonferroni's p over all of them (≥ Holm's).", ""]
  for name, row in results["regimes"].items():
    lines += [f"## {name}", "",
              "| objective | tuned setting | test acc. (%) | Δ to CE (points) "
              "| p (t) | p (Holm) | p (sign flip) |", "|---|---|---|---|---|---|---|"]
    for objective, entry in row["objectives"].items():
      runs = entry["confirm"]
      acc = (f"{100 * np.mean([r['test_accuracy'] for r in runs]):.2f} ± "
             f"{100 * np.std([r['test_accuracy'] for r in runs], ddof=1):.2f}"
             if runs else "–")
      t = entry.get("test_accuracy")
      if t and t["diff_to_ce_ci95"]:
        lo, hi = t["diff_to_ce_ci95"]
        diff = f"{100 * t['diff_to_ce_mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        ps = [f"{t[k]:.3g}" if t.get(k) is not None else "–"
              for k in ("p_t", "p_holm" if "p_holm" in t else "p_bonferroni",
                        "p_sign_flip")]
      else:
        diff, ps = "–", ["–"] * 3
      lines.append(f"| {config_lib.objective_name(objective)} | "
                   f"{_setting(entry)} | {acc} | {diff} | " + " | ".join(ps) + " |")
    lines.append("")
    if row.get("capacity"):
      lines += _capacity_lines(row["capacity"])
    p = row.get("ce_plateau")
    if p:
      lines += [f"Convergence: tuned CE's mean validation accuracy rose "
                f"{p['last_sixth_gain_points']:+.2f} points from step "
                f"{p['from_step']} to {p['steps'][-1]}: "
                + ("plateaued" if p["plateaued"] else "**not plateaued**")
                + f" (the rule: under {PLATEAU_POINTS} points over the last "
                "sixth of the steps).", ""]
  return "\n".join(lines)


def _capacity_lines(table) -> list[str]:
  lines = [f"Capacity (secondary; {len(CAPACITY_SEEDS)} fresh seeds, each "
           "objective at its tuned setting; p (Holm) over the widths):", "",
           "| width | CE (%) | CE+Gini+KL (%) | Δ (points) | p (t) | p (Holm) |",
           "|---|---|---|---|---|---|"]
  for w, entry in table.items():
    accs = [f"{100 * np.mean([r['test_accuracy'] for r in runs]):.2f}"
            if runs else "–" for runs in entry["runs"].values()]
    t = entry.get("test_accuracy")
    if t and t["diff_to_ce_ci95"]:
      lo, hi = t["diff_to_ce_ci95"]
      diff = f"{100 * t['diff_to_ce_mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
      ps = [f"{t[k]:.3g}" if t.get(k) is not None else "–" for k in ("p_t", "p_holm")]
    else:
      diff, ps = "–", ["–", "–"]
    lines.append(f"| {w} | {' | '.join(accs)} | {diff} | {' | '.join(ps)} |")
  return lines + [""]


def plot(out: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """``verdict_forest.png`` (every primary Δ with its 95% and its
  simultaneous interval) and ``verdict_curves.png`` (the confirmation runs'
  validation accuracy over training), once there is something to draw."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [(r, o, e) for r, row in results["regimes"].items()
          for o, e in row["objectives"].items() if e.get("test_accuracy")
          and e["test_accuracy"]["diff_to_ce_ci95"]]
  paths = []
  if rows:
    paths.append(_forest(plt, out, rows, results))
  curves = {r: {o: e["confirm"] for o, e in row["objectives"].items()
                if e.get("confirm")} for r, row in results["regimes"].items()}
  curves = {r: c for r, c in curves.items() if c}
  if curves:
    paths.append(_curves(plt, out, curves))
  return paths


def _forest(plt, out, rows, results) -> epath.Path:
  m = len(rows)
  fig, ax = plt.subplots(figsize=(7, 0.45 * m + 1.4))
  for y, (regime, objective, entry) in enumerate(reversed(rows)):
    ce = entry["test_accuracy"]
    lo, hi = (100 * v for v in ce["diff_to_ce_ci95"])
    slo, shi = (100 * v for v in entry["simultaneous_ci"])
    ax.plot([slo, shi], [y, y], color="0.6", lw=1)
    ax.plot([lo, hi], [y, y], color="C0", lw=3)
    p = ce.get("p_holm", ce.get("p_bonferroni"))
    survives = p is not None and p < 0.05
    ax.plot(100 * ce["diff_to_ce_mean"], y, "o", color="C3" if survives else "C0",
            mfc="C3" if survives else "white")
  ax.axvline(0, color="k", lw=0.8)
  ax.set_yticks(range(m))
  ax.set_yticklabels([f"{r}: {config_lib.objective_name(o)}"
                      for r, o, _ in reversed(rows)])
  ax.set_xlabel("test accuracy, difference to tuned CE (points)")
  family = results["protocol"]["holm_family"]
  ax.set_title(f"Paired Δ over {len(FRESH_SEEDS)} fresh seeds: 95% interval "
               f"(thick), simultaneous\nover the {family} comparisons (thin); "
               "red: p (Holm) < 0.05"
               + ("" if results["complete"] else
                  f" [{m} of {family} in: Bonferroni]"), fontsize=8)
  fig.tight_layout()
  report.save_figure(fig, out / "verdict_forest.png")
  plt.close(fig)
  return out / "verdict_forest.png"


def _curves(plt, out, curves) -> epath.Path:
  fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4),
                           squeeze=False)
  for ax, (regime, by_objective) in zip(axes[0], curves.items()):
    for i, (objective, runs) in enumerate(by_objective.items()):
      for r in runs:
        steps, acc = zip(*r["validation_curve"])
        ax.plot(steps, 100 * np.array(acc), color=f"C{i}", lw=0.5, alpha=0.3)
      mean = 100 * np.mean([[a for _, a in r["validation_curve"]] for r in runs],
                           axis=0)
      ax.plot(steps, mean, color=f"C{i}", lw=2,
              label=config_lib.objective_name(objective))
    ax.set_title(regime)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  report.save_figure(fig, out / "verdict_curves.png")
  plt.close(fig)
  return out / "verdict_curves.png"
