"""Every code block of README.md and docs/*.md runs here, so none can go stale.

* ``python`` blocks run as they are, each in a fresh interpreter.
* ``sh`` blocks: every ``python experiments/SCRIPT.py ...`` command (and
  ``experiments/verdict_shards.sh CONFIG WORKDIR FLAGS``, as the
  ``verdict.py`` command each of its shards runs) runs with ``--dry_run``
  (flags parsed, config loaded and validated, objectives and cells built; no
  data read, no workdir touched), each in a process of its own forked from
  one that imported JAX and the app (tests/dry_runs.py: 0.1 s a command
  instead of ~2). ``make``, ``gcloud``, ``srun``/``#SBATCH`` and
  ``tfds``/``ln`` lines are the set-up's or a cluster's own and are not run
  (CI runs ``make test`` itself).
"""

import json
import os
from pathlib import Path
import re
import select
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_NOT_RUN = ("make", "gcloud", "srun", "#", "tfds", "ln", "cd", "$S")


def _blocks(language):
  out = []
  for path in DOCS:
    text = path.read_text()
    for m in re.finditer(r"^( *)```" + language + r"\n(.*?)^\1```", text, re.M | re.S):
      out.append((f"{path.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}",
                  textwrap.dedent(m.group(2))))
  return out


def _commands():
  """``{argv: [where, ...]}`` of the documented entry-point commands."""
  out = {}
  for where, block in _blocks("sh"):
    joined = block.replace("\\\n", " ")
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', joined, re.M))
    pending = ""
    for line in joined.splitlines():
      line = pending + line.split(" #")[0].strip()
      for name, value in variables.items():
        line = line.replace(f"${name}", value)
      try:
        words = shlex.split(line) if line else []
      except ValueError:  # a quote spans lines (gcloud's --command='...')
        pending = line + "\n"
        continue
      pending = ""
      if words[:1] == ["experiments/verdict_shards.sh"]:
        config, workdir, *rest = words[1:]
        words = ["python", "experiments/verdict.py",
                 f"--config=experiments/configs/{config}.py",
                 f"--workdir={workdir}", *rest]
      if words[:1] == ["python"] and words[1].startswith("experiments/"):
        out.setdefault(tuple(words[1:]), []).append(where)
      else:
        assert not words or words[0].startswith(_NOT_RUN) or "=" in words[0], (
            f"{where}: a command the docs test does not know how to run: {line}")
  return out


@pytest.mark.parametrize("where,code", _blocks("python"), ids=lambda x: str(x)[:40])
def test_python_block_runs(where, code):
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"


def test_tutorial_notebook_runs(tmp_path):
  nbformat = pytest.importorskip("nbformat", reason="the test extra (make test)")
  nbclient = pytest.importorskip("nbclient", reason="the test extra (make test)")
  notebook = nbformat.read(REPO / "docs" / "tutorial.ipynb", as_version=4)
  env = {"TUTORIAL_STEPS": "30", "PYTHONPATH": str(REPO),
         "MPLCONFIGDIR": str(tmp_path)}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits them
  try:
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  printed = "".join(o.get("text", "") for c in notebook.cells
                    for o in c.get("outputs", []))
  assert "CE+Gini+KL {'test accuracy':" in printed, printed[-2000:]
  assert any("image/png" in o.get("data", {}) for c in notebook.cells
             for o in c.get("outputs", []))


def test_documented_commands_exist():
  # A guard against the parser finding nothing (a renamed fence, say).
  commands = _commands()
  assert {"experiments/train.py", "experiments/compare.py",
          "experiments/study.py", "experiments/convert.py"} <= {
              argv[0] for argv in commands}
  assert len(_blocks("python")) >= 3


def test_readme_layout_names_every_module():
  """The README's layout (the block that lists discrim_jax/losses.py) names
  every module of the package, so it stays the house as built: top-level
  modules by path, those of a subpackage through the subpackage's folder."""
  layout = re.search(r"^```\n(discrim_jax/losses\.py.*?)^```",
                     (REPO / "README.md").read_text(), re.M | re.S).group(1)
  package = REPO / "discrim_jax"
  missing = [str(p.relative_to(REPO)) for p in sorted(package.rglob("*.py"))
             if p.name != "__init__.py" and "__pycache__" not in p.parts and (
                 f"{p.parent.relative_to(REPO)}/" if p.parent != package
                 else str(p.relative_to(REPO))) not in layout]
  assert not missing, f"README.md's layout does not name {missing}"


@pytest.fixture(name="dry_run", scope="module")
def dry_run_fixture(tmp_path_factory):
  """``dry_run(argv)``: ``{"returncode", "stdout", "stderr"}`` of ``python
  *argv --dry_run``, run in a process of its own (tests/dry_runs.py)."""
  # One CPU device, as on a laptop (the suite's 8 fake ones divide no batch
  # of 100 or 500).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  log = tmp_path_factory.mktemp("dry_runs") / "server.err"
  with open(log, "w") as err:
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "dry_runs.py")],
                              cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=err, text=True)

  def run(argv):
    server.stdin.write(json.dumps([*argv, "--dry_run"]) + "\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], 300)
    line = server.stdout.readline() if ready else ""
    assert line, f"tests/dry_runs.py gave no answer: {log.read_text()[-3000:]}"
    return json.loads(line)

  yield run
  server.stdin.close()
  server.wait(timeout=60)


@pytest.mark.parametrize("argv", sorted(_commands()), ids=lambda a: " ".join(a)[12:70])
def test_documented_commands_parse_and_validate(argv, dry_run):
  where = ", ".join(_commands()[argv])
  result = dry_run(argv)
  assert result["returncode"] == 0, f"{where}:\n{result['stderr'][-3000:]}"
  assert result["stdout"].startswith("dry run:"), (where, result["stdout"])


def test_every_interval_the_docs_quote_is_in_a_committed_table():
  """Each ``[low, high]`` interval that README.md, docs/*.md or a results
  README quotes is one of the intervals of the committed tables
  (experiments/results/**/*.md, which their own tests recompute from the
  per-run values): a figure edited by hand, or left behind when a table was
  rerun, fails here."""
  def text(path):
    return re.sub(r"\s+", " ", path.read_text().replace("\N{MINUS SIGN}", "-"))
  interval = re.compile(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")
  results = REPO / "experiments" / "results"
  tables = [p for p in results.rglob("*.md") if p.name != "README.md"]
  known = {m for p in tables for m in interval.findall(text(p))}
  quoted = {}
  for path in [*DOCS, *results.rglob("README.md")]:
    for m in interval.findall(text(path)):
      quoted.setdefault(m, []).append(str(path.relative_to(REPO)))
  assert len(quoted) >= 20 and len(known) >= 100  # the pattern finds them
  unknown = {f"[{low}, {high}]": where for (low, high), where in quoted.items()
             if (low, high) not in known}
  assert not unknown, f"intervals in no committed table: {unknown}"


def test_readme_verdict_table_is_the_committed_verdicts():
  """README.md's table of every regime's tuned settings and paired Δ is
  ``verdict_report.overview`` of the committed verdict.json files (whose
  own test recomputes them from the per-run values): no number in it is
  typed by hand, and a rerun verdict without a new table fails here."""
  from discrim_jax import verdict_report  # pylint: disable=g-import-not-at-top
  results = REPO / "experiments" / "results"
  table = verdict_report.overview({
      label: json.loads((results / name / "verdict.json").read_text())
      for label, name in (("Fashion-MNIST", "verdict_fashion"),
                          ("fonts", "verdict_fonts"))})
  assert table.count("\n") >= 21  # 2 header lines, 4 regimes x 5 objectives
  assert table in (REPO / "README.md").read_text(), (
      "README.md's verdict table differs from the committed verdicts; paste:\n"
      + table)
