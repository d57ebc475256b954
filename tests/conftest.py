"""Test set-up: 8 fake CPU devices for the multi-device paths, quiet TF."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# Tests compile many small programs once each: trade run time for compile time.
jax.config.update("jax_disable_most_optimizations", True)
