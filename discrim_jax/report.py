"""The harness's report: markdown tables and figures of the results that
``discrim_jax.compare`` and ``discrim_jax.study`` summarise (and of nothing
else: every number here is read from their results dicts or the runs'
records)."""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from typing import Any

from etils import epath
import numpy as np

from discrim_jax import stats as stats_lib
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import objective_name


_METRIC_NAMES = {"test_accuracy": "test accuracy (%)", "knn": "kNN accuracy (%)",
                 "probe": "linear-probe accuracy (%)", "nc1": "NC1 (lower: more collapsed)",
                 "gini": "test-set Gini impurity"}


def _metric_label(name: str) -> str:
  kind, _, layer = name.partition("/")
  return _METRIC_NAMES.get(kind, kind) + (f" at {layer}" if layer else "")


def _is_percent(name: str) -> bool:
  return name.split("/")[0] in ("test_accuracy", "knn", "probe")


def save_figure(fig, path: epath.Path) -> None:
  """A figure as PNG at ``path`` (local or remote)."""
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)


def _load_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open("rb") as f:
    return dict(np.load(f))


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


def _finish(plt, fig, path: epath.Path, tight: bool = True) -> epath.Path:
  """Lays out, saves and closes a figure; returns its path."""
  if tight:
    fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)
  return path


def plot_comparison(workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """Writes a comparison's figures; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return [path for figure in (_accuracy_figure, _curves_figure,
                              _impurity_figures, _representation_figure)
          for path in figure(plt, workdir, results)]


def _accuracy_figure(plt, workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """``accuracy.png``: test accuracy per objective, each seed's run a dot."""
  objectives, seeds, rows = (results["objectives"], results["seeds"],
                              results["results"])
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
  paths.append(_finish(plt, fig, workdir / "accuracy.png"))
  return paths


def _curves_figure(plt, workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """``curves.png``: training cross-entropy and validation accuracy by step."""
  objectives, seeds = results["objectives"], results["seeds"]
  names = [objective_name(o) for o in objectives]
  paths = []
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for o, name in zip(objectives, names):
    for split, ax, key in (("train", axes[0], "ce"),
                           ("validation", axes[1], "accuracy")):
      curves = []
      for seed in range(seeds):
        records = workdir_lib.read_metrics(workdir_lib.run_dir(workdir, o, seed))
        curves.append([(r["step"], r[key]) for r in records if r["split"] == split])
      steps = [s for s, _ in curves[0]]
      values = np.mean([[v for _, v in c] for c in curves], axis=0)
      ax.plot(steps, values, label=name)
  axes[0].set(title="training cross-entropy (mean over seeds)", xlabel="step")
  axes[1].set(title="validation accuracy (mean over seeds)", xlabel="step")
  axes[1].legend()
  paths.append(_finish(plt, fig, workdir / "curves.png"))
  return paths


def _impurity_figures(plt, workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """``impurity_hist.png`` and ``heatmap.png``: the feature-class matrix P of
  seed 0 for CE and the loss."""
  objectives = results["objectives"]
  paths = []
  shown = [o for o in ("ce", "gini_kl") if o in objectives] or objectives[:2]
  matrices = {o: _load_npz(workdir_lib.run_dir(workdir, o, 0)
                           / "feature_class_matrix.npz")
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
  paths.append(_finish(plt, fig, workdir / "impurity_hist.png"))

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
  paths.append(_finish(plt, fig, workdir / "heatmap.png", tight=False))
  return paths


def _representation_figure(plt, workdir: epath.Path, results: dict[str, Any]) -> list[epath.Path]:
  """``representation.png``: each metric's paired difference to CE."""
  objectives, seeds, rows = (results["objectives"], results["seeds"],
                              results["results"])
  paths = []
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
    paths.append(_finish(plt, fig, workdir / "representation.png"))
  return paths


_COLUMNS = (("test_accuracy", "test acc. (%)"), ("knn/pre_logits", "kNN (%)"),
            ("probe/pre_logits", "linear probe (%)"),
            ("nc1/pre_logits", "NC1"), ("gini/", "test-set Gini"))


def _find(metrics: dict[str, Any], prefix: str) -> dict[str, Any] | None:
  if prefix in metrics:
    return metrics[prefix]
  keys = sorted(k for k in metrics if k.startswith(prefix))
  return metrics[keys[0]] if keys else None


def _fmt(stats, percent: bool) -> str:
  if stats is None:
    return "–"
  scale, spec = (100.0, ".2f") if percent else (1.0, ".3f")
  text = f"{scale * stats['mean']:{spec}} ± {scale * stats['std']:{spec}}"
  if "diff_to_ce_mean" in stats:
    text += f"; Δ {scale * stats['diff_to_ce_mean']:+{spec}}"
    if stats["diff_to_ce_ci95"] is not None:
      lo, hi = stats["diff_to_ce_ci95"]
      text += f" [{scale * lo:+{spec}}, {scale * hi:+{spec}}]"
  if stats.get("p_holm") is not None:
    text += f", p_Holm {stats['p_holm']:.3f}"
  return text


def study_markdown(results: dict[str, Any]) -> str:
  lines = ["| cell | objective | " + " | ".join(c for _, c in _COLUMNS)
           + " | cell wall time |", "|---" * (len(_COLUMNS) + 3) + "|"]
  for name, cell in results["cells"].items():
    if not cell["finished"]:
      lines.append(f"| {name} | (not finished) |" + " |" * (len(_COLUMNS) + 1))
      continue
    for i, (objective, row) in enumerate(cell["objectives"].items()):
      cols = [_fmt(_find(row["metrics"], key), key in ("test_accuracy", "knn/pre_logits",
                                                        "probe/pre_logits"))
              for key, _ in _COLUMNS]
      wall = "" if i else (f"{cell['wall_time_s'] / 60:.0f} min"
                           if cell.get("runs_in", name) == name
                           else f"runs of {cell['runs_in']}")
      lines.append(f"| {name} | {objective_name(objective)} | "
                   + " | ".join(cols) + f" | {wall} |")
  lines += ["", f"{results['seeds']} seeds per objective and cell; mean ± std "
            "over seeds; Δ: paired difference to CE over the same seeds with "
            "its 95% t-interval (knob cells: CE of their regime's scarcity "
            "cell); p_Holm: the t-test's p-value, Holm-corrected over every "
            "comparison of test accuracy with CE in this study. "
            "Representation metrics on pre_logits; test-set Gini on "
            "the (first) loss layer. Wall time: the sum of the cell's runs."]
  warning = stats_lib.caveat(results["seeds"], None)
  if warning:
    lines += ["", f"**{warning}**"]
  return "\n".join(lines) + "\n"


def plot_study(out: epath.Path, results: dict[str, Any],
               lambdas: tuple[float, ...]) -> list[epath.Path]:
  """Writes a study's figures; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells_ = {k: v for k, v in results["cells"].items() if v["finished"]}
  return (_scarcity_figure(plt, out, cells_)
          + _lambda_figure(plt, matplotlib, out, cells_, lambdas))


def _scarcity_figure(plt, out, cells_) -> list[epath.Path]:
  """``scarcity.png``: accuracy and paired difference to CE by images per class."""
  paths = []
  scarcity = {k: v for k, v in cells_.items() if v["info"].get("per_class")}
  if scarcity:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    objectives = list(next(iter(scarcity.values()))["objectives"])
    colors = {o: f"C{i}" for i, o in enumerate(objectives)}
    for o in objectives:
      xs, means, errs, dxs, diffs, lo, hi = [], [], [], [], [], [], []
      for cell in scarcity.values():
        if o not in cell["objectives"]:
          continue
        stats = cell["objectives"][o]["metrics"]["test_accuracy"]
        n = cell["info"]["per_class"]
        xs.append(n)
        means.append(100 * stats["mean"])
        errs.append(100 * stats["std"])
        if stats.get("diff_to_ce_ci95"):
          dxs.append(n)
          diffs.append(100 * stats["diff_to_ce_mean"])
          lo.append(100 * (stats["diff_to_ce_mean"] - stats["diff_to_ce_ci95"][0]))
          hi.append(100 * (stats["diff_to_ce_ci95"][1] - stats["diff_to_ce_mean"]))
      name = objective_name(o)
      order = np.argsort(xs)
      axes[0].errorbar(np.array(xs)[order], np.array(means)[order],
                       yerr=np.array(errs)[order], marker="o", capsize=3,
                       label=name, color=colors[o])
      if dxs:
        order = np.argsort(dxs)
        axes[1].errorbar(np.array(dxs)[order], np.array(diffs)[order],
                         yerr=[np.array(lo)[order], np.array(hi)[order]],
                         marker="o", capsize=3, label=name, color=colors[o])
    for ax in axes:
      ax.set_xscale("log")
      ax.set_xlabel("training images per class (base config: its subset / classes)")
    axes[0].set(ylabel="test accuracy (%)", title="mean ± std over seeds")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(ylabel="Δ test accuracy vs CE (points)",
                title="paired difference, 95% t-interval")
    axes[0].legend(fontsize=7)
    paths.append(_finish(plt, fig, out / "scarcity.png"))
  return paths


def _lambda_figure(plt, matplotlib, out, cells_, lambdas) -> list[epath.Path]:
  """``lambda.png``: the paired difference to CE over the lambda grid."""
  paths = []
  grid = {(v["info"]["lambda_gini"], v["info"]["lambda_kl"]): v
          for v in cells_.values() if "lambda_gini" in v["info"]}
  if grid:
    matrix = np.full((len(lambdas), len(lambdas)), np.nan)
    for (g, k), cell in grid.items():
      stats = cell["objectives"]["gini_kl"]["metrics"]["test_accuracy"]
      if "diff_to_ce_mean" in stats:
        matrix[lambdas.index(g), lambdas.index(k)] = 100 * stats["diff_to_ce_mean"]
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    bound = np.nanmax(np.abs(matrix)) if np.isfinite(matrix).any() else 1.0
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="lightgrey")  # not run
    im = ax.imshow(matrix, cmap=cmap, vmin=-bound, vmax=bound, origin="lower")
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(j, i, "not run" if np.isnan(value) else f"{value:+.2f}",
              ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lambdas)), [f"{x:g}" for x in lambdas])
    ax.set_yticks(range(len(lambdas)), [f"{x:g}" for x in lambdas])
    ax.set(xlabel="lambda_kl", ylabel="lambda_gini",
           title="Δ test accuracy vs CE (points)")
    fig.colorbar(im)
    paths.append(_finish(plt, fig, out / "lambda.png"))
  return paths
