r"""Writes the bytecode of the modules that importing some packages loads.

    python tools/write_bytecode.py GROUP [GROUP...]

Each GROUP is a comma-separated list of modules, imported in a process of its
own (the groups run at once), with bytecode writing on whatever
PYTHONDONTWRITEBYTECODE says: Python writes a ``.pyc`` beside each module it
compiles, so later processes load it instead of compiling the source again.

``make`` installs without compiling bytecode and runs this instead: the
installer compiles every module of the environment (about 23,000, most of
them never imported: transformers' other models, most of statsmodels,
networkx, pip), this only the ~7,000 that the app and the tests load. A
module imported later that has none is compiled in memory as usual, and
written if PYTHONDONTWRITEBYTECODE is not set. A group that fails to import,
or takes over TIMEOUT_S, is named in one line; the set-up goes on, since the
import that needs it will say why.
"""

import os
import subprocess
import sys

# Far beyond what an import takes (~20 s here); a hung one does not hang `make`.
TIMEOUT_S = 600


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(f"usage: python {argv[0]} GROUP [GROUP...]", file=sys.stderr)
    return 2
  env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
  processes = [
      (group, subprocess.Popen(
          [sys.executable, "-c", "".join(f"import {m}\n" for m in group.split(","))],
          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
      for group in argv[1:]]
  for group, process in processes:
    try:
      _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      process.kill()
      process.communicate()
      print(f"bytecode incomplete for {group}: its import took over "
            f"{TIMEOUT_S} s and was stopped", file=sys.stderr)
      continue
    if process.returncode:
      last = stderr.strip().splitlines()[-1:] or ["no message"]
      print(f"bytecode incomplete for {group}: {last[0]}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
