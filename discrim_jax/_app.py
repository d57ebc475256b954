"""The training app's dependencies, checked where an app module is imported:
without them the import fails with one line naming the extra to install."""

from __future__ import annotations

import importlib.util

# Import name -> distribution, for what `pip install 'discrim_jax[app]'` adds
# to the library's jax/flax/optax.
_APP_PACKAGES = {
    "ml_collections": "ml-collections", "absl": "absl-py",
    "orbax.checkpoint": "orbax-checkpoint", "clu": "clu",
    "tensorflow": "tensorflow-cpu", "tensorflow_datasets": "tensorflow-datasets",
    "grain": "grain", "matplotlib": "matplotlib", "tqdm": "tqdm", "PIL": "pillow",
    "scipy": "scipy"}


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


def require(module: str) -> None:
  """Raises ImportError (one line) when the app's packages are missing."""
  missing = _missing()
  if missing:
    raise ImportError(
        f"{module} is part of the discrim_jax training app, which needs "
        f"{', '.join(missing)}: pip install 'discrim_jax[app]' (the library "
        "alone -- losses, baseline_losses, representation, features, models -- "
        "needs jax, flax and optax only)")
