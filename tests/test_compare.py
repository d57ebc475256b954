"""The reproduction harness end to end on the smoke config."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats as scipy_stats

from discrim_jax import compare
from discrim_jax import config_lib
from discrim_jax import train

# t(0.975, 1 degree of freedom) at full precision, and the bound for two
# float64 evaluations of one expression on values in [-1, 1] (see below).
T_975_1 = float(scipy_stats.t.ppf(0.975, 1))
FLOAT64_BOUND = 1e-12


OBJECTIVES = ("ce", "gini_kl", "opl")


@pytest.fixture(name="harness", scope="module")
def harness_fixture(fashion, smoke_config, tmp_path_factory):
  """``(config, workdir, results)`` of one comparison of three objectives
  over two seeds, trained once for this module's tests."""
  config = smoke_config(num_epochs=1, **{"representation.enabled": True,
                                         "loss.start_epoch": 0.0})
  workdir = tmp_path_factory.mktemp("harness")
  results = compare.run_comparison(config, str(workdir), objectives=OBJECTIVES,
                                   seeds=2, dataset=fashion)
  return config, workdir, results


def _no_training(*args, **kwargs):
  """Stands in for train.train_and_evaluate_seeds, which the harness (and
  train_and_evaluate) calls for every run it trains."""
  raise AssertionError("a finished run was trained again")


def test_harness_writes_table_json_plots_and_resumes(fashion, harness, monkeypatch):
  config, tmp_path, results = harness
  objectives = OBJECTIVES
  for name in ("results.md", "results.json", "accuracy.png", "curves.png",
               "impurity_hist.png", "heatmap.png", "representation.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  rows = saved["results"]
  assert [r["seed"] for r in rows["gini_kl"]["runs"]] == [0, 1]
  paired = [b["test_accuracy"] - a["test_accuracy"]
            for a, b in zip(rows["ce"]["runs"], rows["gini_kl"]["runs"])]
  # float64 means of the same two numbers: a few ulps (approx's 1e-6 default).
  assert rows["gini_kl"]["diff_to_ce_mean"] == pytest.approx(sum(paired) / 2)
  # The 95% t-interval of the paired differences, computed by hand: with 2
  # seeds, mean ± t(0.975, 1 dof) * sd / sqrt(2), t = 12.7062... taken at
  # full precision from SciPy's quantile function. Both sides evaluate the
  # same float64 expression on the same accuracies (in [0, 1]), so they
  # differ by a few float64 ulps at most (< 1e-14): the bound below holds on
  # any CPU.
  half = T_975_1 * np.std(paired, ddof=1) / math.sqrt(2)
  assert rows["gini_kl"]["diff_to_ce_ci95"] == pytest.approx(
      [np.mean(paired) - half, np.mean(paired) + half], abs=FLOAT64_BOUND)
  # CE runs log the Gini/KL values they would have had.
  assert set(rows["ce"]["runs"][0]["final_gini"]) == {"stage4"}
  # Each representation metric gets the same paired statistics.
  knn = [b["metrics"]["knn/pre_logits"] - a["metrics"]["knn/pre_logits"]
         for a, b in zip(rows["ce"]["runs"], rows["opl"]["runs"])]
  stats = rows["opl"]["metrics"]["knn/pre_logits"]
  assert stats["diff_to_ce_mean"] == pytest.approx(np.mean(knn))
  half = T_975_1 * np.std(knn, ddof=1) / math.sqrt(2)
  assert stats["diff_to_ce_ci95"] == pytest.approx(
      [np.mean(knn) - half, np.mean(knn) + half], abs=FLOAT64_BOUND)
  # Not asserted: that the two seeds' kNN differences differ (a zero-width
  # interval). That is the data's business: on an Intel Xeon both were
  # -0.02. test_stats checks the interval on values that differ.
  assert set(rows["ce"]["metrics"]) >= {
      "test_accuracy", "knn/pre_logits", "probe/pre_logits", "nc1/pre_logits",
      "gini/stage4"}
  table = (tmp_path / "results.md").read_text()
  assert "| CE+Gini+KL |" in table and "| CE |" in table
  assert "| kNN accuracy (%) at pre_logits |" in table
  # stage4 pools to pre_logits: its identical rows are shown once.
  assert "kNN accuracy (%) at stage4" not in table

  monkeypatch.setattr(train, "train_and_evaluate_seeds", _no_training)
  again = compare.run_comparison(config, str(tmp_path), objectives=objectives,
                                 seeds=2, dataset=fashion)
  assert again == results


def test_one_seed_table_has_no_interval_and_strict_json(fashion, harness, tmp_path,
                                                        monkeypatch):
  # One seed over a copy of the two-seed comparison's workdir: its seed-0
  # runs are reused, none trained.
  config, workdir, _ = harness
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  monkeypatch.setattr(train, "train_and_evaluate_seeds", _no_training)
  compare.run_comparison(config, str(tmp_path), objectives=OBJECTIVES, seeds=1,
                         dataset=fashion)
  saved = json.loads((tmp_path / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
  assert [r["seed"] for r in saved["results"]["opl"]["runs"]] == [0]
  assert saved["results"]["gini_kl"]["diff_to_ce_ci95"] is None
  row = [l for l in (tmp_path / "results.md").read_text().splitlines()
         if l.startswith("| CE+Gini+KL |")][0]
  assert "[" not in row.split("|")[3]
  names = [l.split("|")[1].strip()
           for l in (tmp_path / "results.md").read_text().splitlines()[2:5]]
  assert names == ["CE", "CE+Gini+KL", "CE+OPL"]
  # One seed and 200 test images: the table says so beside its figures.
  assert ("Too little to carry a claim: 1 seed (fewer than 5) and 200 test "
          "images") in (tmp_path / "results.md").read_text()
  assert saved["results"]["gini_kl"]["p_holm"] is None  # no p from one seed


def test_harness_rejects_bad_arguments(tmp_path, smoke_config):
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown objective\(s\) \['entropy'\].*joined by '\+'"):
    compare.run_comparison(smoke_config(), str(tmp_path), objectives=("ce", "entropy"))
  with pytest.raises(config_lib.ConfigError, match="--seeds must be >= 1"):
    compare.run_comparison(smoke_config(), str(tmp_path), seeds=0)

