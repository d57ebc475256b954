"""Activations of any Flax (linen) model's submodules, without editing it.

The losses act on intermediate layers, but most models return logits only.
:func:`capture` runs the model once and also returns the outputs of the
submodules named by their path, as Flax names them::

    logits, feats = capture(model.apply, variables, images, layers=("layer4",))
    aux, terms = losses.discriminability_loss(
        feats, labels, num_classes, gini_weights={"layer4": 0.5},
        kl_weights={"layer4": 0.5})

It uses Flax's ``capture_intermediates``: one forward pass, differentiable,
jit-able; a path names nested modules with ``/`` (``"encoder/block_11"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax.core import unfreeze

__all__ = ["capture", "module_paths"]

_COLLECTION = "intermediates"
_CALL = "__call__"


def _path(module) -> str:
  return "/".join(str(p) for p in module.scope.path)


def _found(tree, prefix=()) -> dict[str, tuple[Any, ...]]:
  """``{"a/b": outputs of a/b's __call__ calls}`` from the intermediates."""
  out = {}
  for key, value in tree.items():
    if key == _CALL and isinstance(value, tuple):
      out["/".join(prefix)] = value
    elif isinstance(value, dict):
      out.update(_found(value, prefix + (key,)))
  return out


def _apply(apply_fn, variables, args, kwargs, keep):
  """``(outputs, captured, other updates)`` of one apply with the calls of
  the modules that ``keep`` accepts recorded."""
  mutable = kwargs.pop("mutable", False)
  if mutable is False:
    collections = [_COLLECTION]
  elif mutable is True:
    collections = True
  else:
    collections = ([mutable] if isinstance(mutable, str) else list(mutable)) + [_COLLECTION]
  outputs, updates = apply_fn(
      variables, *args, mutable=collections,
      capture_intermediates=lambda mdl, method: method == _CALL and keep(_path(mdl)),
      **kwargs)
  updates = dict(unfreeze(updates))
  captured = _found(dict(updates.pop(_COLLECTION, {})))
  if mutable is False:
    return outputs, captured
  return (outputs, updates), captured


def module_paths(apply_fn: Callable[..., Any], variables, *args,
                 **kwargs) -> list[str]:
  """The paths of every submodule the model calls on these inputs (computed
  on shapes alone: nothing runs)."""
  kwargs.pop("mutable", None)

  def run(variables, *args):
    return _apply(apply_fn, variables, args, dict(kwargs), lambda _: True)[1]
  found = jax.eval_shape(run, variables, *args)
  return sorted(p for p in found if p)


def capture(apply_fn: Callable[..., Any], variables, *args,
            layers: Sequence[str], **kwargs) -> tuple[Any, dict[str, jax.Array]]:
  """Runs ``apply_fn(variables, *args, **kwargs)`` and returns ``(outputs,
  {layer: activation})`` for the submodules named in ``layers``.

  Args:
    apply_fn: a Flax linen ``Module.apply`` (e.g. ``model.apply``).
    variables: the model's variables (``{"params": ..., ...}``).
    *args: the model's inputs.
    layers: submodule paths as Flax names them: ``"layer4"`` for an attribute
      or ``name=`` of the top module, ``"encoder/block_11"`` for a nested one
      (the keys of ``variables["params"]`` show the names).
    **kwargs: passed to ``apply_fn`` (``train=True``, ``rngs=...``,
      ``mutable=["batch_stats"]``: with ``mutable``, ``outputs`` is
      ``(model outputs, updated collections)`` as ``apply`` returns them).

  Returns:
    ``(outputs, activations)``: what ``apply_fn`` returns, and each named
    submodule's output (its ``__call__``'s return value).

  Raises:
    ValueError: a name matches no submodule (the message lists those there
      are), or a submodule was called more than once (its output is ambiguous).
    TypeError: ``layers`` is a string rather than a sequence of names.
  """
  if isinstance(layers, str):
    raise TypeError(f"layers must be a sequence of names, e.g. ({layers!r},); "
                    f"got the string {layers!r}")
  wanted = [str(name).strip("/") for name in layers]
  if not wanted:
    raise ValueError("layers names no submodule; e.g. layers=('layer4',)")
  outputs, captured = _apply(apply_fn, variables, args, dict(kwargs),
                             lambda path: path in wanted)
  missing = [name for name in wanted if name not in captured]
  if missing:
    available = module_paths(apply_fn, variables, *args, **kwargs)
    raise ValueError(f"layers {missing} match no submodule of the model; "
                     f"available: {available}")
  activations = {}
  for name in wanted:
    calls = captured[name]
    if len(calls) != 1:
      raise ValueError(f"submodule {name!r} is called {len(calls)} times in one "
                       "apply; name one of the modules it calls instead")
    activations[name] = calls[0]
  return outputs, activations
