"""A run's checkpoints: orbax's manager (the latest N and the best by
validation accuracy), restoring the newest readable one (unreadable ones are
moved aside, never deleted), and the per-step metrics of the log interval a
checkpoint cuts, so that a resumed run logs what an uninterrupted one does.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import json
import logging as std_logging
import sys
import time

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from discrim_jax import workdir as workdir_lib


def _save_replicas_whole_on_cpu() -> None:
  """On CPU, saves each replicated array from one replica, not a slice from
  each. Orbax's replica-parallel saving (its default off GPU) cuts every
  replicated array into one slice per device with a jitted slice, compiled
  once per shape: on CPU devices, which share one host's memory, that buys
  nothing and cost 11 s per save of a ResNet-17 on 8 CPU devices (a 2-core
  Xeon). The files are the same either way. The handler keeps the default
  one's array-metadata store (a private attribute; None if it moves)."""
  if jax.default_backend() != "cpu":
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, "_use_replica_parallel", True):
    def expected(record) -> bool:  # orbax's warning of the asked-for override
      return not str(record.msg).startswith("Type handler registry type")
    std_logging.getLogger("absl").addFilter(expected)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(
              use_replica_parallel=False,
              array_metadata_store=getattr(default, "_array_metadata_store", None)),
          override=True)
    finally:
      std_logging.getLogger("absl").removeFilter(expected)


def quiet_closed_event_loops() -> None:
  """Drops the "Event loop is closed" errors that tensorstore's callbacks
  raise when orbax has closed the event loop of a failed restore or save:
  reads and writes still in flight finish on other threads, during the
  failure or seconds later, and each prints a traceback (an unraisable
  exception) that says nothing a user can act on, beside the one-line
  message that does. They go to the log at debug level; any other
  unraisable exception is handled as before. Installed once per process, by
  the first :func:`checkpoint_manager`, by ``pretrained.load_pretrained``
  before it reads converted weights, and by the entry points at start."""
  default = sys.unraisablehook
  if getattr(default, "drops_closed_event_loops", False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and "Event loop is closed" in str(unraisable.exc_value)):
      logging.debug("ignored after a closed event loop: %r", unraisable.exc_value)
      return
    default(unraisable)

  hook.drops_closed_event_loops = True
  sys.unraisablehook = hook


def checkpoint_manager(keep: int, workdir: epath.Path) -> ocp.CheckpointManager:
  """Keeps the latest ``keep`` checkpoints (``config.keep_checkpoints``) and
  the best by validation accuracy."""
  _save_replicas_whole_on_cpu()
  quiet_closed_event_loops()
  best_metric = lambda m: m["accuracy"]  # pylint: disable=unnecessary-lambda-assignment
  options = ocp.CheckpointManagerOptions(
      best_fn=best_metric, best_mode="max",  # makes the manager keep metrics
      preservation_policy=checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=keep),
          checkpoint_managers.BestN(get_metric_fn=best_metric, n=1),
      ]),
      cleanup_tmp_directories=True)
  path = workdir / "checkpoints"
  return ocp.CheckpointManager(path.absolute() if workdir_lib.is_local(path) else path,
                               options=options)


def restore(manager, step: int, abstract_state, workdir: epath.Path):
  """The state saved at ``step``; a one-line RuntimeError if unreadable."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises many types for unreadable files
    raise RuntimeError(
        f"cannot restore the checkpoint of step {step} in {workdir / 'checkpoints'} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); move that step's "
        "folder aside to resume from an earlier one, or use a new --workdir"
    ) from None


def restore_latest(keep: int, workdir: epath.Path, abstract_state):
  """``(manager, step, state)`` from the newest readable checkpoint, or
  ``(manager, None, None)`` when the workdir has none.

  A checkpoint that cannot be read is moved aside, never deleted, into
  ``workdir/unreadable_checkpoints/`` (the log says which step and why), and
  the next older one is tried. When none is readable, or a workdir holds only
  checkpoints moved aside earlier, it stops with a one-line RuntimeError
  rather than start again over the earlier run's records.
  """
  aside_dir = workdir / "unreadable_checkpoints"
  saved = workdir / "checkpoints"
  if aside_dir.exists() and not (saved.exists() and any(saved.iterdir())):
    raise RuntimeError(  # before orbax starts any background work
        f"no readable checkpoint in {saved}; unreadable ones were moved to "
        f"{aside_dir}; nothing was deleted; use a new --workdir to start again")
  manager = checkpoint_manager(keep, workdir)
  skipped = []
  while manager.latest_step() is not None:
    step = manager.latest_step()
    try:
      return manager, step, restore(manager, step, abstract_state, workdir)
    except RuntimeError as e:
      if jax.process_count() > 1:
        raise  # every process must agree; leave the choice to a person
      aside = aside_dir / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
      aside_dir.mkdir(exist_ok=True)
      (saved / str(step)).rename(aside)
      logging.warning("skipped the checkpoint of step %d, moved to %s: %s",
                      step, aside, e)
      skipped.append(f"step {step} (moved to {aside})")
      manager.reload()  # the steps on disk, without the one moved aside
  if skipped:
    manager.close()
    raise RuntimeError(
        f"no readable checkpoint in {saved}: " + ", ".join(skipped)
        + "; nothing was deleted; use a new --workdir to start again")
  return manager, None, None


_INTERVALS = "train_intervals.json"


def save_interval(workdir: epath.Path, manager, step: int, first_step: int,
                  history: list[dict[str, float]]) -> None:
  """Records the per-step metrics of the log interval a checkpoint of
  ``step`` cuts (steps ``first_step``..``step``), for :func:`load_interval`.
  Entries of checkpoints that no longer exist are dropped."""
  if jax.process_index() != 0:
    return
  path = workdir / _INTERVALS
  saved = json.loads(path.read_text()) if path.exists() else {}
  keep = {str(s) for s in manager.all_steps()}
  saved = {k: v for k, v in saved.items() if k in keep}
  saved[str(step)] = {"first_step": first_step, "history": history}
  workdir_lib.write_atomically(path, json.dumps(saved, allow_nan=True))


def load_interval(workdir: epath.Path, step: int) -> tuple[int, list[dict[str, float]]]:
  """``(first step, per-step metrics)`` of the log interval that a run
  restored at ``step`` is in the middle of (nothing when ``step`` ended one)."""
  path = workdir / _INTERVALS
  if path.exists():
    entry = json.loads(path.read_text()).get(str(step))
    if entry is not None:
      return entry["first_step"], entry["history"]
  return step + 1, []
