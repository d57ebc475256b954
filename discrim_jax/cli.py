"""Process start-up for the absl entry points in experiments/: one-line
errors, log routing, the compilation cache and ``jax.distributed``."""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import contextlib
import errno
import logging as std_logging
import os
from pathlib import Path
import sys

from absl import flags
from absl import logging


def one_line(error: BaseException) -> str:
  """The gist of an error on one line (for nested tracebacks, their last line)."""
  text = str(error).replace("\\n", "\n")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  return " ".join(lines)


_VERBOSE = flags.DEFINE_bool(
    "verbose", False,
    "Print the full log (absl INFO records, CLU's metric lines, TFDS's "
    "progress bars) on the console too; it always goes to WORKDIR/log.txt.")


_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False,
    "Check the flags and the config (values, objectives, cells, device count) "
    "and exit, without reading data or touching the workdir.")


def dry_run(what: str, configs=()) -> bool:
  """With ``--dry_run``: validates ``configs`` and prints one line; True when
  the entry point should stop there."""
  if not _DRY_RUN.value:
    return False
  quiet_console()
  import jax  # pylint: disable=g-import-not-at-top
  from discrim_jax import run_spec  # pylint: disable=g-import-not-at-top
  for config in configs:
    run_spec.resolve(config, jax.device_count(), jax.devices()[0].platform)
  print(f"dry run: {what}: {len(configs)} config(s) valid")
  return True


def route_logs(workdir: str) -> Path:
  """Sends the full log to ``workdir/log.txt`` (for a workdir on an object
  store, ``gs://...``, to ``cache_root()/logs/``, since those cannot be
  appended to); the console keeps warnings, errors, the progress line and
  the results unless ``--verbose``."""
  quiet_console()
  # A log record that cannot be written (a full disk) must not print a
  # traceback per record: the error that stops the run says it once.
  std_logging.raiseExceptions = False
  if "://" in str(workdir):
    name = "".join(c if c.isalnum() else "_" for c in str(workdir))
    path = Path(cache_root()) / "logs" / name
    print(f"log of {workdir} in {path / 'log.txt'}", file=sys.stderr)
  else:
    path = Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  handler = std_logging.FileHandler(path / "log.txt")
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)
  return path / "log.txt"


def quiet_console() -> None:
  """Keeps INFO records off the console unless ``--verbose`` (they go to
  the log file once :func:`route_logs` names it)."""
  if not _VERBOSE.value:
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    os.environ["DISCRIM_JAX_QUIET_TFDS"] = "1"


@contextlib.contextmanager
def in_workdir(workdir: str):
  """For the block: the workdir's lock (one process at a time; taken before
  any file in it is touched), then the full log routed into it."""
  from discrim_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with workdir_lib.locked(workdir):
    route_logs(workdir)
    yield


def parse_flags(argv):
  """absl's flag parser, with a one-line error for a bad flag or override."""
  missing = _missing_config_file(argv)
  if missing:
    print(f"error: {missing}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: bad flag: {one_line(e)}{_unknown_field_hint(argv)} (see "
          "--helpfull)", file=sys.stderr)
    sys.exit(2)


def _missing_config_file(argv) -> str:
  """For ``--config=FILE[:ARGS]`` (or ``--config FILE``) naming no file: the
  error, with the experiment configs (ml_collections would say it only when
  the config is first read, after a long preamble)."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(args):
      value = args[i + 1]
    else:
      continue
    path = Path(value.split(":", 1)[0])
    if "://" in value or path.is_file():
      return ""
    folder = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    configs = sorted(os.path.relpath(p) for p in folder.glob("*.py")
                     if p.name != "__init__.py")
    return (f"--config={value}: no such file {str(path)!r}"
            + (f"; config files: {', '.join(configs)}" if configs else ""))
  return ""


def _unknown_field_hint(argv) -> str:
  """For a ``--config.FIELD=`` that names no field: the nearest ones."""
  import difflib  # pylint: disable=g-import-not-at-top
  from discrim_jax import config_lib  # pylint: disable=g-import-not-at-top
  known = config_lib.field_names(config_lib.base_config())
  for arg in argv[1:]:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      if (field not in known and not field.startswith("model_kwargs.")
          and not any(k.startswith(field + ".") for k in known)):
        near = difflib.get_close_matches(field, known, n=3, cutoff=0.5)
        return (f"; config has no field {field!r}"
                + (f" (nearest: {', '.join(near)})" if near else "")
                + "; the fields are listed in discrim_jax/config_lib.py base_config()")
  return ""


def cache_root() -> str:
  """Where the app keeps its caches: ``$DISCRIM_JAX_CACHE`` or
  ``~/.cache/discrim_jax``. Outside the workdir, the app writes only there
  and in the data folder (``config.data_dir``)."""
  return os.environ.get("DISCRIM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "discrim_jax")


def keep_library_caches_in_cache_root() -> None:
  """Libraries the app imports write caches and settings into ``$HOME``
  (Keras's ``keras.json``, Matplotlib's font list); point them into
  :func:`cache_root` unless the user chose their own folders."""
  os.environ.setdefault("KERAS_HOME", os.path.join(cache_root(), "keras"))
  os.environ.setdefault("MPLCONFIGDIR", os.path.join(cache_root(), "matplotlib"))


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache, ``cache_root()/jax_cache``: a rerun
  or resume skips the compile. JAX's own environment variables
  (``JAX_COMPILATION_CACHE_DIR``, ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``)
  choose another folder or threshold."""
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(cache_root(), "jax_cache"))
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def quiet_library_logs() -> None:
  """Drops orbax's and TFDS's INFO chatter (lines per save/read) from the
  console, and orbax's errors from its background threads, which come with
  tracebacks: the error that stops the run says it in one line, and the log
  file keeps them whole."""
  noisy = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorflow_datasets"))
  orbax = f"{os.sep}orbax{os.sep}"

  class _Filter:

    def filter(self, record) -> bool:
      if _VERBOSE.value:
        return True
      if record.exc_info and (orbax in record.pathname
                              or record.name == "asyncio"):
        return False  # orbax's futures, and asyncio's "never retrieved" notes
      return (record.levelno >= std_logging.WARNING
              or not any(n in record.pathname for n in noisy))

  logging.get_absl_handler().python_handler.addFilter(_Filter())


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Multi-host (multi-controller) start-up: TPU pods, multi-GPU hosts, SLURM.

  ``mode``: ``"true"`` always calls ``jax.distributed.initialize()`` (which
  reads the coordinator from the environment), ``"false"`` never, ``"auto"``
  when the environment names more than one process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if mode not in ("auto", "true", "false"):
    raise ValueError(f"--distributed must be auto, true or false, got {mode!r}")
  env = os.environ
  many = (env.get("JAX_COORDINATOR_ADDRESS")
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if mode == "true" or (mode == "auto" and many):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())


def run_with_one_line_errors(fn):
  """Runs ``fn()`` for an entry point: quiet library logs, the compilation
  cache, and a one-line ``error: ...`` with exit status 1 for the errors a
  user can act on (bad config values, missing data, NaN, unreadable
  checkpoints); a run stopped by SIGTERM/SIGINT after saving its checkpoint
  prints one ``preempted: ...`` line and exits with status 75."""
  keep_library_caches_in_cache_root()
  quiet_console()
  quiet_library_logs()
  # pylint: disable=g-import-not-at-top
  from discrim_jax import checkpoints
  from discrim_jax import stopping
  # pylint: enable=g-import-not-at-top
  checkpoints.quiet_closed_event_loops()
  enable_compilation_cache()
  try:
    return fn()
  except stopping.Preempted as e:
    logging.flush()
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(stopping.Preempted.exit_code)
  except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
    logging.flush()
    message = one_line(e)
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (
        errno.EROFS, errno.EACCES, errno.EPERM):
      message += "; choose a --workdir (and data folder) you can write to"
    if "No space left on device" in message:
      message = (message[:300] + " ... No space left on device: free space on "
                 "the workdir's disk and rerun the same command (what was saved "
                 "is kept)")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
