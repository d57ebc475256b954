"""Reproduction harness: objectives (CE, the Gini/KL terms, the baselines)
trained over the same seeds and compared with paired statistics.

``run_comparison`` trains every (objective, seed) pair through
:func:`discrim_jax.train.train_and_evaluate` in ``WORKDIR/OBJECTIVE/seedN``
(finished runs, those with a ``summary.json``, are not redone; interrupted
ones resume from their checkpoints), then writes into ``WORKDIR``:

* ``results.md`` and ``results.json``: mean ± std test accuracy per
  objective, the paired difference to CE (same seeds) with a 95% t-interval,
  best-validation accuracy, the final training Gini and KL values, the test-set
  Gini impurity of the features, images/s; and the same statistics for each
  representation metric (kNN and linear-probe accuracy, NC1, test-set Gini);
* ``accuracy.png``, ``curves.png``, ``impurity_hist.png``, ``heatmap.png`` and
  ``representation.png`` (each metric's paired difference to CE).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import copy
import json
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from discrim_jax import config_lib
from discrim_jax import data as data_lib
from discrim_jax import stats as stats_lib
from discrim_jax import report
from discrim_jax import runtime
from discrim_jax import train
from discrim_jax import workdir as workdir_lib


# The representation metrics a run's test record holds (train.py), by prefix.
REPRESENTATION_METRICS = ("knn", "probe", "nc1", "gini")


def train_all(config, workdir: epath.Path, objectives, seeds,
              dataset: data_lib.Dataset | None = None,
              vmap_seeds: bool = False) -> None:
  """Trains the runs that have no summary yet (with ``vmap_seeds``, the
  missing seeds of an objective together, in one vmapped step). ``seeds``:
  a count (seeds 0..N-1) or the seeds themselves. With
  ``config.resample_subset`` each seed reads its own training subset, so a
  ``dataset`` passed in must be the one of every seed's draw (None: each run
  loads its own)."""
  seeds = range(seeds) if isinstance(seeds, int) else seeds
  for objective in objectives:
    todo = []
    for seed in seeds:
      out = workdir_lib.run_dir(workdir, objective, seed)
      if workdir_lib.finished(out):
        logging.info("%s seed %d: done already, skipped", objective, seed)
      else:
        todo.append(seed)
    if not todo:
      continue
    run_config = copy.deepcopy(config)
    with run_config.unlocked():
      run_config.objective = objective
    if dataset is None and not run_config.get("resample_subset", False):
      dataset = runtime.load_dataset_of(run_config)  # one for every seed
    groups = [todo] if vmap_seeds else [[seed] for seed in todo]
    for group in groups:
      logging.info("training %s seeds %s", objective, group)
      train.train_and_evaluate_seeds(
          run_config, {seed: str(workdir_lib.run_dir(workdir, objective, seed))
                       for seed in group},
          dataset=dataset)


def summarize(workdir: epath.Path, objectives, seeds: int) -> dict[str, Any]:
  """Aggregates the runs' summaries into a results dict."""
  rows = {}
  for objective in objectives:
    runs = []
    for seed in range(seeds):
      out = workdir_lib.run_dir(workdir, objective, seed)
      summary = workdir_lib.read_summary(out)
      records = workdir_lib.read_metrics(out)
      last_train = [r for r in records if r["split"] == "train"][-1]
      test = [r for r in records if r["split"] == "test"][-1]
      runs.append({
          "seed": seed,
          "test_accuracy": summary["test_accuracy"],
          "best_validation_accuracy": summary["best_validation_accuracy"],
          "images_per_s": summary["train_images_per_s"],
          "final_gini": {k[5:]: v for k, v in last_train.items()
                         if k.startswith("gini/")},
          "final_kl": {k[3:]: v for k, v in last_train.items()
                       if k.startswith("kl/")},
          "test_gini": {k[5:]: v for k, v in test.items() if k.startswith("gini/")},
          "test_examples": int(test["num_examples"]) if "num_examples" in test else None,
          # Test accuracy and the representation metrics, by one name each.
          "metrics": {"test_accuracy": summary["test_accuracy"],
                      **{k: v for k, v in test.items()
                         if k.split("/")[0] in REPRESENTATION_METRICS}},
      })
    acc = np.array([r["test_accuracy"] for r in runs])
    rows[objective] = {
        "runs": runs,
        "test_accuracy_mean": float(acc.mean()),
        "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "best_validation_accuracy_mean": float(np.mean(
            [r["best_validation_accuracy"] for r in runs])),
        "images_per_s_mean": _mean_or_none([r["images_per_s"] for r in runs]),
    }
  for objective, row in rows.items():
    names = [k for k in row["runs"][0]["metrics"]
             if all(k in r["metrics"] for r in row["runs"])]
    row["metrics"] = {}
    for name in names:
      values = np.array([r["metrics"][name] for r in row["runs"]])
      stats = {"mean": float(values.mean()),
               "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
      if "ce" in rows and all(name in r["metrics"] for r in rows["ce"]["runs"]):
        base = np.array([r["metrics"][name] for r in rows["ce"]["runs"]])
        stats.update(stats_lib.paired(values, base))
      row["metrics"][name] = stats
  _primary_comparisons(rows)
  test_examples = [r["test_examples"] for row in rows.values() for r in row["runs"]]
  return {"seeds": seeds, "objectives": list(objectives), "results": rows,
          "test_examples": min(test_examples) if None not in test_examples else None}


def _primary_comparisons(rows: dict[str, Any]) -> None:
  """Each objective's test accuracy against CE: the table's family of
  primary comparisons, Holm-corrected together (``p_holm``); also at the
  top level of each row."""
  if "ce" not in rows:
    return
  others = [o for o in rows if o != "ce"]
  adjusted = stats_lib.holm([rows[o]["metrics"]["test_accuracy"]["p_t"]
                             for o in others])
  for objective, p in zip(others, adjusted):
    accuracy = rows[objective]["metrics"]["test_accuracy"]
    accuracy["p_holm"] = p
    for key in ("diff_to_ce_mean", "diff_to_ce_ci95", "p_t", "p_sign_flip",
                "p_holm"):
      rows[objective][key] = accuracy[key]


def _mean_or_none(values: list[float | None]) -> float | None:
  """The mean, or None when any run has no figure (JSON has no NaN)."""
  return None if any(v is None for v in values) else float(np.mean(values))


def run_comparison(config, workdir: str, *, objectives=tuple(config_lib.OBJECTIVES),
                   seeds: int = 5, dataset: data_lib.Dataset | None = None,
                   vmap_seeds: bool = False) -> dict[str, Any]:
  """Trains what is missing, then writes the table, JSON and plots.

  ``vmap_seeds`` trains an objective's seeds together with
  :func:`discrim_jax.train.train_and_evaluate_seeds` (same results as one
  after another, one compile).
  """
  unknown = []
  for o in objectives:
    try:
      config_lib.objective_terms(o)
    except config_lib.ConfigError:
      unknown.append(o)
  if unknown:
    raise config_lib.ConfigError(
        f"unknown objective(s) {unknown}; use some of "
        f"{list(config_lib.OBJECTIVES)}, or several joined by '+' (--objectives=...)")
  if seeds < 1:
    raise config_lib.ConfigError(f"--seeds must be >= 1, got {seeds}")
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  train_all(config, out, objectives, seeds, dataset, vmap_seeds)
  results = summarize(out, objectives, seeds)
  table = report.markdown_table(results)
  (out / "results.md").write_text(table)
  (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False)
                                    + "\n")
  report.plot_comparison(out, results)
  return results
