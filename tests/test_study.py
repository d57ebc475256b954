"""The study harness (issue #20): cells, per-class subsets, pairing, outputs."""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from discrim_jax import data
from discrim_jax import report
from discrim_jax import study
from discrim_jax import train
from discrim_jax.config_lib import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_scarcity_cells_train_a_fixed_number_of_steps(smoke_config):
  for cell in study.cells("scarcity", smoke_config(), 10)[:-1]:
    c = cell.config
    images = 10 * cell.info["per_class"]
    steps = (images // c.batch_size) * c.num_epochs
    assert study.STEPS <= steps < study.STEPS + images // c.batch_size, cell.name
    assert c.train_per_class == cell.info["per_class"] and c.train_subset == 0
    assert c.loss.start_epoch == pytest.approx(0.1 * c.num_epochs)
  knobs = study.cells("lambda", smoke_config(), 10, regime=20)
  assert len(knobs) == 16 and {k.pair_with for k in knobs} == {"20_per_class"}
  # Capacity: the base width at the default steps is the regime cell itself;
  # fewer steps (full width is slow on a CPU) make both widths new cells.
  width = smoke_config().model_kwargs.width_multiplier
  capacity = study.cells("capacity", smoke_config(), 10, regime=20)
  assert [(c.name, c.runs_in) for c in capacity] == [
      (f"20_per_class_width_{width:g}", "20_per_class"),
      ("20_per_class_width_1", "20_per_class_width_1")]
  short = study.cells("capacity", smoke_config(), 10, regime=20, steps=200)
  assert [c.runs_in for c in short] == [f"20_per_class_200_steps_width_{width:g}",
                                        "20_per_class_200_steps_width_1"]
  assert short[1].config.model_kwargs.width_multiplier == 1.0
  assert short[0].config.num_epochs * 200 // short[0].config.batch_size == 200
  with pytest.raises(ConfigError, match="--steps=200 applies to the capacity"):
    study.cells("lambda", smoke_config(), 10, steps=200)
  with pytest.raises(ConfigError, match="unknown study 'size'"):
    study.cells("size", smoke_config(), 10)


def test_train_per_class_takes_the_first_of_each_class(fashion_data_dir):
  full = data.Dataset("fashion_mnist", data_dir=fashion_data_dir)
  few = data.Dataset("fashion_mnist", data_dir=fashion_data_dir,
                     train_per_class=3)
  images, labels = few.arrays("train")
  np.testing.assert_array_equal(np.bincount(labels), [3] * 10)
  all_images, all_labels = full.arrays("train")
  first = np.concatenate([np.flatnonzero(all_labels == c)[:3] for c in range(10)])
  np.testing.assert_array_equal(images, all_images[np.sort(first)])
  with pytest.raises(ValueError, match="fewer than train_per_class=99999"):
    data.Dataset("fashion_mnist", data_dir=fashion_data_dir,
                 train_per_class=99_999).arrays("train")


_SHARD = """
import sys
from discrim_jax import study
from experiments.configs import fashion_mnist
from discrim_jax import config_lib
study.PER_CLASS, study.STEPS, study.BATCH = (4,), 4, 20
base = config_lib.with_fields(fashion_mnist.get_config("smoke"), **{
    "eval_subset": 200, "eval_batch_size": 200, "train_subset": 320,
    "log_every_steps": 2, "num_devices": 1, "representation.enabled": False,
    "num_epochs": 1, "data_dir": sys.argv[3]})
study.run_study("scarcity", base, sys.argv[1], seeds=2,
                objectives=("ce", "gini_kl"), shard=(int(sys.argv[2]), 2))
"""


def _no_training(*args, **kwargs):
  raise AssertionError("a finished run was trained again")


def test_study_runs_pairs_and_resumes(fashion_data_dir, tmp_path, monkeypatch,
                                      smoke_config):
  monkeypatch.setattr(study, "PER_CLASS", (4,))
  monkeypatch.setattr(study, "STEPS", 4)
  monkeypatch.setattr(study, "BATCH", 20)
  monkeypatch.setattr(study, "START_FRACTIONS", (0.0, 0.1))
  base = smoke_config(num_epochs=1, data_dir=fashion_data_dir)
  # Two shards at once into one workdir, as a job array runs them: shard 0
  # in another process (with this base config), shard 1 here; each trains
  # its half, and the one that finds every run done writes the tables.
  kwargs = dict(seeds=2, objectives=("ce", "gini_kl"))
  other = subprocess.Popen(
      [sys.executable, "-c", _SHARD, str(tmp_path), "0", fashion_data_dir],
      env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  mine = study.run_study("scarcity", base, str(tmp_path), shard=(1, 2), **kwargs)
  _, stderr = other.communicate(timeout=600)
  assert other.returncode == 0, stderr[-3000:]
  assert mine is not None or (tmp_path / "scarcity.json").exists()
  written = json.loads((tmp_path / "scarcity.json").read_text())
  # One process over the same workdir trains nothing more: the same table.
  with monkeypatch.context() as m:
    m.setattr(train, "train_and_evaluate_seeds", _no_training)
    results = study.run_study("scarcity", base, str(tmp_path), **kwargs)
  assert _without_wall_time(results) == _without_wall_time(written)
  cells = results["cells"]
  assert set(cells) == {"4_per_class", "base"}
  stats = cells["4_per_class"]["objectives"]["gini_kl"]["metrics"]["test_accuracy"]
  assert len(stats["diff_to_ce_ci95"]) == 2 and cells["4_per_class"]["wall_time_s"] > 0
  # A knob cell trains Gini+KL only and pairs with its regime's CE runs.
  results = study.run_study("start", base, str(tmp_path), seeds=2, regime=4)
  cell = results["cells"]["4_per_class_start_0"]
  assert cell["paired_with"] == "4_per_class"
  assert list(cell["objectives"]) == ["gini_kl"]
  ce = [json.loads((tmp_path / "4_per_class" / "ce" / f"seed{s}" / "summary.json")
                   .read_text())["test_accuracy"] for s in range(2)]
  mine = [json.loads((tmp_path / cell_dir / "gini_kl" / f"seed{s}" / "summary.json")
                     .read_text())["test_accuracy"]
          for s in range(2) for cell_dir in ["4_per_class_start_0"]]
  assert cell["objectives"]["gini_kl"]["metrics"]["test_accuracy"][
      "diff_to_ce_mean"] == pytest.approx(np.mean(mine) - np.mean(ce))
  # Starting at 10% is the regime's own setting: its runs, not retrained.
  same = results["cells"]["4_per_class_start_0.1"]
  assert same["runs_in"] == "4_per_class"
  assert not (tmp_path / "4_per_class_start_0.1").exists()
  # The same runs, so the same figures; only the Holm correction differs,
  # since each study is its own family of comparisons.
  def without_holm(row):
    return json.loads(json.dumps(row).replace('"p_holm"', '"_"'), object_hook=lambda d: {
        k: v for k, v in d.items() if k != "_"})
  assert without_holm(same["objectives"]["gini_kl"]) == without_holm(
      cells["4_per_class"]["objectives"]["gini_kl"])
  # Every figure recomputes from the per-seed values kept in the JSON.
  kept = cell["objectives"]["gini_kl"]["metrics"]["test_accuracy"]
  assert kept["values"] == mine and kept["ce_values"] == ce
  # With 2 seeds the 4 sign flips allow only p = 2/4 or 4/4.
  assert kept["p_holm"] is not None
  assert kept["p_sign_flip"] in (pytest.approx(0.5), pytest.approx(1.0))
  for name in ("scarcity.md", "scarcity.json", "scarcity.png", "start.md", "start.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  table = (tmp_path / "start.md").read_text()
  assert "| 4_per_class_start_0 | CE+Gini+KL |" in table
  assert "runs of 4_per_class |" in table


def test_lambda_heatmap_draws_finished_and_unfinished_cells(tmp_path):
  diff = {"mean": 0.73, "std": 0.01, "diff_to_ce_mean": 0.012,
          "diff_to_ce_ci95": [-0.002, 0.026]}
  results = {"seeds": 5, "cells": {
      "done": {"finished": True, "info": {"lambda_gini": 0.5, "lambda_kl": 2.0},
               "objectives": {"gini_kl": {"metrics": {"test_accuracy": diff}}}},
      "missing": {"finished": False, "info": {"lambda_gini": 2.0, "lambda_kl": 0.1}}}}
  paths = report.plot_study(tmp_path, results, study.LAMBDAS)
  assert [p.name for p in paths] == ["lambda.png"] and paths[0].stat().st_size > 0


def _without_wall_time(results):
  """A study's results without the figures that depend on the machine's load."""
  return {name: {k: v for k, v in cell.items() if k != "wall_time_s"}
          for name, cell in json.loads(json.dumps(results))["cells"].items()}


def test_shards_divide_the_runs_once_each(smoke_config):
  cells = study.cells("start", smoke_config(), 10, regime=20)
  runs = study.study_runs(cells, seeds=3)
  # start_0.1 is the regime's own config: its runs are the regime cell's.
  assert len(runs) == len({(r.runs_in, r.objective, r.seed) for r in runs}) == 9
  shards = [study.shard_of(runs, (i, 4)) for i in range(4)]
  assert sorted((r for s in shards for r in s), key=runs.index) == runs
  assert study.parse_shard("3/4") == (3, 4) and study.parse_shard("") is None
  for bad in ("4/4", "1", "a/b", "-1/2"):
    with pytest.raises(ConfigError, match="--shard=.*0 <= I < N"):
      study.parse_shard(bad)


def test_each_seed_can_draw_its_own_subset(fashion_data_dir, smoke_config):
  """config.resample_subset: seed s trains on its own random N per class,
  the same draw whichever objective (the spec of seed s says which)."""
  from discrim_jax import run_spec  # pylint: disable=g-import-not-at-top
  config = smoke_config(train_per_class=3, train_subset=0, resample_subset=True,
                        data_dir=fashion_data_dir)
  spec = run_spec.resolve(config, 1)
  draws = {}
  for seed, objective in ((0, "ce"), (1, "ce"), (1, "gini_kl")):
    options = spec.with_seed(seed).data_options
    assert options["train_subset_seed"] == seed
    ds = data.Dataset("fashion_mnist", **options)
    images, labels = ds.arrays("train")
    np.testing.assert_array_equal(np.bincount(labels), [3] * 10)
    draws[seed, objective] = images
  np.testing.assert_array_equal(draws[1, "ce"], draws[1, "gini_kl"])
  assert not np.array_equal(draws[0, "ce"], draws[1, "ce"])
  first = data.Dataset("fashion_mnist", **run_spec.resolve(
      smoke_config(train_per_class=3, train_subset=0, data_dir=fashion_data_dir),
      1).data_options).arrays("train")[0]
  assert not np.array_equal(first, draws[0, "ce"])  # not the first 3 per class


def test_resampled_subsets_refuse_vmapped_seeds(tmp_path, smoke_config):
  from discrim_jax import train  # pylint: disable=g-import-not-at-top
  config = smoke_config(train_per_class=3, train_subset=0, resample_subset=True)
  with pytest.raises(ConfigError, match="one at a time.*--vmap_seeds"):
    train.train_and_evaluate_seeds(config, {0: str(tmp_path / "a"),
                                            1: str(tmp_path / "b")})
