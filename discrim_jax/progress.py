"""What a person sees while a run trains: one progress line and short notes.

On a terminal, a tqdm bar (step/total, images/s, ETA, the latest loss and
accuracy) that rewrites itself; on anything else (CI, a pipe, a file), plain
lines at most every ``plain_every_s`` seconds, never carriage returns. Notes
(evaluation results) are printed as lines of their own. Only process 0 shows
anything. The full log (absl INFO, CLU's metric echo) goes to the workdir's
``log.txt`` when an entry point routes it there (``cli.route_logs``).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import sys
import time
from typing import TextIO


class Progress:
  """A run's progress display from step ``initial`` to ``total``."""

  def __init__(self, total: int, initial: int, *, batch_size: int,
               desc: str = "train", enabled: bool = True,
               stream: TextIO | None = None, plain_every_s: float = 30.0):
    self.total, self.step, self.batch_size = total, initial, batch_size
    self.desc = desc
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.plain_every_s = plain_every_s
    self._start, self._start_step = time.time(), initial
    self._last_plain = 0.0
    self._latest: dict[str, float] = {}
    self._bar = None
    if enabled and self.stream.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       file=self.stream, dynamic_ncols=True, leave=True)

  def update(self, step: int, **latest: float) -> None:
    """Advances to ``step``; ``latest``: values to show (loss, accuracy)."""
    if not self.enabled:
      return
    done, self.step = step - self.step, step
    self._latest.update(latest)
    rate = self.images_per_s()
    shown = {k: f"{v:.4g}" for k, v in self._latest.items()}
    if rate is not None:
      shown["img/s"] = f"{rate:.0f}"
    if self._bar is not None:
      self._bar.set_postfix(shown, refresh=False)
      self._bar.update(done)
      return
    now = time.time()
    if now - self._last_plain >= self.plain_every_s or step == self.total:
      self._last_plain = now
      eta = self.eta_s()
      parts = [f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in shown.items()]
      if eta is not None:
        parts.append(f"ETA {eta / 60:.1f} min")
      self.note(f"{self.desc}: " + ", ".join(parts))

  def images_per_s(self) -> float | None:
    elapsed, steps = time.time() - self._start, self.step - self._start_step
    return steps * self.batch_size / elapsed if steps and elapsed > 0 else None

  def eta_s(self) -> float | None:
    elapsed, steps = time.time() - self._start, self.step - self._start_step
    return (self.total - self.step) * elapsed / steps if steps else None

  def note(self, text: str) -> None:
    """A line of its own (above the bar on a terminal)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
