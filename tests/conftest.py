"""Test set-up: 8 fake CPU devices for the multi-device paths, quiet TF, and
the fixtures several test modules share (the real Fashion-MNIST, the smoke
config)."""

import fcntl
import json
import os
from pathlib import Path
import re
import subprocess
import sys

# Must happen before JAX initialises its backends. Appended to a user's own
# XLA_FLAGS (never dropped because they are set); a different device count
# there is an error rather than a silent change.
_DEVICES = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
_count = re.search(_DEVICES + r"=(\d+)", _flags)
if _count is None:
  os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICES}=8".strip()
elif _count.group(1) != "8":
  raise RuntimeError(
      f"XLA_FLAGS sets {_count.group(0)}; the tests need 8 fake CPU devices: "
      f"remove it or set {_DEVICES}=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA accepts ``flag`` (it aborts on an unknown
  one): asked of a child process once; the processes the suite starts
  (pytest-xdist's workers among them) inherit the answer in XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} {flag}")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                        env=env, capture_output=True, check=False).returncode == 0


# XLA:CPU's older elementwise emitters, with JAX_DISABLE_MOST_OPTIMIZATIONS
# below, compile the suite's small programs faster than the default MLIR
# fusion emitters: the whole suite from a cold cache took 11 min 14 s against
# 15 min 13 s (pytest's own figures, one run each, 2-core Xeon, the same
# background load). Not a knob for users: full-size models compile no faster
# with it at -O0 and 2.2-2.6x slower at XLA's default optimisation
# (experiments/results/startup/), and steps run 8% slower (docs/speed.md).
# Like JAX_DISABLE_MOST_OPTIMIZATIONS, a choice for the suite only; every
# numerical bound in tests/ is one that float32 rounding justifies, whatever
# kernel rounds. Left out where this jaxlib no longer has the switch.
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _xla_knows(
    _EMITTERS):
  os.environ["XLA_FLAGS"] += " " + _EMITTERS
# Tests compile many small programs once each: trade run time for compile
# time, here and (through the environment) in the CLI processes tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Identical programs (the same tiny model built by several tests, or by a
# test and the CLI processes it starts, which inherit these variables and
# which cli.enable_compilation_cache leaves to them) compile once. Every
# program is kept, however quick to compile: the suite builds the same small
# steps many times, and a cache hit is cheaper than even a 0.2 s compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "discrim_jax", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


def pytest_configure(config):
  """torchvision's compiled ops segfault when they load after TensorFlow in
  one process (seen with torch 2.14.1 + torchvision 0.29.1 + tensorflow-cpu
  2.21), and transformers' CvT imports torchvision: every process that runs
  tests loads them first (where they are missing, tests/test_pretrained.py
  fails with a message saying what to install). pytest-xdist's controller
  runs no test: it skips the 7 s this takes."""
  if config.getoption("numprocesses", default=None) and not os.environ.get(
      "PYTEST_XDIST_WORKER"):
    return
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    import transformers.models.cvt  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    pass



@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory, worker_id):
  """A TFDS data folder with the real Fashion-MNIST, prepared once per test
  run: by the first pytest-xdist worker to get here, under a lock, in the
  run's temporary folder that all workers share (tests only read it)."""
  from discrim_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  try:
    fashion_mnist.find_files()
  except FileNotFoundError as e:
    pytest.fail(f"the real Fashion-MNIST files are needed: {e}", pytrace=False)
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":  # .../pytest-N/popen-gwK: share .../pytest-N
    root = root.parent
  path = root / "tfds_fashion_mnist"
  with open(root / "tfds_fashion_mnist.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (path / "prepared").exists():
      fashion_mnist.DebianFashionMnist(data_dir=str(path)).download_and_prepare()
      (path / "prepared").touch()
  return str(path)


@pytest.fixture(scope="session")
def fashion(fashion_data_dir):
  """The first 320/200/200 train/validation/test images, read once."""
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.Dataset("fashion_mnist", data_dir=fashion_data_dir,
                    max_examples={"train": 320, "validation": 200, "test": 200})
  for split in ("train", "validation", "test"):
    ds.arrays(split)
  return ds


def smoke_config(**overrides):
  """The Fashion-MNIST smoke config cut to 5 steps of 64 per epoch, one
  device, logging every 2 steps; ``overrides`` are dotted field paths."""
  from experiments.configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config("smoke")
  config.eval_subset = 200
  config.eval_batch_size = 200
  config.train_subset = 320  # 5 steps of 64 per epoch
  config.log_every_steps = 2
  config.num_devices = 1  # the 8-device path has its own tests; saves compiles
  # Measuring the features compiles a kNN and a probe: only the tests of it.
  config.representation.enabled = False
  from discrim_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.with_fields(config, **overrides)


def read_metrics(workdir):
  return [json.loads(line) for line in
          (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(name="smoke_config", scope="session")
def smoke_config_fixture():
  return smoke_config


@pytest.fixture(name="read_metrics", scope="session")
def read_metrics_fixture():
  return read_metrics



@pytest.fixture(name="whole", scope="session")
def whole_fixture(fashion, tmp_path_factory):
  """The records of one uninterrupted run of :func:`smoke_config` (10 steps
  of 64), trained once per worker: what every interrupted-and-resumed run of
  the same config must end with, bit for bit. Tests only read it."""
  from discrim_jax import train  # pylint: disable=g-import-not-at-top
  run = tmp_path_factory.mktemp("whole")
  train.train_and_evaluate(smoke_config(), str(run), dataset=fashion)
  return read_metrics(run)


def _corrupt(step_dir, kind: str):
  """Overwrites the files of one kind in a checkpoint folder; returns them.
  ``kind``: part of the file name, or ``data`` for the array chunks."""
  hit = [p for p in step_dir.rglob("*") if p.is_file() and (
      p.parent.name == "d" if kind == "data" else kind in p.name)]
  for path in hit:
    path.write_bytes(b"corrupt")
  return hit


@pytest.fixture(name="corrupt_checkpoint")
def corrupt_checkpoint_fixture():
  """``corrupt_checkpoint(step_dir, kind)``: see :func:`_corrupt`."""
  return _corrupt
