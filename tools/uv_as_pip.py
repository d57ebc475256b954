r"""Runs uv with pip's own configuration: where packages come from and what
caps them.

    python tools/uv_as_pip.py UV [ARGS...]

uv reads its own settings, not pip's (pip.conf, ``PIP_*`` variables), so a
mirror, a wheel folder or a constraints file configured for pip would be
passed by. This reads pip's configuration (``python -m pip config list``, in
the interpreter running this) and runs ``UV ARGS...`` with the same settings as
uv's environment variables: the index, the extra indexes (with pip's rule:
the best version across all of them), find-links, constraints, trusted hosts
and the certificate bundle. A uv variable already set is left as it is.
``make`` installs through this (Makefile).
"""

import ast
import os
import subprocess
import sys

# pip's option: (uv's variable, the separator uv reads between several values;
# None for one value).
OPTIONS = {
    "index-url": ("UV_DEFAULT_INDEX", None),
    "extra-index-url": ("UV_INDEX", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "trusted-host": ("UV_INSECURE_HOST", " "),
    "cert": ("SSL_CERT_FILE", None),
}


def pip_settings() -> dict[str, str]:
  """pip's value of each option in OPTIONS that is set, by pip's precedence:
  the ``install`` section over ``global``, a ``PIP_*`` variable over both."""
  result = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    why = " ".join(result.stderr.split())[-300:] or "no message"
    sys.exit(f"error: pip's configuration could not be read by `pip config "
             f"list` ({why}); uv is not run without it")
  listing = result.stdout
  rank = {"global": 0, "install": 1, ":env:": 2}
  found = {}
  for line in listing.splitlines():
    key, sep, value = line.partition("=")
    section, _, name = key.rpartition(".")
    if sep and name in OPTIONS and section in rank:
      if rank[section] >= found.get(name, (-1, ""))[0]:
        found[name] = (rank[section], ast.literal_eval(value))
  return {name: value for name, (_, value) in found.items()}


def uv_environment(settings: dict[str, str]) -> dict[str, str]:
  """uv's variables for pip's ``settings``."""
  env = {}
  for name, value in settings.items():
    variable, separator = OPTIONS[name]
    env[variable] = separator.join(value.split()) if separator else value
  if "UV_INDEX" in env:
    env["UV_INDEX_STRATEGY"] = "unsafe-best-match"
  return env


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    sys.exit(f"usage: python {argv[0]} UV [ARGS...]")
  env = dict(uv_environment(pip_settings()), **os.environ)
  os.execvpe(argv[1], argv[1:], env)


if __name__ == "__main__":
  main(sys.argv)
