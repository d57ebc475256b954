"""Test set-up: 8 fake CPU devices for the multi-device paths, quiet TF."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torchvision's compiled ops segfault when they load after TensorFlow in one
# process (seen with torch 2.14.1 + torchvision 0.29.1 + tensorflow-cpu 2.21),
# and transformers' CvT imports torchvision. Load them first; where they are
# missing, tests/test_pretrained.py fails with a message saying what to install.
try:
  import torchvision  # noqa: E402,F401  pylint: disable=unused-import
  import transformers.models.cvt  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # noqa: E402

# Tests compile many small programs once each: trade run time for compile time.
jax.config.update("jax_disable_most_optimizations", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory):
  """A TFDS data folder with the real Fashion-MNIST prepared once per session."""
  from discrim_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  try:
    fashion_mnist.find_files()
  except FileNotFoundError as e:
    pytest.fail(f"the real Fashion-MNIST files are needed: {e}", pytrace=False)
  path = tmp_path_factory.mktemp("tfds")
  fashion_mnist.DebianFashionMnist(data_dir=str(path)).download_and_prepare()
  return str(path)

# Identical programs (the same tiny model built by several tests) compile once.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "discrim_jax",
                               "jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
