"""Runs entry-point commands with ``--dry_run``, each in a process of its
own, forked from one that imported JAX and the app once (~1.5 s a command
otherwise, most of it importing JAX). Used by tests/test_docs.py.

Protocol: one JSON list (argv, script first) per line on stdin; one JSON
object ``{"returncode", "stdout", "stderr"}`` per line on stdout. The parent
never initialises a JAX backend, so each child starts from a process as a
fresh interpreter would have it after its imports.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

# What every documented entry point imports; nothing here starts a thread.
import jax
from discrim_jax import cli
from discrim_jax import study
from discrim_jax import train

PRELOADED = (jax, cli, study, train)


def _child(argv, out_path, err_path) -> None:
  """Runs the script as ``python *argv`` would, then exits the process."""
  code = 1
  try:
    out = os.open(out_path, os.O_WRONLY | os.O_TRUNC)
    err = os.open(err_path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    for line in sys.stdin:
      argv = json.loads(line)
      for path in (out_path, err_path):
        open(path, "w").close()
      pid = os.fork()
      if pid == 0:
        _child(argv, out_path, err_path)
      _, status = os.waitpid(pid, 0)
      with open(out_path) as out, open(err_path) as err:
        result = {"returncode": os.waitstatus_to_exitcode(status),
                  "stdout": out.read(), "stderr": err.read()}
      sys.stdout.write(json.dumps(result) + "\n")
      sys.stdout.flush()


if __name__ == "__main__":
  main()
