"""The install's promises: the library runs with jax, flax and optax alone,
and the app, imported without its extra, says in one line what to install."""

import json
from pathlib import Path
import subprocess
import sys
import textwrap
import tomllib

import discrim_jax

REPO = Path(__file__).resolve().parents[1]
# What `pip install 'discrim_jax[app]'` adds and jax/flax/optax do not bring:
# a subprocess that cannot import these stands for a core-only environment.
APP_ONLY = ("ml_collections", "clu", "tensorflow", "tensorflow_datasets", "grain",
            "array_record", "matplotlib", "tqdm", "PIL", "tensorboard",
            "importlib_resources", "torch")

_BLOCKER = f"""
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {APP_ONLY!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
    return None
sys.meta_path.insert(0, _Blocked())
"""


def _run_core_only(code: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)


def test_core_dependencies_are_jax_flax_optax_numpy():
  meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  names = sorted(d.split(">")[0].split("=")[0].split(";")[0].strip()
                 for d in meta["dependencies"])
  assert names == ["flax", "jax", "numpy", "optax"]
  assert meta["requires-python"] == ">=3.11"
  # TensorFlow by platform: the CPU wheel where it exists, the full one on macOS.
  tf = [d for d in meta["optional-dependencies"]["app"] if d.startswith("tensorflow")]
  assert any("sys_platform == 'darwin'" in d and d.startswith("tensorflow>") for d in tf)
  assert any("sys_platform != 'darwin'" in d and d.startswith("tensorflow-cpu")
             for d in tf)
  assert discrim_jax.__version__.count(".") == 2


def test_library_runs_without_the_app_packages():
  result = _run_core_only("""
      import jax, jax.numpy as jnp, numpy as np
      from discrim_jax import baseline_losses, features, losses, models, representation
      x = jax.random.normal(jax.random.key(0), (12, 2, 2, 6))
      y = jnp.arange(12) % 3
      print(float(losses.gini_loss(x, y, 3)), float(losses.kl_loss(x, y, 3)))
      print(float(baseline_losses.orthogonal_projection_loss(x, y)))
      print(float(baseline_losses.supervised_contrastive_loss(x, y)))
      f = np.asarray(baseline_losses.pool(x))
      print(representation.knn_accuracy(f, y, f, y, num_classes=3))
      model = models.create_model("resnet18", num_classes=3, width_multiplier=0.125)
      v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
      print("ok")
      """)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_tutorial_loss_part_runs_without_the_app_packages():
  notebook = json.loads((REPO / "docs" / "tutorial.ipynb").read_text())
  code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  assert "matplotlib" in code[-1] and "matplotlib" not in "".join(code[:-1])
  # The rest is the library's part: what `pip install discrim_jax` runs.
  result = _run_core_only("import os\nos.environ['TUTORIAL_STEPS'] = '20'\n"
                          + "\n".join(code[:-1]))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "CE+Gini+KL {'test accuracy':" in result.stdout


def test_app_without_its_extra_is_one_line_naming_it():
  for module in ("discrim_jax.train", "discrim_jax.data", "discrim_jax.compare"):
    result = _run_core_only(f"""
        try:
          import {module}
        except ImportError as e:
          print(e)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert len(message.splitlines()) == 1, message
    assert "pip install 'discrim_jax[app]'" in message and "ml-collections" in message
