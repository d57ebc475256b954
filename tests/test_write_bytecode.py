"""tools/write_bytecode.py, through which `make` writes the bytecode of what
the app and the tests import."""

import importlib.util
import os
from pathlib import Path
import subprocess
import sys

REPO = Path(__file__).resolve().parents[1]


def _package(root: Path) -> None:
  """pkg.a imports pkg.b; pkg.c is imported by nothing; broken fails."""
  (root / "pkg").mkdir()
  (root / "pkg" / "__init__.py").write_text("")
  (root / "pkg" / "a.py").write_text("from pkg import b\n")
  (root / "pkg" / "b.py").write_text("X = 1\n")
  (root / "pkg" / "c.py").write_text("Y = 2\n")
  (root / "broken.py").write_text("raise RuntimeError('cannot load me')\n")


def _written(root: Path, module: str) -> bool:
  source = root / (module.replace(".", "/") + ".py")
  return Path(importlib.util.cache_from_source(str(source))).exists()


def test_writes_what_the_groups_import_whatever_the_environment_says(tmp_path):
  _package(tmp_path)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
  result = subprocess.run(
      [sys.executable, str(REPO / "tools" / "write_bytecode.py"), "pkg.a",
       "broken,pkg"], env=env, capture_output=True, text=True, check=False)
  # A group that cannot be imported is one line; the set-up goes on.
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "bytecode incomplete for broken,pkg: RuntimeError: cannot load me"), lines
  assert _written(tmp_path, "pkg.a") and _written(tmp_path, "pkg.b")
  assert _written(tmp_path, "pkg.__init__")
  assert not _written(tmp_path, "pkg.c")  # nothing imported it


def test_without_groups_it_says_how_to_call_it():
  result = subprocess.run([sys.executable, str(REPO / "tools" / "write_bytecode.py")],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2 and "usage:" in result.stderr


def test_an_import_that_hangs_is_stopped_in_one_line(tmp_path, monkeypatch,
                                                     capsys):
  (tmp_path / "hangs.py").write_text("import time\ntime.sleep(120)\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  sys.path.insert(0, str(REPO / "tools"))
  try:
    import write_bytecode  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / "tools"))
  monkeypatch.setattr(write_bytecode, "TIMEOUT_S", 1)
  assert write_bytecode.main(["write_bytecode.py", "hangs"]) == 0
  assert capsys.readouterr().err == (
      "bytecode incomplete for hangs: its import took over 1 s and was stopped\n")
