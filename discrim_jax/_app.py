"""The training app's dependencies, checked where an app module is imported:
without them the import fails with one line naming the extra to install."""

from __future__ import annotations

import functools
import importlib.util

# Import name -> distribution, for what `pip install 'discrim_jax[app]'` adds
# to the library's jax/flax/optax.
_APP_PACKAGES = {
    "ml_collections": "ml-collections", "absl": "absl-py",
    "orbax.checkpoint": "orbax-checkpoint", "clu": "clu",
    "tensorflow": "tensorflow-cpu", "tensorflow_datasets": "tensorflow-datasets",
    "grain": "grain", "matplotlib": "matplotlib", "tqdm": "tqdm", "PIL": "pillow",
    "scipy": "scipy"}


@functools.cache  # one look per process, however many app modules import
def _missing() -> list[str]:
  out = []
  for module, dist in _APP_PACKAGES.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
      found = False
    if not found:
      out.append(dist)
  return out


# What every app module imports at once; TensorFlow, TFDS, CLU and grain are
# imported where they are used, so that the jitted steps run on an
# accelerator image without TensorFlow (experiments/bench.py --noinput).
_AT_IMPORT = ("ml-collections",)


def require(module: str) -> None:
  """Raises ImportError (one line, naming every missing package of the app)
  when a package the app imports at once is missing."""
  missing = _missing()
  if any(dist in missing for dist in _AT_IMPORT):
    raise ImportError(
        f"{module} is part of the discrim_jax training app, which needs "
        f"{', '.join(missing)}: pip install 'discrim_jax[app]' (the library "
        "alone -- losses, baseline_losses, representation, features, models -- "
        "needs jax, flax and optax only)")
