"""Test set-up: 8 fake CPU devices for the multi-device paths, quiet TF, and
the fixtures several test modules share (the real Fashion-MNIST, the smoke
config)."""

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


def _xla_knows(flags: list[str]) -> bool:
  """Whether this jaxlib's XLA accepts ``flags`` (it aborts on an unknown
  one): asked of a child process; the processes the suite starts
  (pytest-xdist's workers among them) inherit the answer in XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=" ".join([os.environ["XLA_FLAGS"], *flags]))
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
# kernel rounds.
# One LLVM module per program instead of parts compiled on parallel threads:
# the suite runs three processes on two cores, where the split only adds
# work. Building the smoke config's steps for three objectives from a cold
# cache (trace, lower, compile, first call), XLA's compiles took 4.03 and
# 4.08 s (4.09 and 4.24 s with another switch beside it) against 4.74-5.18 s
# split (3 runs), runs alternated, 2-core AMD EPYC; the code is the same.
# Either is left out where this jaxlib no longer has the switch.
_SUITE_XLA_FLAGS = [f for f in ("--xla_cpu_use_fusion_emitters=false",
                                "--xla_cpu_parallel_codegen_split_count=1")
                    if f.split("=")[0] not in os.environ["XLA_FLAGS"]]
if _SUITE_XLA_FLAGS:
  if not _xla_knows(_SUITE_XLA_FLAGS):
    _SUITE_XLA_FLAGS = [f for f in _SUITE_XLA_FLAGS if _xla_knows([f])]
  os.environ["XLA_FLAGS"] = " ".join([os.environ["XLA_FLAGS"], *_SUITE_XLA_FLAGS])
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

# One TFDS data folder for the whole test run, the default (TFDS_DATA_DIR)
# of every process the suite starts: the real Fashion-MNIST is prepared
# there once (~16 s on one core), whether a test asks for it by name
# (`fashion_data_dir`) or trains with the default data folder, as a user's
# first run does. Made by the first process that loads this file (pytest-
# xdist's controller; the workers inherit it) and removed by it at the end.
_DATA_FOLDER = "DISCRIM_JAX_TEST_DATA_FOLDER"
_OWN_DATA_FOLDER = _DATA_FOLDER not in os.environ
if _OWN_DATA_FOLDER:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ[_DATA_FOLDER] = tempfile.mkdtemp(prefix="discrim_jax_tests_")
  # The processes the suite starts (pytest-xdist's workers, the CLI runs)
  # keep their temporary files there too, removed with it: TFDS leaves an
  # empty folder in the temporary folder for each builder of a data set not
  # yet prepared, TensorFlow's autograph a file per converted function, some
  # hundreds per run. (pytest's own tmp_path folders stay where pytest keeps
  # them, for a failed test's files to be read.)
  os.environ["TMPDIR"] = os.path.join(os.environ[_DATA_FOLDER], "tmp")
  os.mkdir(os.environ["TMPDIR"])
os.environ["TFDS_DATA_DIR"] = os.environ[_DATA_FOLDER]

import pytest  # noqa: E402


# Under pytest-xdist the controller, which runs no test, starts preparing
# Fashion-MNIST in a process of its own while the workers start up; the
# app's own lock on the folder (data.tfds_prepare.prepare) makes any process
# that needs it wait for it, or prepare it if that process could not.
_PREPARE = """
from discrim_jax.data import fashion_mnist, tfds_prepare
tfds_prepare.prepare(fashion_mnist.DebianFashionMnist(), "fashion_mnist",
                     download=False)
"""


_PREPARING = pytest.StashKey[subprocess.Popen]()


def _xdist_controller(config) -> bool:
  return bool(config.getoption("numprocesses", default=None)) and not (
      os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_configure(config):
  """torchvision's compiled ops segfault when they load after TensorFlow in
  one process (seen with torch 2.14.1 + torchvision 0.29.1 + tensorflow-cpu
  2.21), and transformers' CvT imports torchvision: every process that runs
  tests loads torchvision first (transformers itself may come after
  TensorFlow; where they are missing, tests/test_pretrained.py fails with a
  message saying what to install). pytest-xdist's controller runs no test:
  it skips the 4 s this takes and starts preparing Fashion-MNIST instead."""
  if _xdist_controller(config):
    config.stash[_PREPARING] = subprocess.Popen(
        [sys.executable, "-c", _PREPARE], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    return
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    pass


def pytest_unconfigure(config):
  """The process that made the data folder removes it once all are done."""
  preparing = config.stash.get(_PREPARING, None)
  if preparing is not None:
    preparing.kill()
    preparing.wait()
  if _OWN_DATA_FOLDER:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.environ[_DATA_FOLDER], ignore_errors=True)


# Seconds each test module took on a 2-core Intel Xeon (family 6, model 207;
# `pytest -n 2`, cold compilation cache: a clean clone's `make test`,
# 2026-12-07 at a3be2f3, a slow day: 401 s of tests),
# used only to order them: pytest-xdist runs
# with --dist loadfile (pyproject.toml), which hands each worker the next
# whole module when it is nearly done, and the longest first lets the
# workers finish together (a 34-s test started last had once left one worker
# idle for 29 s), except that each of `make test`'s three workers starts with
# a module that reads no Fashion-MNIST (_FIRST) while the controller
# prepares it. A module missing here goes last; a stale figure costs
# balance, never a result. Modules keep their own order of tests.
_FIRST = ("test_pretrained.py", "test_models.py", "test_bench.py")
_MODULE_SECONDS = {
    "test_train.py": 133, "test_data_sources.py": 90, "test_faults.py": 67,
    "test_runtime.py": 50, "test_study.py": 40, "test_cli.py": 38,
    "test_bench.py": 36, "test_models.py": 36, "test_pretrained.py": 34,
    "test_verdict.py": 29, "test_compare.py": 28, "test_objectives.py": 23,
    "test_docs.py": 23, "test_checkpoints.py": 23,
    "test_baseline_losses.py": 22, "test_packaging.py": 18,
    "test_losses.py": 18, "test_losses_sharded.py": 13, "test_optim.py": 10,
    "test_workdir.py": 9, "test_data.py": 8, "test_representation.py": 7,
    "test_fonts.py": 6, "test_features.py": 3, "test_stats.py": 1,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: (item.path.name not in _FIRST,
                                -_MODULE_SECONDS.get(item.path.name, 0)))


def pytest_collection_finish(session):
  """Every test module is imported, and with them JAX, TensorFlow and
  PyTorch: some 800,000 objects that live as long as the process. A full
  garbage collection walks them all (0.3 s and more here), and
  statsmodels' Holm correction runs one at each call (the harnesses' tables
  call it often), as pytest does at its end; frozen, they are left out of
  every collection (``gc.freeze``), and what the tests make is still
  collected as before."""
  del session
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  gc.freeze()


@pytest.fixture(scope="session")
def fashion_data_dir():
  """The test run's TFDS data folder (see _DATA_FOLDER) with the real
  Fashion-MNIST prepared in it; tests only read it."""
  from discrim_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  from discrim_jax.data import tfds_prepare  # pylint: disable=g-import-not-at-top
  try:
    fashion_mnist.find_files()
  except FileNotFoundError as e:
    pytest.fail(f"the real Fashion-MNIST files are needed: {e}", pytrace=False)
  tfds_prepare.prepare(fashion_mnist.DebianFashionMnist(), "fashion_mnist",
                       download=False)
  return os.environ["TFDS_DATA_DIR"]


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
