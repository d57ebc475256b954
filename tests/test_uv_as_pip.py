"""tools/uv_as_pip.py, through which `make` installs: uv gets pip's sources
and caps."""

import json
import os
from pathlib import Path
import subprocess
import sys

REPO = Path(__file__).resolve().parents[1]
# Stands for uv: prints the environment it was given.
_PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def _run(config: Path, **env) -> dict:
  """The environment uv_as_pip.py gives its command, with ``config`` as pip's
  last configuration file and no PIP_*, UV_* or SSL_CERT_FILE variable but
  ``env``."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("PIP_", "UV_")) and k != "SSL_CERT_FILE"}
  result = subprocess.run(
      [sys.executable, str(REPO / "tools" / "uv_as_pip.py"), *_PRINT_ENV],
      env=dict(base, PIP_CONFIG_FILE=str(config), **env), capture_output=True,
      text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout)


def test_pip_configuration_becomes_uv_variables_by_pip_precedence(tmp_path):
  config = tmp_path / "pip.conf"
  config.write_text(
      "[global]\n"
      "index-url = https://global.example/simple\n"
      "extra-index-url = https://a.example/simple\n  https://b.example/simple\n"
      "find-links = /global/wheels\n"
      "constraint = /file/caps.txt\n"
      "[install]\n"
      "index-url = https://install.example/simple\n"
      "find-links = /wheels/one /wheels/two\n")
  env = _run(config, PIP_CONSTRAINT="/caps/a.txt /caps/b.txt",
             PIP_CERT="/certs/bundle.pem")
  # The install section over global; a PIP_* variable over the files.
  assert env["UV_DEFAULT_INDEX"] == "https://install.example/simple"
  assert env["UV_FIND_LINKS"] == "/wheels/one,/wheels/two"
  assert env["UV_INDEX"] == "https://a.example/simple https://b.example/simple"
  # pip takes the best version across its indexes; uv does so only when told.
  assert env["UV_INDEX_STRATEGY"] == "unsafe-best-match"
  assert env["UV_CONSTRAINT"] == "/caps/a.txt /caps/b.txt"
  assert env["SSL_CERT_FILE"] == "/certs/bundle.pem"


def test_a_uv_variable_already_set_is_kept(tmp_path):
  config = tmp_path / "pip.conf"
  config.write_text("[global]\nindex-url = https://pip.example/simple\n")
  env = _run(config, UV_DEFAULT_INDEX="https://mine.example/simple")
  assert env["UV_DEFAULT_INDEX"] == "https://mine.example/simple"


def test_unreadable_pip_configuration_is_one_line_and_runs_nothing(tmp_path):
  config = tmp_path / "pip.conf"
  config.write_text("[global\nindex-url = https://pip.example/simple\n")
  result = subprocess.run(
      [sys.executable, str(REPO / "tools" / "uv_as_pip.py"), *_PRINT_ENV],
      env=dict(os.environ, PIP_CONFIG_FILE=str(config)), capture_output=True,
      text=True, check=False, timeout=120)
  # Exit status 1 (make then installs with pip) and uv, here the printer,
  # not run.
  assert result.returncode == 1 and not result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: pip's configuration"), lines[0]
  assert str(config) in lines[0] and "Traceback" not in result.stderr
