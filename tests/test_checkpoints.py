"""A workdir's checkpoints and identity across runs: unreadable checkpoints
moved aside, another config refused, non-identity changes accepted."""

import json
import shutil
import sys
import types

from etils import epath
import pytest

from discrim_jax import checkpoints
from discrim_jax import config_lib
from discrim_jax import train
from discrim_jax import workdir as workdir_lib

# A failed restore leaves tensorstore reads in flight whose callbacks find
# orbax's event loop closed; each would print a traceback (an unraisable
# exception) after the one-line message. None may reach pytest here.
pytestmark = pytest.mark.filterwarnings(
    "error::pytest.PytestUnraisableExceptionWarning")


class Interrupt(Exception):
  pass


def test_workdir_with_other_config_is_refused(tmp_path, smoke_config):
  workdir_lib.write_config(smoke_config(), tmp_path)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(config_lib.ConfigError,
                     match=r"different config \(objective: 'gini_kl' -> 'ce'\).*new --workdir"):
    workdir_lib.check_config(smoke_config(objective="ce"), tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"optimizer.lr: 0.1 -> 0.2"):
    workdir_lib.check_config(smoke_config(**{"optimizer.lr": 0.2}), tmp_path)
  assert (tmp_path / "config.json").read_text() == before


def test_workdir_resumes_when_only_non_identity_fields_change(tmp_path, smoke_config):
  workdir_lib.write_config(smoke_config(), tmp_path)
  changed = smoke_config(xla_cpu_ynn_fusion="", xla_cpu_fusion_barriers=False,
                         log_every_steps=7, eval_every_epochs=2,
                         keep_checkpoints=5, data_dir="/elsewhere",
                         num_devices=-1)
  assert set(config_lib.IDENTITY_FIELDS).isdisjoint(
      {"xla_cpu_ynn_fusion", "xla_cpu_fusion_barriers", "log_every_steps",
       "eval_every_epochs", "keep_checkpoints", "data_dir", "num_devices"})
  workdir_lib.check_config(changed, tmp_path)
  workdir_lib.write_config(changed, tmp_path)  # keeps the run's first record
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["log_every_steps"] == 2 and saved["xla_cpu_fusion_barriers"] is True
  # A workdir written before a non-identity field existed resumes too.
  del saved["xla_cpu_fusion_barriers"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_config(smoke_config(), tmp_path)


def test_unreadable_latest_checkpoint_is_moved_aside_and_an_older_one_used(
    corrupt_checkpoint, fashion, whole, tmp_path, smoke_config, read_metrics):
  config = smoke_config()  # the config of `whole`, the uninterrupted run

  def die_at(step):
    if step == 9:
      raise Interrupt()

  work = tmp_path / "cut"
  with pytest.raises(Interrupt):
    train.train_and_evaluate(config, str(work), dataset=fashion, step_callback=die_at)
  # A newer checkpoint (a copy of step 5's as step 7) whose files are corrupt.
  shutil.copytree(work / "checkpoints" / "5", work / "checkpoints" / "7")
  assert corrupt_checkpoint(work / "checkpoints" / "7", "manifest")
  train.train_and_evaluate(config, str(work), dataset=fashion)
  aside = list((work / "unreadable_checkpoints").iterdir())
  assert [p.name.split(".")[0] for p in aside] == ["7"]
  assert read_metrics(work) == whole


@pytest.mark.parametrize("kind", ["manifest", "_METADATA", "data"])
def test_no_readable_checkpoint_stops_with_one_line_and_keeps_files(
    corrupt_checkpoint, fashion, tmp_path, smoke_config, kind):
  config = smoke_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert corrupt_checkpoint(tmp_path / "checkpoints" / "5", kind), kind
  with pytest.raises(RuntimeError,
                     match=r"no readable checkpoint .*step 5 \(moved to .*nothing was deleted"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  (moved,) = (tmp_path / "unreadable_checkpoints").iterdir()
  assert any(p.is_file() for p in moved.rglob("*"))
  # Rerunning does not start again over the earlier run's records.
  records = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(RuntimeError, match=r"unreadable ones were moved to .*new --workdir"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert (tmp_path / "metrics.jsonl").read_text() == records


def test_checkpoint_with_corrupt_step_metadata_still_resumes(
    corrupt_checkpoint, fashion, tmp_path, smoke_config):
  """orbax's per-step _CHECKPOINT_METADATA (timestamps) is not needed to
  restore: such a checkpoint is used, not moved aside."""
  config = smoke_config(num_epochs=1)
  first = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert corrupt_checkpoint(tmp_path / "checkpoints" / "5", "_CHECKPOINT_METADATA")
  again = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert again["test_accuracy"] == first["test_accuracy"]
  assert not (tmp_path / "unreadable_checkpoints").exists()


def test_checkpoints_drop_only_closed_event_loop_errors(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)  # undone after the test
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  sys.unraisablehook(closed)  # before the app used orbax: passed on
  hooks = []
  for _ in range(2):
    checkpoints.checkpoint_manager(1, epath.Path(tmp_path)).close()
    hooks.append(sys.unraisablehook)
  assert hooks[0] is hooks[1]  # installed once
  sys.unraisablehook(closed)
  sys.unraisablehook(other)
  assert seen == [closed, other]


def test_loading_converted_weights_drops_closed_event_loop_errors(tmp_path,
                                                                   monkeypatch):
  """Converted weights are an orbax folder read without a checkpoint
  manager: reading one installs the same filter, readable or not."""
  from discrim_jax import pretrained  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "_METADATA").write_text("not a checkpoint")
  with pytest.raises(ValueError):  # orbax reads the metadata as JSON
    pretrained.load_pretrained(tmp_path / "junk", "resnet18", {})
  assert getattr(sys.unraisablehook, "drops_closed_event_loops", False)


def test_the_cpu_save_handler_replaces_orbax_default_without_a_warning(
    tmp_path, caplog):
  """On CPU the app saves each replicated array whole (checkpoints.py);
  orbax's warning about that override, which the app asks for, is kept off
  the console (it printed on every run)."""
  import logging  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from discrim_jax import checkpoints  # pylint: disable=g-import-not-at-top
  handlers = ocp.type_handlers
  handlers.register_type_handler(jax.Array, handlers.ArrayHandler(), override=True)
  assert handlers.get_type_handler(jax.Array)._use_replica_parallel  # pylint: disable=protected-access
  caplog.clear()  # orbax's warning for the line above
  with caplog.at_level(logging.WARNING):
    checkpoints.checkpoint_manager(1, epath.Path(tmp_path)).close()
  assert not handlers.get_type_handler(jax.Array)._use_replica_parallel  # pylint: disable=protected-access
  assert not [r.getMessage() for r in caplog.records if "overriding" in r.getMessage()]
