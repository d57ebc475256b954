"""The verdict's table and figures (``discrim_jax.verdict`` trains and
summarizes): ``verdict.md``, one table per regime with each objective's
tuned setting and its paired comparison with tuned CE, the capacity table
and the convergence line; ``verdict_forest.png``, every primary Δ with its
95% and simultaneous intervals; ``verdict_curves.png``, the confirmation
runs' validation accuracy over training. Everything comes from the results
``verdict.summarize`` returns (as kept in ``verdict.json``).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import math
import statistics
from typing import Any

from etils import epath
import numpy as np

from discrim_jax import config_lib
from discrim_jax import report


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
           f"{len(results['protocol']['tuning_seeds'])} seeds), then trained on "
           f"{len(results['protocol']['fresh_seeds'])} fresh seeds; Δ: paired "
           "difference to tuned "
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
      acc = _accuracy(entry["confirm"])
      t = entry.get("test_accuracy")
      diff, ps = _comparison(t, ("p_t", _holm_key(t), "p_sign_flip"))
      lines.append(f"| {config_lib.objective_name(objective)} | "
                   f"{_setting(entry)} | {acc} | {diff} | " + " | ".join(ps) + " |")
    lines.append("")
    if row.get("capacity"):
      lines += _capacity_lines(row["capacity"],
                               results["protocol"]["capacity"]["seeds"])
    p = row.get("ce_plateau")
    if p:
      lines += [f"Convergence: tuned CE's mean validation accuracy rose "
                f"{p['last_sixth_gain_points']:+.2f} points from step "
                f"{p['from_step']} to {p['steps'][-1]}: "
                + ("plateaued" if p["plateaued"] else "**not plateaued**")
                + f" (the rule: under {p['rule_points']} points over the last "
                "sixth of the steps).", ""]
  return "\n".join(lines)


def overview(named: dict[str, dict[str, Any]]) -> str:
  """One table over several verdicts' regimes (``named``: a data set's label,
  e.g. "Fashion-MNIST", to its results): per regime and objective the tuned
  setting, the confirmation's test accuracy and the paired Δ to tuned CE
  with its Holm-adjusted p; a Δ is bold only where that p is under 0.05."""
  lines = ["| data | objective | tuned setting | test acc. (%) "
           "| Δ to tuned CE (points) | p (Holm) |", "|---|---|---|---|---|---|"]
  for label, results in named.items():
    for row in results["regimes"].values():
      where = f"{label}, {row['regime']['per_class']} per class"
      for objective, entry in row["objectives"].items():
        acc = _accuracy(entry["confirm"])
        t = entry.get("test_accuracy")
        key = _holm_key(t)
        diff, (p,) = _comparison(t, (key,))
        if key == "p_holm" and t["p_holm"] < 0.05:
          diff = f"**{diff}**"
        if p != "–" and key == "p_bonferroni":
          p += " (Bonferroni: runs missing)"
        setting = _setting(entry) + (" (defaults)" if entry["chosen"] == 0 else "")
        lines.append(f"| {where} | {config_lib.objective_name(objective)} | "
                     f"{setting} | {acc} | {diff} | {p} |")
        where = ""
  return "\n".join(lines)


def _accuracy(runs) -> str:
  """The confirmation runs' mean test accuracy ± its standard deviation (%).
  Exactly rounded sums (``math.fsum``, ``statistics.stdev``): a mean such as
  91.115 sits on a rounding tie, where a summation order that another CPU's
  vector units choose could flip the last digit the tables show."""
  if not runs:
    return "–"
  return (f"{_mean_accuracy(runs)} ± "
          f"{100 * statistics.stdev([r['test_accuracy'] for r in runs]):.2f}")


def _mean_accuracy(runs) -> str:
  acc = [r["test_accuracy"] for r in runs]
  return f"{100 * math.fsum(acc) / len(acc):.2f}"


def _holm_key(t: dict[str, Any] | None) -> str:
  """Where a comparison's Holm p is: kept once the whole family is in,
  Bonferroni's p over the family (≥ Holm's) until then."""
  return "p_holm" if "p_holm" in (t or {}) else "p_bonferroni"


def _comparison(t: dict[str, Any] | None, p_keys) -> tuple[str, list[str]]:
  """A paired comparison's table cells: Δ in points with its 95% interval,
  and the p-values named by ``p_keys`` ("–" where missing)."""
  if not (t and t["diff_to_ce_ci95"]):
    return "–", ["–"] * len(p_keys)
  lo, hi = t["diff_to_ce_ci95"]
  diff = f"{100 * t['diff_to_ce_mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
  return diff, [f"{t[k]:.3g}" if t.get(k) is not None else "–" for k in p_keys]


def _capacity_lines(table, seeds) -> list[str]:
  lines = [f"Capacity (secondary; {len(seeds)} fresh seeds, each "
           "objective at its tuned setting; p (Holm) over the widths):", "",
           "| width | CE (%) | CE+Gini+KL (%) | Δ (points) | p (t) | p (Holm) "
           "| CE's last sixth (points) |",
           "|---|---|---|---|---|---|---|"]
  for w, entry in table.items():
    accs = [_mean_accuracy(runs) if runs else "–"
            for runs in entry["runs"].values()]
    diff, ps = _comparison(entry.get("test_accuracy"), ("p_t", "p_holm"))
    p = entry.get("ce_plateau")
    last = ("–" if p is None else f"{p['last_sixth_gain_points']:+.2f}, "
            + ("plateaued" if p["plateaued"] else "**not plateaued**"))
    lines.append(f"| {w} | {' | '.join(accs)} | {diff} | {' | '.join(ps)} | {last} |")
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
  ax.set_title(f"Paired Δ over {len(results['protocol']['fresh_seeds'])} "
               "fresh seeds: 95% interval "
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
