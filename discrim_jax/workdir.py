"""A run's folder: its identity, metrics log, checkpoints and finiteness check.

``config.json`` records the config a workdir was trained with. A rerun with
the same workdir resumes when the fields that make a run's identity
(``config_lib.IDENTITY_FIELDS``) agree, and is refused with the difference
shown otherwise; other fields may change and the change is logged. The file is
written only once the run has been built, so a config that fails to build
leaves nothing that blocks the corrected command.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import json
import math
from pathlib import Path
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from discrim_jax import config_lib
from discrim_jax.config_lib import ConfigError


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  a, b = _flat(a), _flat(b)
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_config(config, workdir: Path) -> None:
  """Refuses a workdir that holds a run of another identity (ConfigError);
  logs the other fields a resume changes. Writes nothing."""
  path = workdir / "config.json"
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  current = json.loads(config.to_json_best_effort())
  differences = _diff(config_lib.identity(saved), config_lib.identity(current))
  if differences:
    raise ConfigError(
        f"workdir {workdir} holds a run with a different config ("
        + "; ".join(differences) + "); use a new --workdir to start a new run")
  others = _diff(saved, current)
  if others:
    logging.info("resuming %s with changed settings that do not change its "
                 "results: %s", workdir, "; ".join(others))


def write_config(config, workdir: Path) -> None:
  """Writes ``config.json`` (process 0) unless the workdir has one."""
  path = workdir / "config.json"
  if jax.process_index() == 0 and not path.exists():
    current = json.loads(config.to_json_best_effort())
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def write_classes(names, workdir: Path) -> None:
  """Writes ``classes.json``, the class names in label order (process 0),
  unless there are none or the workdir has it."""
  path = workdir / "classes.json"
  if names and jax.process_index() == 0 and not path.exists():
    path.write_text(json.dumps(list(names), indent=1) + "\n")


class MetricsLog:
  """``metrics.jsonl`` plus CLU writers; only process 0 writes."""

  def __init__(self, workdir: Path, restored_step: int):
    self._primary = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    if self._primary and self.path.exists():
      # Records after the restored checkpoint belong to the lost tail of an
      # interrupted run, and the test record to the end of a finished one:
      # this run writes them again.
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line)["step"] <= restored_step
              and json.loads(line)["split"] != "test"]
      self.path.write_text("".join(k + "\n" for k in kept))
    # CLU's writers import TensorFlow, so CLU is imported where a run starts:
    # build() and the compiled steps need JAX alone (see experiments/bench.py).
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not self._primary, asynchronous=False)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()})
    if self._primary:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, "split": split, **values}) + "\n")

  def close(self):
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
      self.writer = None


# Checked after the loss terms: a non-finite gradient, update or parameter
# with a finite loss (an overflow in the backward pass or the optimiser).
_NORMS = ("grad_norm", "update_norm", "param_norm")


def check_finite(history: list[dict[str, float]], first_step: int,
                 last_good: int | None, workdir: Path) -> None:
  """Raises FloatingPointError naming the first non-finite loss term, or
  gradient, update or parameter norm."""
  for offset, metrics in enumerate(history):
    terms = (["loss", "ce"] + sorted(k for k in metrics if "/" in k)
             + [k for k in _NORMS if k in metrics])
    for term in terms:
      value = metrics[term]
      if not math.isfinite(value):
        kept = (f"the last good checkpoint (step {last_good}) is kept in "
                f"{workdir / 'checkpoints'}" if last_good is not None
                else "no checkpoint had been saved yet")
        raise FloatingPointError(
            f"non-finite {term} = {value} at step {first_step + offset}; {kept}; "
            "lower --config.optimizer.lr or the loss weights, then rerun")


def checkpoint_manager(config, workdir: Path) -> ocp.CheckpointManager:
  """Keeps the latest ``config.keep_checkpoints`` and the best by validation
  accuracy."""
  best_metric = lambda m: m["accuracy"]  # pylint: disable=unnecessary-lambda-assignment
  options = ocp.CheckpointManagerOptions(
      best_fn=best_metric, best_mode="max",  # makes the manager keep metrics
      preservation_policy=checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=config.keep_checkpoints),
          checkpoint_managers.BestN(get_metric_fn=best_metric, n=1),
      ]),
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                               options=options)


def restore(manager, step: int, abstract_state, workdir: Path):
  """The state saved at ``step``; a one-line RuntimeError if unreadable."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises many types for unreadable files
    raise RuntimeError(
        f"cannot restore the checkpoint of step {step} in {workdir / 'checkpoints'} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); move that step's "
        "folder aside to resume from an earlier one, or use a new --workdir"
    ) from None


def restore_latest(config, workdir: Path, abstract_state):
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
  manager = checkpoint_manager(config, workdir)
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


def save_interval(workdir: Path, manager, step: int, first_step: int,
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
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(saved, allow_nan=True))
  tmp.rename(path)


def load_interval(workdir: Path, step: int) -> tuple[int, list[dict[str, float]]]:
  """``(first step, per-step metrics)`` of the log interval that a run
  restored at ``step`` is in the middle of (nothing when ``step`` ended one)."""
  path = workdir / _INTERVALS
  if path.exists():
    entry = json.loads(path.read_text()).get(str(step))
    if entry is not None:
      return entry["first_step"], entry["history"]
  return step + 1, []
