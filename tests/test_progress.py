"""The progress display: a bar on a terminal, plain lines elsewhere."""

import io

from discrim_jax import progress as progress_lib


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_plain_lines_without_carriage_returns_off_a_terminal():
  out = io.StringIO()
  p = progress_lib.Progress(10, 0, batch_size=4, desc="ce seed 0", stream=out,
                            plain_every_s=0.0)
  for step in range(1, 11):
    p.update(step, loss=2.0 / step)
  p.note("ce seed 0: step 10/10, validation accuracy 0.5")
  p.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert lines[0].startswith("ce seed 0: step 1/10, loss 2")
  assert lines[-2].startswith("ce seed 0: step 10/10, loss 0.2")
  assert "img/s" in lines[-2] and lines[-1].endswith("accuracy 0.5")


def test_plain_lines_are_rate_limited():
  out = io.StringIO()
  p = progress_lib.Progress(100, 0, batch_size=4, stream=out, plain_every_s=3600)
  for step in range(1, 101):
    p.update(step)
  # The first update and the last step only.
  assert len(out.getvalue().splitlines()) == 2


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
  term = _Terminal()
  p = progress_lib.Progress(10, 2, batch_size=4, stream=term)
  p.update(5, loss=1.0)
  p.note("a note")
  p.close()
  assert "\r" in term.getvalue() and "5/10" in term.getvalue()
  assert "a note" in term.getvalue()
  quiet = io.StringIO()
  p = progress_lib.Progress(10, 0, batch_size=4, stream=quiet, enabled=False)
  p.update(3, loss=1.0)
  p.note("hidden")
  assert quiet.getvalue() == ""
