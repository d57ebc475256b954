"""A run's folder under faults: one process at a time, an identity that no
single deleted file loses, nothing written before a run can start, torn
files healed or named."""

import json
import os
from pathlib import Path
import socket
import subprocess
import sys

import pytest

from discrim_jax import compare
from discrim_jax import config_lib
from discrim_jax import report
from discrim_jax import train
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_a_second_process_is_refused_before_touching_a_file(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\n"
       "from discrim_jax import workdir\n"
       f"with workdir.locked({str(tmp_path)!r}):\n"
       "  print('held', flush=True); time.sleep(60)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(workdir_lib.WorkdirBusy,
                       match=rf"in use by process {holder.pid} on "
                             rf"{socket.gethostname()} since .*delete .*\.lock"):
      with workdir_lib.locked(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == before == [".lock"]
  finally:
    holder.kill()
    holder.wait()
  # Killed with -9: its lock is stale (same host, PID gone) and taken over.
  with workdir_lib.locked(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / ".lock").exists()  # released on exit


def test_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "since": "then"}))
  with pytest.raises(workdir_lib.WorkdirBusy, match="process 1 on elsewhere"):
    with workdir_lib.locked(tmp_path):
      pass
  old = os.path.getmtime(tmp_path / ".lock") - workdir_lib.STALE_AFTER_S - 1
  os.utime(tmp_path / ".lock", (old, old))
  with workdir_lib.locked(tmp_path):
    pass


def test_lock_is_reentrant_and_a_file_workdir_is_one_line(tmp_path):
  with workdir_lib.locked(tmp_path):
    with workdir_lib.locked(tmp_path):
      pass
    assert (tmp_path / ".lock").exists()
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
    with workdir_lib.locked(tmp_path / "file"):
      pass


def test_identity_survives_a_deleted_config_json(fashion, tmp_path, smoke_config):
  train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path), dataset=fashion)
  assert (tmp_path / "identity.json").exists()
  (tmp_path / "config.json").unlink()
  with pytest.raises(ConfigError, match=r"\(batch_size: 64 -> 32\) recorded in identity.json"):
    train.train_and_evaluate(smoke_config(num_epochs=1, batch_size=32),
                             str(tmp_path), dataset=fashion)
  (tmp_path / "identity.json").unlink()
  with pytest.raises(ConfigError, match="holds checkpoints but neither config.json"):
    train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path),
                             dataset=fashion)


@pytest.mark.parametrize("field,value", [
    ("optimizer.lr", float("nan")), ("optimizer.lr", float("inf")),
    ("loss.lambda_gini", float("nan")), ("loss.lambda_gini", -5.0),
    ("train_subset", -5), ("eval_subset", -1)])
def test_bad_values_are_refused_before_anything_is_written(field, value, tmp_path,
                                                           fashion, smoke_config):
  with pytest.raises(ConfigError, match=rf"config\.{field}"):
    train.train_and_evaluate(smoke_config(**{field: value}), str(tmp_path / "w"),
                             dataset=fashion)
  # Only the (released) folder: the corrected command is not blocked.
  assert list((tmp_path / "w").iterdir()) == []


def test_missing_init_from_leaves_the_workdir_reusable(fashion, tmp_path,
                                                       smoke_config):
  with pytest.raises((OSError, ValueError, RuntimeError), match="missing.pth"):
    train.train_and_evaluate(smoke_config(init_from=str(tmp_path / "missing.pth")),
                             str(tmp_path / "w"), dataset=fashion)
  assert not (tmp_path / "w" / "config.json").exists()


def test_torn_files_heal_or_name_themselves(fashion, tmp_path, smoke_config,
                                            read_metrics):
  config = smoke_config(num_epochs=1)
  results = compare.run_comparison(config, str(tmp_path), objectives=("ce",),
                                   seeds=1, dataset=fashion)
  run = workdir_lib.run_dir(tmp_path, "ce", 0)
  records = read_metrics(run)
  # A crash mid-append: the torn last line is dropped, the run completes.
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "split": "tra')
  summary = (run / "summary.json").read_text()
  (run / "summary.json").write_text(summary[:40])  # torn: rewritten by a rerun
  again = compare.run_comparison(config, str(tmp_path), objectives=("ce",),
                                 seeds=1, dataset=fashion)
  assert json.loads((run / "summary.json").read_text())["test_accuracy"] == (
      json.loads(summary)["test_accuracy"])
  assert read_metrics(run) == records
  assert again["results"]["ce"]["test_accuracy_mean"] == (
      results["results"]["ce"]["test_accuracy_mean"])
  # A torn config.json is named, with the way out.
  (run / "config.json").write_text("{")
  with pytest.raises(ValueError, match=r"config.json is unreadable .* new --workdir"):
    train.train_and_evaluate(config, str(run), dataset=fashion)


def test_unknown_config_field_names_the_nearest(tmp_path):
  result = subprocess.run(
      [sys.executable, "experiments/train.py",
       "--config=experiments/configs/fashion_mnist.py:smoke",
       f"--workdir={tmp_path}", "--config.optimizr.lr=0.1"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert "no field 'optimizr.lr' (nearest: optimizer.lr" in lines[0]
  assert not any(tmp_path.iterdir())


def test_validation_lists_every_field_it_checks():
  names = config_lib.field_names(config_lib.base_config())
  assert "optimizer.lr" in names and "baseline.center.lr" in names
  for path in config_lib.NON_NEGATIVE:
    assert path in names, path


def _object_store_on(root: Path):
  """etils' epath mocks that put ``gs://...`` paths under ``root``: the
  app's files go through epath's non-pathlib path class as on a bucket."""
  def local(path):
    text = str(path)
    return str(root / text[len("gs://"):]) if text.startswith("gs://") else text

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)
  return {**{k: one for k in ("open", "exists", "glob", "walk", "isdir", "listdir",
                              "makedirs", "mkdir", "remove", "rmtree", "stat")},
          **{k: two for k in ("rename", "replace", "copy")}}


def test_workdir_files_on_an_object_store_path(tmp_path, monkeypatch, smoke_config):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from etils.epath import testing as epath_testing  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  # CLU's TensorBoard writer has its own gs:// support; not under test here.
  monkeypatch.setattr(metric_writers, "create_default_writer",
                      lambda *a, **k: metric_writers.MultiWriter([]))
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past its own
  # mock: let the mocked backend answer.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  config = smoke_config()
  with epath_testing.mock_epath(**_object_store_on(tmp_path)):
    with workdir_lib.locked("gs://bucket/run") as run:
      assert not workdir_lib.is_local(run) and type(run).__name__ != "PosixPath"
      assert (tmp_path / "bucket" / "run" / ".lock").exists()
      with pytest.raises(workdir_lib.WorkdirBusy):  # another process's view
        workdir_lib.acquire(run)
      workdir_lib.write_config(config, run)
      workdir_lib.check_config(config, run)
      with pytest.raises(ConfigError, match="batch_size"):
        workdir_lib.check_config(config_lib.with_fields(config, batch_size=32), run)
      log = workdir_lib.MetricsLog(run, restored_step=0)
      log.write(1, "train", {"loss": 2.0})
      log.write(2, "train", {"loss": 1.5})  # an append, on a store without one
      log.close()
      assert [r["loss"] for r in workdir_lib.read_metrics(run)] == [2.0, 1.5]
      workdir_lib.save_throughput(run, 12.5)
      assert workdir_lib.load_throughput(run) == 12.5
      fig = plt.figure()
      report.save_figure(fig, run / "plot.png")
      plt.close(fig)
      assert workdir_lib.finished(run) is False
    assert not (tmp_path / "bucket" / "run" / ".lock").exists()
  on_disk = {p.name for p in (tmp_path / "bucket" / "run").iterdir()}
  assert {"config.json", "identity.json", "metrics.jsonl", "plot.png",
          "train_throughput.json"} <= on_disk
  del epath
