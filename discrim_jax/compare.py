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
from discrim_jax import steps
from discrim_jax import train
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import objective_name


# The representation metrics a run's test record holds (train.py), by prefix.
REPRESENTATION_METRICS = ("knn", "probe", "nc1", "gini")
_METRIC_NAMES = {"test_accuracy": "test accuracy (%)", "knn": "kNN accuracy (%)",
                 "probe": "linear-probe accuracy (%)", "nc1": "NC1 (lower: more collapsed)",
                 "gini": "test-set Gini impurity"}


def _metric_label(name: str) -> str:
  kind, _, layer = name.partition("/")
  return _METRIC_NAMES.get(kind, kind) + (f" at {layer}" if layer else "")


def _is_percent(name: str) -> bool:
  return name.split("/")[0] in ("test_accuracy", "knn", "probe")


def run_dir(workdir: epath.Path, objective: str, seed: int) -> epath.Path:
  return workdir / objective / f"seed{seed}"


def save_figure(fig, path: epath.Path) -> None:
  """A figure as PNG at ``path`` (local or remote)."""
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)


def _load_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open("rb") as f:
    return dict(np.load(f))


def _read_jsonl(path: epath.Path) -> list[dict[str, Any]]:
  return workdir_lib.read_records(path)


def finished(out: epath.Path) -> bool:
  """A run with a readable ``summary.json`` (a torn one is rewritten by
  running the command again: the run restores its last checkpoint and
  only tests)."""
  try:
    json.loads((out / "summary.json").read_text())
  except (OSError, ValueError):
    return False
  return True


def train_all(config, workdir: epath.Path, objectives, seeds: int,
              dataset: data_lib.Dataset | None = None,
              vmap_seeds: bool = False) -> None:
  """Trains the runs that have no summary yet (with ``vmap_seeds``, the
  missing seeds of an objective together, in one vmapped step)."""
  for objective in objectives:
    todo = []
    for seed in range(seeds):
      out = run_dir(workdir, objective, seed)
      if finished(out):
        logging.info("%s seed %d: done already, skipped", objective, seed)
      else:
        todo.append(seed)
    if not todo:
      continue
    run_config = copy.deepcopy(config)
    with run_config.unlocked():
      run_config.objective = objective
    if dataset is None:
      dataset = steps.load_dataset(run_config)
    groups = [todo] if vmap_seeds else [[seed] for seed in todo]
    for group in groups:
      logging.info("training %s seeds %s", objective, group)
      train.train_and_evaluate_seeds(
          run_config, {seed: str(run_dir(workdir, objective, seed)) for seed in group},
          dataset=dataset)


def summarize(workdir: epath.Path, objectives, seeds: int) -> dict[str, Any]:
  """Aggregates the runs' summaries into a results dict."""
  rows = {}
  for objective in objectives:
    runs = []
    for seed in range(seeds):
      out = run_dir(workdir, objective, seed)
      summary = workdir_lib.read_json(out / "summary.json")
      records = _read_jsonl(out / "metrics.jsonl")
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


def _format(value: float | None, spec: str) -> str:
  return "–" if value is None else format(value, spec)


def _mean_dict(dicts: list[dict[str, float]]) -> str:
  if not dicts or not dicts[0]:
    return "–"
  return ", ".join(f"{np.mean([d[k] for d in dicts]):.3f}" for k in sorted(dicts[0]))


def markdown_table(results: dict[str, Any]) -> str:
  lines = [
      "| objective | test acc. (mean ± std) | Δ vs CE [95% CI] | p (Holm) | p (sign flip) "
      "| best val. acc. | final train Gini | final train KL | test-set Gini | images/s |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for objective, row in results["results"].items():
    runs = row["runs"]
    if "diff_to_ce_mean" in row and objective != "ce":
      diff = f"{100 * row['diff_to_ce_mean']:+.2f}"
      if row["diff_to_ce_ci95"] is not None:
        lo, hi = row["diff_to_ce_ci95"]
        diff += f" [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    else:
      diff = "–"
    lines.append(
        f"| {objective_name(objective)} "
        f"| {100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f} "
        f"| {diff} | {_format(row.get('p_holm'), '.3f')} "
        f"| {_format(row.get('p_sign_flip'), '.3f')} "
        f"| {100 * row['best_validation_accuracy_mean']:.2f} "
        f"| {_mean_dict([r['final_gini'] for r in runs])} "
        f"| {_mean_dict([r['final_kl'] for r in runs])} "
        f"| {_mean_dict([r['test_gini'] for r in runs])} "
        f"| {_format(row['images_per_s_mean'], '.0f')} |")
  lines += ["", *metrics_table(results), ""]
  warning = stats_lib.caveat(results["seeds"], results.get("test_examples"))
  if warning:
    lines.append(f"**{warning}**")
    lines.append("")
  lines.append(f"Accuracies in %, {results['seeds']} seed(s) per objective; Δ is "
               "the paired difference to CE over the same seeds (t-interval); "
               "p (Holm): the t-test's p-value, Holm-corrected over this "
               "table's comparisons with CE; p (sign flip): the exact "
               "sign-flip permutation test (with n seeds never below 2/2^n). "
               "Gini/KL columns: the loss layer(s); train values are the last "
               "logged interval, test-set Gini is the feature impurity over the "
               "test split for the best-validation checkpoint.")
  return "\n".join(lines) + "\n"


def _cell(stats: dict[str, Any], scale: float, spec: str, diff: bool) -> str:
  text = f"{format(scale * stats['mean'], spec)} ± {format(scale * stats['std'], spec)}"
  if diff and "diff_to_ce_mean" in stats:
    text += f"; Δ {scale * stats['diff_to_ce_mean']:+{spec}}"
    if stats["diff_to_ce_ci95"] is not None:
      lo, hi = stats["diff_to_ce_ci95"]
      text += f" [{scale * lo:+{spec}}, {scale * hi:+{spec}}]"
  return text


def distinct_metrics(rows: dict[str, Any]) -> list[str]:
  """The metrics every objective has, less a layer whose values equal an
  earlier layer's in every run (a ResNet's stage4 pools to pre_logits)."""
  objectives = list(rows)
  names = [n for n in rows[objectives[0]]["metrics"]
           if all(n in rows[o]["metrics"] for o in objectives)]
  shown = []
  for name in names:
    kind = name.split("/")[0]
    twin = next((n for n in shown if n.split("/")[0] == kind and all(
        [r["metrics"][n] for r in rows[o]["runs"]]
        == [r["metrics"][name] for r in rows[o]["runs"]] for o in objectives)),
                None)
    if twin is None:
      shown.append(name)
  return shown


def metrics_table(results: dict[str, Any]) -> list[str]:
  """Markdown lines: one row per metric, one column per objective, each cell
  ``mean ± std; Δ vs CE [95% CI]``. A layer whose values equal another's in
  every run (a ResNet's stage4 pools to pre_logits) is shown once."""
  rows = results["results"]
  objectives = list(rows)
  shown = distinct_metrics(rows)
  if shown == ["test_accuracy"]:
    return []
  lines = ["| metric | " + " | ".join(objective_name(o) for o in objectives) + " |",
           "|---" * (len(objectives) + 1) + "|"]
  for name in shown:
    scale, spec = (100.0, ".2f") if _is_percent(name) else (1.0, ".3f")
    lines.append(f"| {_metric_label(name)} | " + " | ".join(
        _cell(rows[o]["metrics"][name], scale, spec, o != "ce")
        for o in objectives) + " |")
  return lines


def plot(workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """Writes the four figures; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  objectives = results["objectives"]
  seeds = results["seeds"]
  rows = results["results"]
  names = [objective_name(o) for o in objectives]
  paths = []

  fig, ax = plt.subplots(figsize=(5, 3.5))
  means = [100 * rows[o]["test_accuracy_mean"] for o in objectives]
  stds = [100 * rows[o]["test_accuracy_std"] for o in objectives]
  ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
  for i, o in enumerate(objectives):
    ax.scatter([i] * seeds, [100 * r["test_accuracy"] for r in rows[o]["runs"]],
               color="k", s=8, zorder=3)
  lo = min(min(100 * r["test_accuracy"] for r in rows[o]["runs"]) for o in objectives)
  hi = max(min(100, m + s) for m, s in zip(means, stds))
  ax.set_ylim(lo - 1, hi + 0.5)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"Test accuracy, {seeds} seed(s), mean ± std")
  fig.tight_layout()
  paths.append(workdir / "accuracy.png")
  save_figure(fig, paths[-1])
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for o, name in zip(objectives, names):
    for split, ax, key in (("train", axes[0], "ce"),
                           ("validation", axes[1], "accuracy")):
      curves = []
      for seed in range(seeds):
        records = _read_jsonl(run_dir(workdir, o, seed) / "metrics.jsonl")
        curves.append([(r["step"], r[key]) for r in records if r["split"] == split])
      steps = [s for s, _ in curves[0]]
      values = np.mean([[v for _, v in c] for c in curves], axis=0)
      ax.plot(steps, values, label=name)
  axes[0].set(title="training cross-entropy (mean over seeds)", xlabel="step")
  axes[1].set(title="validation accuracy (mean over seeds)", xlabel="step")
  axes[1].legend()
  fig.tight_layout()
  paths.append(workdir / "curves.png")
  save_figure(fig, paths[-1])
  plt.close(fig)

  shown = [o for o in ("ce", "gini_kl") if o in objectives] or objectives[:2]
  matrices = {o: _load_npz(run_dir(workdir, o, 0) / "feature_class_matrix.npz")
              for o in shown}
  layer = sorted(matrices[shown[0]])[0]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for o in shown:
    p = matrices[o][layer]
    ax.hist(1 - (p ** 2).sum(axis=1), bins=30, range=(0, 1), alpha=0.6,
            label=objective_name(o))
  ax.set(xlabel="per-feature Gini impurity (test set)", ylabel="features",
         title=f"Feature impurity at {layer} (seed 0)")
  ax.legend()
  fig.tight_layout()
  paths.append(workdir / "impurity_hist.png")
  save_figure(fig, paths[-1])
  plt.close(fig)

  fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4))
  axes = np.atleast_1d(axes)
  rng = np.random.default_rng(0)
  for ax, o in zip(axes, shown):
    p = matrices[o][layer]
    sample = rng.choice(p.shape[0], size=min(32, p.shape[0]), replace=False)
    sample = sample[np.argsort(p[sample].argmax(axis=1), kind="stable")]
    im = ax.imshow(p[sample], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"{objective_name(o)}: P[feature, class]",
           xlabel="class", ylabel=f"{len(sample)} sampled features")
  fig.colorbar(im, ax=list(axes))
  paths.append(workdir / "heatmap.png")
  save_figure(fig, paths[-1])
  plt.close(fig)

  others = [o for o in objectives if o != "ce"]
  metrics = [n for n in distinct_metrics(rows)
             if all("diff_to_ce_mean" in rows[o]["metrics"].get(n, {})
                    for o in others)]
  if "ce" in rows and others and metrics:
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2),
                             squeeze=False)
    for ax, name in zip(axes[0], metrics):
      scale = 100.0 if _is_percent(name) else 1.0
      for i, o in enumerate(others):
        stats = rows[o]["metrics"][name]
        mean = scale * stats["diff_to_ce_mean"]
        ci = stats["diff_to_ce_ci95"]
        err = None if ci is None else [[mean - scale * ci[0]], [scale * ci[1] - mean]]
        ax.errorbar([i], [mean], yerr=err, fmt="o", capsize=4)
      ax.axhline(0, color="k", lw=0.8)
      ax.set_xticks(range(len(others)), [objective_name(o) for o in others],
                    rotation=45, ha="right", fontsize=7)
      ax.set_title("Δ " + _metric_label(name), fontsize=8)
    fig.suptitle(f"Paired difference to CE, {seeds} seed(s), 95% t-intervals",
                 fontsize=9)
    fig.tight_layout()
    paths.append(workdir / "representation.png")
    save_figure(fig, paths[-1])
    plt.close(fig)
  return paths


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
  table = markdown_table(results)
  (out / "results.md").write_text(table)
  (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False)
                                    + "\n")
  plot(out, results)
  return results
