"""Model zoo: ``create_model(name, *, num_classes, **overrides)``.

Every model is called as ``model.apply(variables, images, train=...)`` and
returns ``(logits, features)``; see each module for the feature names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from discrim_jax.models.cvt import CvT13
from discrim_jax.models.resnet import ResNet17, ResNet18, ResNet50

MODELS = {
    "resnet17": ResNet17,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "cvt13": CvT13,
}

# float64 needs jax_enable_x64; the training app then keeps the parameters in
# float64 too (``runtime.build``), for tests that show two programs compute the
# same mathematics where float32 rounding cannot hide a difference.
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float64": jnp.float64}


def model_fields(name: str) -> set[str]:
  """The options (module fields) model ``name`` takes, besides num_classes."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
  ctor = MODELS[name]
  return set(getattr(ctor, "func", ctor).__dataclass_fields__) - {"parent", "name"}


def create_model(name: str, *, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of ``resnet17``, ``resnet18``, ``resnet50``, ``cvt13``.
    num_classes: size of the classifier.
    **overrides: module fields, e.g. ``stem="cifar"|"imagenet"`` (ResNets),
      ``dtype="bfloat16"`` (compute dtype; parameters stay float32),
      ``dropout=0.4`` (before the classifier), ``width_multiplier=0.125``
      (tiny variants for tests).

  Raises:
    ValueError: for an unknown name or an override the model does not have.
  """
  fields = model_fields(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if "dtype" in overrides and isinstance(overrides["dtype"], str):
    if overrides["dtype"] not in _DTYPES:
      raise ValueError(
          f"unknown dtype {overrides['dtype']!r}; use one of {sorted(_DTYPES)}")
    overrides["dtype"] = _DTYPES[overrides["dtype"]]
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
        f"model {name!r} has no option(s) {unknown}; available: {sorted(fields)}")
  return MODELS[name](num_classes=num_classes, **overrides)
