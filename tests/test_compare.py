"""The reproduction harness end to end on the smoke config."""

import json

import pytest

from discrim_jax import compare
from discrim_jax import train
from tests.test_train import fashion, smoke_config  # noqa: F401  pylint: disable=unused-import


def test_harness_writes_table_json_plots_and_resumes(fashion, tmp_path, monkeypatch):  # noqa: F811
  config = smoke_config(num_epochs=1)
  results = compare.run_comparison(config, str(tmp_path), objectives=("ce", "gini_kl"),
                                   seeds=2, dataset=fashion)
  for name in ("results.md", "results.json", "accuracy.png", "curves.png",
               "impurity_hist.png", "heatmap.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  rows = saved["results"]
  assert [r["seed"] for r in rows["gini_kl"]["runs"]] == [0, 1]
  paired = [b["test_accuracy"] - a["test_accuracy"]
            for a, b in zip(rows["ce"]["runs"], rows["gini_kl"]["runs"])]
  assert rows["gini_kl"]["diff_to_ce_mean"] == pytest.approx(sum(paired) / 2)
  lo, hi = rows["gini_kl"]["diff_to_ce_ci95"]
  assert lo <= rows["gini_kl"]["diff_to_ce_mean"] <= hi
  # CE runs log the Gini/KL values they would have had.
  assert set(rows["ce"]["runs"][0]["final_gini"]) == {"stage4"}
  table = (tmp_path / "results.md").read_text()
  assert "| CE+Gini+KL |" in table and "| CE |" in table

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  again = compare.run_comparison(config, str(tmp_path), objectives=("ce", "gini_kl"),
                                 seeds=2, dataset=fashion)
  assert again == results


def test_harness_rejects_bad_arguments(tmp_path):
  with pytest.raises(train.ConfigError, match=r"unknown objective\(s\) \['entropy'\]"):
    compare.run_comparison(smoke_config(), str(tmp_path), objectives=("ce", "entropy"))
  with pytest.raises(train.ConfigError, match="--seeds must be >= 1"):
    compare.run_comparison(smoke_config(), str(tmp_path), seeds=0)
