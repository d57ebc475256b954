"""Helpers for the absl entry points in experiments/: one-line errors."""

from __future__ import annotations

import os
import sys

from absl import flags


def one_line(error: BaseException) -> str:
  """The gist of an error on one line (for nested tracebacks, their last line)."""
  text = str(error).replace("\\n", "\n")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  return " ".join(lines)


def parse_flags(argv):
  """absl's flag parser, with a one-line error for a bad flag or override."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: bad flag: {one_line(e)} (see --helpfull)", file=sys.stderr)
    sys.exit(2)


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache: a rerun or resume skips the compile.

  The folder is ``$DISCRIM_JAX_CACHE`` or ``~/.cache/discrim_jax/jax_cache``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get("DISCRIM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "discrim_jax", "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_with_one_line_errors(fn):
  """Runs ``fn()`` for an entry point: quiet library logs, the compilation
  cache, and a one-line ``error: ...`` with exit status 1 for the errors a
  user can act on (bad config values, missing data, NaN, unreadable
  checkpoints)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from discrim_jax import train  # pylint: disable=g-import-not-at-top
  train.quiet_library_logs()
  enable_compilation_cache()
  try:
    return fn()
  except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
    logging.flush()
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)
