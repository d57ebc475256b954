"""The verdict's protocol (issue #28): equal tuning budgets, the choice on
validation only, fresh seeds for the comparison, Holm over the family."""

import dataclasses
import functools
import json
import os
import socket

import numpy as np
import pytest

from discrim_jax import config_lib
from discrim_jax import stats
from discrim_jax import verdict
from discrim_jax import verdict_plan
from discrim_jax import workdir as workdir_lib


def test_every_objective_gets_the_same_budget_over_its_own_knobs(smoke_config):
  base = smoke_config()
  for objective in config_lib.COMPARED_OBJECTIVES:
    tried = verdict_plan.candidates(objective, base)
    assert len(tried) == verdict_plan.NUM_CANDIDATES, objective
    assert tried[0]["optimizer.lr"] == base.optimizer.lr  # the defaults first
    assert len({json.dumps(t, sort_keys=True) for t in tried}) == len(tried)
    # Drawn, not fixed: every candidate inside its range.
    for t in tried[1:]:
      assert 0.03 <= t["optimizer.lr"] <= 0.3
      assert 1e-4 <= t["optimizer.weight_decay"] <= 3e-3
  assert set(verdict_plan.candidates("ce", base)[0]) == set(verdict_plan.SEARCH)
  weights = verdict_plan.candidates("gini_kl", base)
  for t in weights[1:]:
    assert 0.1 * base.loss.lambda_gini <= t["loss.lambda_gini"] <= 10 * base.loss.lambda_gini
  # The same draw in every process (a study resumed elsewhere), and a
  # smaller budget tries the first settings of the same draw.
  assert verdict_plan.candidates("opl", base) == verdict_plan.candidates("opl", base)
  assert verdict_plan.candidates("opl", base, 3) == verdict_plan.candidates("opl", base)[:3]
  assert not set(verdict_plan.FRESH_SEEDS) & set(verdict_plan.TUNING_SEEDS)


def test_the_choice_waits_for_every_tuning_run_and_reads_validation_only(
    tmp_path):
  regime = verdict_plan.Regime("20_per_class", per_class=20)

  def finish(k, seed, validation, test):
    folder = verdict_plan.Run(regime.name, "tune", "opl", k, seed).folder(tmp_path)
    folder.mkdir(parents=True)
    workdir_lib.write_summary(folder, {"best_validation_accuracy": validation,
                                       "test_accuracy": test})

  # Binary fractions: every mean below is exact, so the ties are ties on
  # any CPU.
  values = {0: (0.5, 0.75), 1: (0.625, 0.625), 2: (0.5625, 0.6875),
            3: (0.5, 0.75)}
  for k, (v0, v1) in values.items():
    finish(k, 0, v0, 0.9 if k == 0 else 0.1)  # test accuracy must not matter
    if k != 2:
      finish(k, 1, v1, 0.1)
  assert verdict.choose(tmp_path, regime, "opl") is None  # c2 seed 1 missing
  finish(2, 1, 0.6875, 0.1)
  # Every mean 0.625: the tie goes to the lowest index; then a higher mean
  # wins, whatever the test accuracy says.
  assert verdict.choose(tmp_path, regime, "opl") == 0
  folder = verdict_plan.Run(regime.name, "tune", "opl", 3, 1).folder(tmp_path)
  workdir_lib.write_summary(folder, {"best_validation_accuracy": 0.875,
                                     "test_accuracy": 0.0})
  assert verdict.choose(tmp_path, regime, "opl") == 3


def _tiny(monkeypatch, fresh_seeds, candidates=1):
  """A protocol small enough to run here: one tuning seed, ``fresh_seeds``,
  4 images per class for 4 steps of 20; the regime."""
  monkeypatch.setattr(verdict_plan, "TUNING_SEEDS", (0,))
  monkeypatch.setattr(verdict_plan, "FRESH_SEEDS", tuple(fresh_seeds))
  return verdict_plan.Regime("4_per_class", per_class=4, steps=4, batch=20,
                             candidates=candidates)


def test_tunes_on_validation_then_compares_fresh_seeds(fashion_data_dir, tmp_path,
                                                      monkeypatch, smoke_config):
  regime = _tiny(monkeypatch, (100, 101), candidates=2)
  base = smoke_config(data_dir=fashion_data_dir)
  objectives = ("ce", "gini_kl")
  results = verdict.run_verdict(base, str(tmp_path), [regime], objectives)
  row = results["regimes"]["4_per_class"]["objectives"]
  for objective in objectives:
    entry = row[objective]
    means = [np.mean(c["validation_accuracy"]) for c in entry["candidates"]]
    assert entry["chosen"] == int(np.argmax(means))
    assert [r["seed"] for r in entry["confirm"]] == [100, 101]
    # The confirmation trained the chosen setting.
    run = verdict_plan.Run("4_per_class", "confirm", objective, None, 100)
    config = json.loads((run.folder(tmp_path) / "config.json").read_text())
    chosen = entry["candidates"][entry["chosen"]]["setting"]
    assert config["optimizer"]["lr"] == chosen["optimizer.lr"]  # JSON keeps floats
    assert config["resample_subset"] and config["seed"] == 100
  # CE and the loss share each fresh seed: the comparison is paired, and
  # recomputes from the values kept in the JSON.
  kept = json.loads((tmp_path / "verdict.json").read_text())
  loss = kept["regimes"]["4_per_class"]["objectives"]["gini_kl"]
  again = stats.paired([r["test_accuracy"] for r in loss["confirm"]],
                       [r["test_accuracy"] for r in row["ce"]["confirm"]])
  assert loss["test_accuracy"]["diff_to_ce_mean"] == again["diff_to_ce_mean"]
  assert loss["test_accuracy"]["p_holm"] == loss["test_accuracy"]["p_t"]  # one
  assert "| CE+Gini+KL |" in (tmp_path / "verdict.md").read_text()
  # One comparison: the simultaneous interval is the 95% one. Its level,
  # 1 - 0.05 / 1, is 0.95 plus one ulp, which moves the t quantile by ~1e-15
  # relative: far inside approx's 1e-6.
  assert loss["simultaneous_ci"] == pytest.approx(
      loss["test_accuracy"]["diff_to_ce_ci95"])
  for name in ("verdict_forest.png", "verdict_curves.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  curve = loss["confirm"][0]["validation_curve"]
  assert curve and curve[-1][0] == 4  # every evaluation, to the last step
  # Rerunning trains nothing: every run is finished.
  finished = {p: p.stat().st_mtime for p in tmp_path.glob("**/summary.json")}
  assert len(finished) == 2 * 2 * 1 + 2 * 2
  verdict.run_verdict(base, str(tmp_path), [regime], objectives)
  assert {p: p.stat().st_mtime for p in tmp_path.glob("**/summary.json")} == finished
  assert workdir_lib.finished(run.folder(tmp_path))
  # The ledger stands for a lost workdir: from it alone (and from a file
  # written before the ledger, from its tables) nothing is trained again
  # and the results are the same.
  assert len(kept["runs"]) == len(finished)
  before_ledger = tmp_path / "old.json"
  before_ledger.write_text(json.dumps({k: v for k, v in kept.items() if k != "runs"}))
  for source in (tmp_path / "verdict.json", before_ledger):
    empty = tmp_path / f"lost_{source.stem}"
    again = verdict.run_verdict(base, str(empty), [regime], objectives,
                                recorded=verdict.load_recorded(source, base, [regime]))
    assert not list(empty.glob("**/summary.json"))
    assert again["regimes"] == kept["regimes"], source
  # Never mixed into another verdict's runs: another base config, or a
  # regime of the same name trained otherwise, is refused in one line.
  with pytest.raises(config_lib.ConfigError, match=r"base config differs in .*optimizer"):
    verdict.load_recorded(tmp_path / "verdict.json",
                          smoke_config(**{"optimizer.lr": 0.05}), [regime])
  for other in (dataclasses.replace(regime, steps=8),
                dataclasses.replace(regime, candidates=3)):
    for source in (tmp_path / "verdict.json", before_ledger):
      with pytest.raises(config_lib.ConfigError, match="4_per_class is"):
        verdict.load_recorded(source, base, [other])
  # A file written before regimes recorded their candidates stands for the
  # default number of them (the committed one is read in the test below).
  old = json.loads(before_ledger.read_text())
  del old["regimes"]["4_per_class"]["regime"]["candidates"]
  before_ledger.write_text(json.dumps(old))
  with pytest.raises(config_lib.ConfigError, match="4_per_class is"):
    verdict.load_recorded(before_ledger, base, [regime])  # 2, not the default


def test_holm_waits_for_the_whole_family_and_only_the_last_shard_writes(
    fashion_data_dir, tmp_path, monkeypatch, smoke_config):
  """Finished runs written by hand (nothing trains): with one comparison of
  the declared family missing, a p-value is Bonferroni's over the whole
  family and the results say they are incomplete; a shard whose runs are
  done while another process trains the last one writes nothing."""
  from statsmodels.stats.multitest import multipletests  # pylint: disable=g-import-not-at-top
  from discrim_jax import study  # pylint: disable=g-import-not-at-top
  regime = _tiny(monkeypatch, (100, 101, 102, 103, 104))
  base = smoke_config(data_dir=fashion_data_dir)
  objectives = ("ce", "gini_kl", "opl")
  runs = (verdict_plan.tuning_runs([regime], objectives)
          + verdict_plan.confirm_runs([regime], objectives))
  last = study.shard_of(runs, (1, 2))[-1]
  assert last.objective == "opl" and last.phase == "confirm"
  # Binary fractions (exact in float64), a different gap per objective.
  gap = {"ce": 0.0, "gini_kl": 0.0625, "opl": -0.03125}
  # Validation at steps 100..600; binary fractions, so means are exact.
  curve = [0.5, 0.625, 0.6875, 0.6875, 0.703125, 0.70703125]
  for run in runs:
    folder = run.folder(tmp_path)
    folder.mkdir(parents=True)
    test = 0.5 + gap[run.objective] + (run.seed % 4) / 64 * (run.objective != "ce")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": step, "split": "validation", "accuracy": a}) + "\n"
        for step, a in zip(range(100, 700, 100), curve)))
    if run != last:
      workdir_lib.write_summary(folder, {"best_validation_accuracy": 0.5,
                                         "test_accuracy": test})
  # The other shard is training the last run: its folder's lock is held by
  # a live process on this host (pytest's parent).
  lock = last.folder(tmp_path) / workdir_lib.LOCK
  lock.write_text(json.dumps({"host": socket.gethostname(),
                              "pid": os.getppid(), "since": "now"}))
  assert verdict.run_verdict(base, str(tmp_path), [regime], objectives,
                             (0, 2)) is None
  assert not (tmp_path / "verdict.json").exists()
  partial = verdict.run_verdict(base, str(tmp_path), [regime], objectives,
                                train=False)
  assert not partial["complete"] and partial["protocol"]["holm_family"] == 2
  loss = partial["regimes"]["4_per_class"]["objectives"]["gini_kl"]["test_accuracy"]
  assert "p_holm" not in loss and loss["p_bonferroni"] == min(1.0, 2 * loss["p_t"])
  assert "Not complete" in (tmp_path / "verdict.md").read_text()
  workdir_lib.write_summary(last.folder(tmp_path), {
      "best_validation_accuracy": 0.5, "test_accuracy": 0.5 - 0.03125})
  lock.unlink()  # that shard's run ended
  whole = verdict.run_verdict(base, str(tmp_path), [regime], objectives, (0, 2))
  assert whole["complete"] and json.loads(
      (tmp_path / "verdict.json").read_text())["complete"]
  # Convergence: CE's mean curve gained 0.39 points over the last sixth.
  plateau = whole["regimes"]["4_per_class"]["ce_plateau"]
  assert plateau["from_step"] == 500 and plateau["last_sixth_gain_points"] == 0.390625
  assert plateau["plateaued"] and "plateaued (the rule" in (tmp_path / "verdict.md").read_text()
  rows = whole["regimes"]["4_per_class"]["objectives"]
  ps = [rows[o]["test_accuracy"]["p_t"] for o in ("gini_kl", "opl")]
  # The same library call on the same p-values: equal bit for bit.
  assert [rows[o]["test_accuracy"]["p_holm"] for o in ("gini_kl", "opl")] == list(
      multipletests(ps, method="holm")[1])


def test_a_shard_done_early_trains_the_runs_nobody_has_started(
    fashion_data_dir, tmp_path, monkeypatch, smoke_config):
  """Training faked (nothing trains): shard 0 of 2 trains its own runs, then
  shard 1's, except one whose folder a live process holds; with that run
  missing it writes no results, and it never trains a run twice."""
  from discrim_jax import compare  # pylint: disable=g-import-not-at-top
  regime = _tiny(monkeypatch, (100, 101))
  base = smoke_config(data_dir=fashion_data_dir)
  objectives = ("ce", "gini_kl")
  runs = (verdict_plan.tuning_runs([regime], objectives)
          + verdict_plan.confirm_runs([regime], objectives))
  trained = []

  def train_all(config, workdir, objectives_, seeds):
    del config
    (objective,), (seed,) = objectives_, seeds
    folder = workdir_lib.run_dir(workdir, objective, seed)
    trained.append(folder.relative_to(tmp_path).as_posix())
    (folder / "metrics.jsonl").write_text(json.dumps(
        {"step": 4, "split": "validation", "accuracy": 0.5}) + "\n")
    workdir_lib.write_summary(folder, {"best_validation_accuracy": 0.5,
                                       "test_accuracy": 0.5})

  monkeypatch.setattr(compare, "train_all", train_all)
  busy = runs[-1]  # shard 1's (6 runs: the last is the 2nd shard's)
  assert busy not in verdict.study.shard_of(runs, (0, 2))
  busy.folder(tmp_path).mkdir(parents=True)
  # Held by a live process on this host: pytest's parent.
  (busy.folder(tmp_path) / workdir_lib.LOCK).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}))
  assert verdict.run_verdict(base, str(tmp_path), [regime], objectives,
                             (0, 2)) is None
  assert sorted(trained) == sorted(r.key for r in runs[:-1])
  assert not (tmp_path / "verdict.json").exists()


def test_capacity_pairs_the_tuned_settings_at_each_width(
    fashion_data_dir, tmp_path, monkeypatch, smoke_config):
  """Finished runs written by hand: the capacity table pairs CE and the loss
  at each width (the base width from the confirmation runs of the first
  seeds), Holm over the widths, in the regime the command names for it and
  no other; a capacity run trains its objective's chosen setting at its
  width."""
  regime = _tiny(monkeypatch, (100, 101, 102, 103))
  other = dataclasses.replace(regime, name="6_per_class", per_class=6)
  monkeypatch.setattr(verdict_plan, "CAPACITY_SEEDS", (100, 101, 102))
  base = smoke_config(data_dir=fashion_data_dir)
  base_width = base.model_kwargs.width_multiplier
  objectives = ("ce", "gini_kl")
  runs = (verdict_plan.tuning_runs([regime, other], objectives)
          + verdict_plan.confirm_runs([regime, other], objectives)
          + verdict_plan.capacity_runs([regime], (0.5,)))
  assert {(r.width, r.seed) for r in runs if r.phase == "capacity"} == {
      (0.5, s) for s in (100, 101, 102)}
  gap = {None: 0.0625, 0.5: -0.125}  # the loss's gain at each width (exact)
  for run in runs:
    folder = run.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps(
        {"step": 4, "split": "validation", "accuracy": 0.5}) + "\n")
    test = 0.5 + (run.seed % 4) / 64 + (
        gap[run.width] if run.objective == "gini_kl" else 0.0)
    workdir_lib.write_summary(folder, {"best_validation_accuracy": 0.5,
                                       "test_accuracy": test})
  with pytest.raises(config_lib.ConfigError,
                     match=r"--capacity_per_class=5 names .*"
                     r"--per_class=4,6"):
    verdict.run_verdict(base, str(tmp_path), [regime, other], objectives,
                        widths=(0.5,), capacity_per_class=(5,))
  written = set(tmp_path.glob("**/summary.json"))
  results = verdict.run_verdict(base, str(tmp_path), [regime, other], objectives,
                                widths=(0.5,), capacity_per_class=(4,))
  assert set(tmp_path.glob("**/summary.json")) == written  # nothing trained
  assert results["complete"] and "capacity" not in results["regimes"]["6_per_class"]
  assert results["protocol"]["capacity"]["per_class"] == [4]
  table = results["regimes"]["4_per_class"]["capacity"]
  assert list(table) == [f"{base_width:g}", "0.5"]
  assert [r["seed"] for r in table[f"{base_width:g}"]["runs"]["ce"]] == [100, 101, 102]
  assert table[f"{base_width:g}"]["test_accuracy"]["diff_to_ce_mean"] == 0.0625
  assert table["0.5"]["test_accuracy"]["diff_to_ce_mean"] == -0.125
  assert all(e["test_accuracy"]["p_holm"] is not None for e in table.values())
  # Each width's CE curves (flat here: one evaluation) by the regime's rule.
  assert all(e["ce_plateau"]["plateaued"] for e in table.values())
  assert "| 0.5 |" in (tmp_path / "verdict.md").read_text()
  assert "+0.00, plateaued |" in (tmp_path / "verdict.md").read_text()
  run = verdict_plan.capacity_runs([regime], (0.5,))[0]
  config = verdict_plan.run_config(base, run, {"optimizer.lr": 0.25})
  assert config.model_kwargs.width_multiplier == 0.5 and config.optimizer.lr == 0.25


@pytest.mark.parametrize("name,config_name", [
    ("verdict_fashion", "fashion_mnist"), ("verdict_fonts", "fonts")])
def test_committed_results_recompute_from_their_per_seed_values(name, config_name):
  """experiments/results/NAME/verdict.json: every choice, interval, p-value
  (Holm's and Bonferroni's included), convergence figure and capacity
  comparison recomputes from the per-run values it keeps."""
  import importlib  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  path = Path(__file__).parents[1] / "experiments" / "results" / name / "verdict.json"
  results = json.loads(path.read_text())
  family = results["protocol"]["holm_family"]
  # The same float64 functions on the same values; another CPU's libm may
  # round the t quantile's last bits otherwise: 1e-12 relative.
  close = functools.partial(pytest.approx, rel=1e-12)

  def same_plateau(kept, runs):
    again = verdict_plan.plateau(runs)
    for key in ("steps", "from_step", "plateaued", "rule_points"):
      assert kept[key] == again[key], key
    assert kept["mean_validation_accuracy"] == close(again["mean_validation_accuracy"])
    # 100x a difference of two float64 means of values in [0, 1]: the same
    # operations on the same values, a few ulps of 100 at most.
    assert kept["last_sixth_gain_points"] == pytest.approx(
        again["last_sixth_gain_points"], abs=1e-12)

  def recomputes(kept, loss_runs, ce_runs):
    again = stats.paired([r["test_accuracy"] for r in loss_runs],
                         [r["test_accuracy"] for r in ce_runs])
    for key in ("diff_to_ce_mean", "p_t", "p_sign_flip", "diff_to_ce_ci95"):
      assert kept[key] == close(again[key]), key

  checked, primary = 0, []
  for row in results["regimes"].values():
    ce = row["objectives"]["ce"]["confirm"]
    if ce:
      same_plateau(row["ce_plateau"], ce)
    for objective, entry in row["objectives"].items():
      means = [np.mean(c["validation_accuracy"]) for c in entry["candidates"]
               if None not in c["validation_accuracy"]]
      if len(means) == len(entry["candidates"]):
        assert entry["chosen"] == int(np.argmax(means)), objective
      if "test_accuracy" not in entry:
        continue
      kept = entry["test_accuracy"]
      recomputes(kept, entry["confirm"], ce)
      primary.append(kept)
      if not results["complete"]:
        assert kept["p_bonferroni"] == close(min(1.0, family * kept["p_t"]))
      checked += 1
    for width, cell in row.get("capacity", {}).items():
      if cell["runs"]["ce"]:
        same_plateau(cell["ce_plateau"], cell["runs"]["ce"])
      if "test_accuracy" in cell:
        recomputes(cell["test_accuracy"], cell["runs"]["gini_kl"], cell["runs"]["ce"])
        checked += 1
    widths = [c["test_accuracy"] for c in row.get("capacity", {}).values()
              if "test_accuracy" in c]
    if widths and all("p_holm" in t for t in widths):
      assert [t["p_holm"] for t in widths] == close(stats.holm([t["p_t"] for t in widths]))
  if results["complete"]:  # Holm over the whole family, in its order
    assert len(primary) == family
    assert [t["p_holm"] for t in primary] == close(stats.holm([t["p_t"] for t in primary]))
  assert checked >= 1
  # It resumes its own command (--recorded), and only that one.
  base = importlib.import_module(f"experiments.configs.{config_name}").get_config()
  regimes = [verdict_plan.Regime(**row["regime"]) for row in results["regimes"].values()]
  assert verdict.load_recorded(path, base, regimes) == results["runs"]
  with pytest.raises(config_lib.ConfigError, match=f"{regimes[0].name} is"):
    verdict.load_recorded(path, base, [dataclasses.replace(
        regimes[0], candidates=regimes[0].candidates + 1)])


def test_overview_bolds_only_what_survives_holm():
  """verdict_report.overview (README's table): a Δ is bold only where its
  Holm-adjusted p is under 0.05, and an incomplete verdict's p is marked as
  Bonferroni's."""
  import copy  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from discrim_jax import verdict_report  # pylint: disable=g-import-not-at-top
  path = (Path(__file__).parents[1] / "experiments" / "results" /
          "verdict_fashion" / "verdict.json")
  results = json.loads(path.read_text())
  assert results["complete"]
  table = verdict_report.overview({"F": results})
  assert "**" not in table  # every Holm p there is at least 0.1
  survives = copy.deepcopy(results)
  survives["regimes"]["500_per_class"]["objectives"]["supcon"]["test_accuracy"][
      "p_holm"] = 0.01
  rows = verdict_report.overview({"F": survives}).splitlines()
  bold = [r for r in rows if "**" in r]
  assert len(bold) == 1 and "| CE+SupCon |" in bold[0] and "**-1.07 [" in bold[0]
  # As verdict._correct leaves an incomplete family: Bonferroni's p, no Holm's.
  incomplete = copy.deepcopy(results)
  incomplete["complete"] = False
  for row in incomplete["regimes"].values():
    for entry in row["objectives"].values():
      if "test_accuracy" in entry:
        del entry["test_accuracy"]["p_holm"]
        entry["test_accuracy"]["p_bonferroni"] = 0.5
  rows = verdict_report.overview({"F": incomplete}).splitlines()
  assert sum("0.5 (Bonferroni: runs missing)" in r for r in rows) == 8
  assert rows[2].startswith("| F, 20 per class | CE |")
