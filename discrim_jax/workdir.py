"""A run's folder: its lock, identity, metrics log, checkpoints and
finiteness check.

One process at a time: :func:`locked` takes ``WORKDIR/.lock`` (created with
``O_EXCL``, which shared filesystems honour where ``flock`` may not) before
anything in the workdir is read or written; a second process is refused in
one line naming the holder. A lock left by a process killed with -9 is taken
over: at once on the same host (its PID is gone), after ``STALE_AFTER_S``
elsewhere (the holder refreshes the file's time while it runs).

``config.json`` records the config a workdir was trained with, and
``identity.json`` the fields that make a run's identity
(``config_lib.IDENTITY_FIELDS``). A rerun with the same workdir resumes when
the identity agrees with both, and is refused with the difference shown
otherwise; other fields may change and the change is logged. A workdir with
checkpoints but neither file is refused. Both are written only once the run
has been built and has its initial weights, so a command that fails before
its first step leaves nothing that blocks the corrected command.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import contextlib
import json
import math
import os
import socket
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax

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


# ------------------------------------------------------------------ the lock

LOCK = ".lock"
# A lock whose holder runs on another host counts as left behind (its holder
# killed) when its file has not been refreshed for this long.
STALE_AFTER_S = 300.0
_REFRESH_S = 30.0
_held: dict[epath.Path, int] = {}  # this process's locks, re-entrant
_held_guard = threading.Lock()


class WorkdirBusy(RuntimeError):
  """Another process holds the workdir."""


def is_local(path) -> bool:
  """A path on this machine's file system (not ``gs://``, ``s3://``...)."""
  return "://" not in str(path)


def _mtime(path: epath.Path) -> float:
  stat = path.stat()
  return float(getattr(stat, "st_mtime", None) or getattr(stat, "mtime", 0))


def _holder(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # being written, or torn: judged by its age


def _stale(path: epath.Path, holder: dict[str, Any] | None) -> bool:
  if holder and holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, ValueError, KeyError):
      return False
    return False
  try:
    return time.time() - _mtime(path) > STALE_AFTER_S
  except FileNotFoundError:
    return True


def acquire(workdir: epath.Path) -> None:
  """Creates ``workdir/.lock`` for this process, taking over a stale one;
  :class:`WorkdirBusy` if a live process holds it. Not re-entrant: use
  :func:`locked`, which calls it once per process."""
  path = workdir / LOCK
  record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
  for _ in range(3):
    try:
      if not is_local(path):  # object stores have no atomic create
        if path.exists():
          raise FileExistsError(path)
        path.write_text(record)
        return
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if _stale(path, holder):
        logging.warning("took over the lock of %s left by %s", workdir, holder)
        with contextlib.suppress(FileNotFoundError):
          path.unlink()
        continue
      who = (f"process {holder['pid']} on {holder['host']} since {holder['since']}"
             if holder else "another process")
      raise WorkdirBusy(
          f"workdir {workdir} is in use by {who} (lock file {path}); wait for "
          "that run to end or use another --workdir; if that process is gone, "
          f"delete {path}") from None
    with os.fdopen(fd, "w") as f:
      f.write(record)
    return
  raise WorkdirBusy(f"could not take the lock {path}: other processes keep "
                    "taking it; use another --workdir")


@contextlib.contextmanager
def locked(workdir):
  """Holds ``workdir``'s lock (creating the folder) for the block; re-entrant
  within a process. Only process 0 of a multi-process run takes it."""
  workdir = epath.Path(workdir)
  if is_local(workdir):
    workdir = workdir.absolute()
  if jax.process_index() != 0:
    yield workdir
    return
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise NotADirectoryError(
        f"--workdir {workdir} is a file, not a folder; name a folder") from None
  with _held_guard:
    first = workdir not in _held
    if first:
      acquire(workdir)
    _held[workdir] = _held.get(workdir, 0) + 1
  stop = threading.Event()
  refresher = None
  if first:
    def refresh():
      while not stop.wait(_REFRESH_S):
        with contextlib.suppress(OSError):
          if is_local(workdir):
            os.utime(workdir / LOCK)
          else:
            lock = workdir / LOCK
            lock.write_text(lock.read_text())
    refresher = threading.Thread(target=refresh, daemon=True)
    refresher.start()
  try:
    yield workdir
  finally:
    stop.set()
    with _held_guard:
      _held[workdir] -= 1
      if not _held[workdir]:
        del _held[workdir]
        with contextlib.suppress(FileNotFoundError):
          (workdir / LOCK).unlink()


# -------------------------------------------------------------- the identity

IDENTITY = epath.Path("identity.json")
# The run's whole config, as given (the identity is the part that decides
# its results).
CONFIG = "config.json"


def read_json(path: epath.Path) -> Any:
  """A workdir file's JSON; a one-line ValueError naming the file if torn."""
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(
        f"{path} is unreadable ({e}); a crash or a full disk may have cut it: "
        "restore it from a copy, or use a new --workdir") from None


def _has_checkpoints(workdir: epath.Path) -> bool:
  saved = workdir / "checkpoints"
  return saved.is_dir() and any(p.is_dir() for p in saved.iterdir())


def check_config(config, workdir: epath.Path) -> None:
  """Refuses a workdir that holds a run of another identity, or checkpoints
  of no known identity (ConfigError); logs the other fields a resume
  changes. Writes nothing."""
  current = json.loads(config.to_json_best_effort())
  mine = config_lib.identity(current)
  sources = []
  path = workdir / CONFIG
  if path.exists():
    saved = read_json(path)
    sources.append((CONFIG, config_lib.identity(saved)))
    others = _diff(saved, current)
    if others:
      logging.info("resuming %s with changed settings that do not change its "
                   "results: %s", workdir, "; ".join(others))
  if (workdir / IDENTITY).exists():
    sources.append((str(IDENTITY), read_json(workdir / IDENTITY)))
  if not sources and _has_checkpoints(workdir):
    raise ConfigError(
        f"workdir {workdir} holds checkpoints but neither {CONFIG} nor "
        f"{IDENTITY}, so which config they belong to is unknown; restore those "
        "files, or use a new --workdir")
  for name, saved in sources:
    differences = _diff(saved, mine)
    if differences:
      raise ConfigError(
          f"workdir {workdir} holds a run with a different config ("
          + "; ".join(differences) + f") recorded in {name}; use a new "
          "--workdir to start a new run")


def write_atomically(path: epath.Path, text: str) -> None:
  """``text`` into ``path`` through a temporary file and a rename: a reader
  sees the old file or the new one, never a part."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_config(config, workdir: epath.Path) -> None:
  """Writes ``config.json`` and the identity beside the checkpoints
  (process 0), each unless the workdir has it."""
  if jax.process_index() != 0:
    return
  current = json.loads(config.to_json_best_effort())
  path = workdir / CONFIG
  if not path.exists():
    write_atomically(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
  path = workdir / IDENTITY
  if not path.exists():
    write_atomically(path, json.dumps(config_lib.identity(current), indent=2,
                                sort_keys=True) + "\n")


def write_classes(names, workdir: epath.Path) -> None:
  """Writes ``classes.json``, the class names in label order (process 0),
  unless there are none or the workdir has it."""
  path = workdir / "classes.json"
  if names and jax.process_index() == 0 and not path.exists():
    path.write_text(json.dumps(list(names), indent=1) + "\n")


# A run's log: one JSON object per logged step and split.
METRICS = "metrics.jsonl"


def read_metrics(workdir: epath.Path) -> list[dict[str, Any]]:
  """The records of a run's :data:`METRICS`. A torn last line (what a crash
  or a full disk leaves in an append-only file) is dropped with a warning; an
  unreadable line before it is a one-line ValueError naming the file."""
  path = epath.Path(workdir) / METRICS
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if i == len(lines) - 1:
        logging.warning("dropped the torn last line of %s: %r", path, line[:80])
        break
      raise ValueError(f"{path} line {i + 1} is unreadable ({e}); move the file "
                       "aside or use a new --workdir") from None
  return records


class MetricsLog:
  """``metrics.jsonl`` plus CLU writers; only process 0 writes."""

  def __init__(self, workdir: epath.Path, restored_step: int):
    self._primary = jax.process_index() == 0
    self.path = workdir / METRICS
    if self._primary and self.path.exists():
      # Records after the restored checkpoint belong to the lost tail of an
      # interrupted run, and the test record to the end of a finished one:
      # this run writes them again.
      kept = [json.dumps(r) for r in read_metrics(workdir)
              if r["step"] <= restored_step and r["split"] != "test"]
      write_atomically(self.path, "".join(k + "\n" for k in kept))
    # CLU's writers import TensorFlow, so CLU is imported where a run starts:
    # build() and the compiled steps need JAX alone (see experiments/bench.py).
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not self._primary, asynchronous=False)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()})
    if self._primary:
      line = json.dumps({"step": step, "split": split, **values}) + "\n"
      if is_local(self.path):
        with self.path.open("a") as f:
          f.write(line)
      else:  # object stores cannot append: the file is written again
        old = self.path.read_text() if self.path.exists() else ""
        self.path.write_text(old + line)

  def close(self):
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
      self.writer = None


# Checked after the loss terms: a non-finite gradient, update or parameter
# with a finite loss (an overflow in the backward pass or the optimiser).
_NORMS = ("grad_norm", "update_norm", "param_norm")


def check_finite(history: list[dict[str, float]], first_step: int,
                 last_good: int | None, workdir: epath.Path) -> None:
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


def run_dir(root: epath.Path, objective: str, seed: int) -> epath.Path:
  """Where the harness (compare, study) keeps one run: ``ROOT/OBJECTIVE/seedN``."""
  return epath.Path(root) / objective / f"seed{seed}"


# A finished run's record: test accuracy, best validation step, wall time...
SUMMARY = "summary.json"


def write_summary(workdir: epath.Path, summary: dict[str, Any]) -> None:
  """Writes a finished run's :data:`SUMMARY` (strict JSON)."""
  write_atomically(workdir / SUMMARY, json.dumps(
      summary, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_summary(workdir: epath.Path) -> dict[str, Any]:
  """A finished run's :data:`SUMMARY`; a one-line error if torn."""
  return read_json(workdir / SUMMARY)


def finished(workdir: epath.Path) -> bool:
  """A run with a readable :data:`SUMMARY` (a torn one is rewritten by
  running the command again: the run restores its last checkpoint and
  only tests)."""
  try:
    json.loads((workdir / SUMMARY).read_text())
  except (OSError, ValueError):
    return False
  return True


_THROUGHPUT = "train_throughput.json"


def save_throughput(workdir: epath.Path, images_per_s: float | None) -> None:
  """Records the training images/s this run measured (process 0); a rerun
  that trains nothing measures nothing and keeps the earlier figure."""
  if jax.process_index() == 0 and images_per_s is not None:
    write_atomically(workdir / _THROUGHPUT,
               json.dumps({"train_images_per_s": images_per_s}) + "\n")


def load_throughput(workdir: epath.Path) -> float | None:
  """The training images/s of :func:`save_throughput`, else that of an
  earlier ``summary.json`` (runs from before the file existed), or None."""
  for name in (_THROUGHPUT, SUMMARY):
    try:
      return json.loads((workdir / name).read_text())["train_images_per_s"]
    except (OSError, ValueError, KeyError):
      continue
  return None
