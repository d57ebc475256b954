"""Stopping a run at a safe point: SIGTERM/SIGINT (or a multi-host
preemption notice) ask; the loop checks after each step and at each phase,
saves what resuming needs, and raises :class:`Preempted`."""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import logging
import jax


class Preempted(Exception):
  """A run stopped by SIGTERM/SIGINT (or a multi-host preemption notice) after
  saving a checkpoint of its last step; rerunning the command resumes it."""

  exit_code = 75  # EX_TEMPFAIL: try again


class StopRequests:
  """SIGTERM and SIGINT set a flag that the loop reads after each step (one
  process); several processes agree on the step through orbax/JAX's
  preemption sync point instead, which JAX's own SIGTERM handler drives."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal is not None:  # the second: at once, one line, no traceback
      print(f"stopped at once by a second {name}; the last saved checkpoint "
            "is kept: rerun the same command to resume", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal = signum
    logging.warning("received %s: stopping at the next safe point (a second "
                    "one stops at once)", name)

  def raise_if_stopped(self, where: str) -> None:
    """Preempted when a stop was asked for: at a point where everything
    needed to resume is saved."""
    if self.signal is not None:
      raise Preempted(f"stopped by {signal.Signals(self.signal).name} {where}; "
                      "rerun the same command to resume")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def stop(self, manager, step: int) -> str | None:
    """Why the run must stop after ``step``, or None."""
    if self.signal is not None:
      return signal.Signals(self.signal).name
    if jax.process_count() > 1 and manager.reached_preemption(step):
      return "a preemption notice"
    return None
