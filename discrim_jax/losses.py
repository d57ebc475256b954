"""Discriminability-enforcing losses (Croitoru, Grigore & Ionescu, arXiv 2202.07073).

Two auxiliary terms act on high-level activations, computed over the whole
(global) mini-batch, and are added to cross-entropy:

* the **Gini loss** makes each feature fire for one class only;
* the **KL loss** makes the share of features given to each class match the
  share of that class in the batch, so the Gini loss cannot hand every feature
  to a few classes.

Notation, for activations ``x`` of shape ``(B, ..., F)`` and labels ``y`` of
shape ``(B,)`` in ``[0, C)``::

  a[i, f] = mean over the middle axes of |x[i, ..., f]|
  n[c]    = #{i : y_i = c}
  M[f, c] = sum_{i: y_i = c} a[i, f] / n[c]          (0 where n[c] = 0)
  P[f, c] = M[f, c] / sum_c' M[f, c']                 (0 for a dead feature)
  L_gini  = mean_f (1 - sum_c P[f, c]^2)
  q[c]    = sum_f P[f, c] / sum_{f, c'} P[f, c']
  pi[c]   = n[c] / B
  L_kl    = sum_{c: n[c] > 0} pi[c] log(pi[c] / q[c])

All statistics are computed in float32 whatever the input dtype (float64
inputs, under ``jax_enable_x64``, stay float64). The functions
are pure, jit-able and invariant to the order of the samples. Under ``jax.jit``
with the batch sharded over a mesh (``Auto`` or ``Explicit`` axes), XLA
reduces over the global batch, so the value equals that of a single device
holding the same global batch. Inside ``jax.shard_map`` or ``jax.pmap``, where
each device sees only its part, pass ``axis_name``: the class statistics are
summed over that axis first, so value and gradient are again the whole
batch's.

Labels out of range: with concrete (non-traced) labels a ``ValueError`` is
raised. Under ``jax.jit`` the labels cannot be inspected, so the losses return
NaN when any label lies outside ``[0, num_classes)`` -- never a plausible
number -- and the training loop's NaN check stops the run. The input pipeline
(``discrim_jax.data``) rejects such labels before they reach the device.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "class_feature_distribution",
    "class_feature_sums",
    "distribution_from_sums",
    "gini_from_distribution",
    "gini_loss",
    "kl_loss",
    "gini_and_kl",
    "discriminability_loss",
]

# An axis name of jax.shard_map / jax.pmap (a string, or a tuple of them).
AxisName = Hashable | tuple[Hashable, ...] | None

# Floor for q[c] inside the logarithm: q[c] is exactly 0 only when no live
# feature fires for class c; the floor keeps the KL term finite there.
_Q_FLOOR = 1e-10


def _num_classes(num_classes) -> int:
  """``num_classes`` as a Python int (NumPy integers are accepted)."""
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(
      num_classes, (int, np.integer)):
    raise TypeError(
        f"num_classes must be a static integer (a Python or NumPy int), got "
        f"{num_classes!r} of type {type(num_classes).__name__}")
  return int(num_classes)


def _as_array(x, name: str) -> jax.Array:
  if isinstance(x, Mapping):
    raise TypeError(
        f"{name} must be an array, got a mapping with keys {sorted(x)}; pass "
        "one layer's activations (discriminability_loss takes the mapping)")
  return jnp.asarray(x)


def _validate(features, labels, num_classes) -> tuple[jax.Array, jax.Array, int]:
  """The checked ``(features, labels, num_classes)``; raises TypeError or
  ValueError naming what was expected."""
  num_classes = _num_classes(num_classes)
  features = _as_array(features, "features")
  labels = _as_array(labels, "labels")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if features.ndim < 2:
    raise ValueError(
        f"features must have rank >= 2 (batch first, features last), got "
        f"shape {features.shape}")
  if labels.ndim != 1:
    raise ValueError(
        f"labels must have shape (B,), got shape {labels.shape} "
        f"(features have shape {features.shape})")
  if labels.shape[0] != features.shape[0]:
    raise ValueError(
        f"batch sizes differ: features have shape {features.shape}, labels "
        f"have shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    concrete = np.asarray(labels)
    lo, hi = int(concrete.min()), int(concrete.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(
          f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]; "
          f"check num_classes or the data set's label map")
  return features, labels, num_classes


def _statistics_dtype(features: jax.Array):
  """float32, or float64 for float64 features (under jax_enable_x64)."""
  return jnp.promote_types(features.dtype, jnp.float32)


def _labels_valid(labels: jax.Array, num_classes: int,
                  axis_name: AxisName = None) -> jax.Array:
  valid = jnp.all((labels >= 0) & (labels < num_classes))
  if axis_name is not None:  # every device's labels
    valid = jax.lax.pmin(valid.astype(jnp.int32), axis_name) > 0
  return valid


def _class_sums(a: jax.Array, onehot: jax.Array) -> jax.Array:
  """sum_b a[b, f] * onehot[b, c], the contraction over the (global) batch."""
  kwargs = {}
  sharding = jax.typeof(a).sharding
  if any(axis is not None for axis in sharding.spec):
    # Under a mesh with Explicit axes the batch axis is sharded in the type,
    # and JAX asks where the (small, (F, C)) result should live: replicated.
    kwargs["out_sharding"] = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec())
  return jnp.einsum("bf,bc->fc", a, onehot,
                    precision=jax.lax.Precision.HIGHEST, **kwargs)


def class_feature_sums(features: jax.Array, labels: jax.Array, num_classes: int,
                       weights: jax.Array | None = None, *,
                       axis_name: AxisName = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of feature strength, for statistics over several batches.

  Returns ``(S, n)`` with ``S[f, c] = sum_{i: y_i = c} w_i a[i, f]`` (shape
  ``(F, C)``) and ``n[c] = sum_{i: y_i = c} w_i``, float32; ``w`` defaults to
  ones (a 0/1 mask drops padded examples). Sums from several batches add up;
  :func:`distribution_from_sums` turns them into ``P``. With ``axis_name``
  (inside ``shard_map``/``pmap``) the sums are over the batch of every
  device on that axis.
  """
  num_classes = _num_classes(num_classes)
  dtype = _statistics_dtype(features)
  x = jnp.abs(features.astype(dtype))
  a = jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)  # (B, C)
  if weights is not None:
    onehot = onehot * weights.astype(dtype)[:, None]
  sums, counts = _class_sums(a, onehot), jnp.sum(onehot, axis=0)
  if axis_name is not None:
    sums, counts = jax.lax.psum((sums, counts), axis_name)
  return sums, counts


def distribution_from_sums(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """``P[f, c]`` from :func:`class_feature_sums` (0 rows for dead features)."""
  # Double `where`: the untaken branch must not produce inf/NaN gradients.
  present = counts > 0
  m = jnp.where(present, sums / jnp.where(present, counts, 1.0), 0.0)
  row = jnp.sum(m, axis=1, keepdims=True)
  alive = row > 0
  return jnp.where(alive, m / jnp.where(alive, row, 1.0), 0.0)


def gini_from_distribution(p: jax.Array) -> jax.Array:
  """``mean_f (1 - sum_c P[f, c]^2)`` for a feature-class matrix ``P``."""
  return jnp.mean(1.0 - jnp.sum(jnp.square(p), axis=1))


def _kl_from_p(p: jax.Array, n: jax.Array) -> jax.Array:
  col = jnp.sum(p, axis=0)
  total = jnp.sum(col)
  num_classes = p.shape[1]
  # With every feature dead q is undefined; take it uniform (no gradient flows).
  q = jnp.where(total > 0, col / jnp.where(total > 0, total, 1.0),
                1.0 / num_classes)
  pi = n / jnp.sum(n)
  present = n > 0
  log_ratio = (jnp.log(jnp.where(present, pi, 1.0))
               - jnp.log(jnp.maximum(q, _Q_FLOOR)))
  return jnp.sum(jnp.where(present, pi * log_ratio, 0.0))


def _nan_unless(valid: jax.Array, value: jax.Array) -> jax.Array:
  return jnp.where(valid, value, jnp.nan)


def _checked_statistics(features, labels, num_classes, axis_name):
  """``(P, n, labels valid)`` over the (global) batch, after the checks."""
  features, labels, num_classes = _validate(features, labels, num_classes)
  sums, n = class_feature_sums(features, labels, num_classes,
                               axis_name=axis_name)
  return (distribution_from_sums(sums, n), n,
          _labels_valid(labels, num_classes, axis_name))


_AXIS_DOC = """    axis_name: inside ``jax.shard_map`` or ``jax.pmap``, the name of the
      mapped axis the batch is split over: the statistics are then those of
      the whole batch across that axis (the value, and the gradient with
      respect to each device's features, equal one device's holding the
      whole batch). ``None`` (default) under plain ``jax.jit``, where a
      sharded batch is already reduced globally."""


def class_feature_distribution(features: jax.Array, labels: jax.Array,
                               num_classes: int, *,
                               axis_name: AxisName = None) -> jax.Array:
  """Each feature's distribution over the classes of the batch.

  ``P[f, c] = M[f, c] / sum_c' M[f, c']`` with ``M[f, c]`` the mean over the
  samples of class ``c`` of ``mean |x[i, ..., f]|`` (see the module docstring).
  A feature that is zero for the whole batch (dead) has a row of zeros.

  Args:
    features: activations of shape ``(B, ..., F)``, any float dtype.
    labels: integer labels of shape ``(B,)`` in ``[0, num_classes)``.
    num_classes: the number of classes ``C`` (a static integer >= 2).
{axis}

  Returns:
    A float32 array of shape ``(F, C)``; NaN everywhere if a traced label is
    out of range.
  """
  p, _, valid = _checked_statistics(features, labels, num_classes, axis_name)
  return _nan_unless(valid, p)


def gini_and_kl(features: jax.Array, labels: jax.Array, num_classes: int, *,
                axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
  """Returns ``(L_gini, L_kl)`` for one layer, sharing the statistics
  (arguments as :func:`gini_loss`)."""
  p, n, valid = _checked_statistics(features, labels, num_classes, axis_name)
  return (_nan_unless(valid, gini_from_distribution(p)),
          _nan_unless(valid, _kl_from_p(p, n)))


def gini_loss(features: jax.Array, labels: jax.Array, num_classes: int, *,
              axis_name: AxisName = None) -> jax.Array:
  """Gini impurity of the features with respect to the class labels.

  ``L_gini = mean_f (1 - sum_c P[f, c]^2)``, with ``P`` from
  :func:`class_feature_distribution`. It is 0 when every feature fires for one
  class only and ``1 - 1/k`` for a feature equally active on ``k`` classes. A
  dead feature counts as impurity 1 and passes no gradient.

  Args:
    features: activations of shape ``(B, ..., F)``, any float dtype.
    labels: integer labels of shape ``(B,)`` in ``[0, num_classes)``.
    num_classes: the number of classes (a static integer >= 2).
{axis}

  Returns:
    A float32 scalar.
  """
  return gini_and_kl(features, labels, num_classes, axis_name=axis_name)[0]


def kl_loss(features: jax.Array, labels: jax.Array, num_classes: int, *,
            axis_name: AxisName = None) -> jax.Array:
  """KL divergence between the batch's class distribution and the features'.

  ``L_kl = KL(pi || q) = sum_{c: n[c] > 0} pi[c] log(pi[c] / q[c])`` with
  ``pi[c] = n[c] / B`` and ``q[c] = sum_f P[f, c] / sum_{f, c'} P[f, c']``.
  ``q`` is floored at 1e-10 inside the logarithm, so a present class with no
  live feature gives a large but finite value.

  Args:
    features: activations of shape ``(B, ..., F)``, any float dtype.
    labels: integer labels of shape ``(B,)`` in ``[0, num_classes)``.
    num_classes: the number of classes (a static integer >= 2).
{axis}

  Returns:
    A float32 scalar.
  """
  return gini_and_kl(features, labels, num_classes, axis_name=axis_name)[1]


def _check_weights(name: str, weights) -> dict[str, float]:
  if not isinstance(weights, Mapping):
    raise TypeError(
        f"{name} must map layer names to weights, e.g. {{'stage4': 0.5}}; got "
        f"{weights!r} of type {type(weights).__name__}")
  return dict(weights)


def discriminability_loss(
    features: Mapping[str, jax.Array],
    labels: jax.Array,
    num_classes: int,
    *,
    gini_weights: Mapping[str, float],
    kl_weights: Mapping[str, float],
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted auxiliary objective over K chosen layers.

  ``(1/K) sum_k (gini_weights[k] * L_gini[k] + kl_weights[k] * L_kl[k])``
  where the K layers are the union of the names in ``gini_weights`` and
  ``kl_weights``; add the result to cross-entropy. Layers of ``features`` not
  named in either dict are ignored.

  Args:
    features: named activations, as the models in ``discrim_jax.models``
      return them (or :func:`discrim_jax.features.capture` takes from any
      Flax model).
    labels: integer labels of shape ``(B,)``.
    num_classes: the number of classes (a static integer >= 2).
    gini_weights: layer name -> lambda_gini (a missing name means 0).
    kl_weights: layer name -> lambda_kl (a missing name means 0).
{axis}

  Returns:
    ``(total, terms)``: the weighted total (float32 scalar) and a dict with
    ``gini/<layer>`` and ``kl/<layer>`` for every chosen layer, for logging.

  Raises:
    TypeError: if ``features`` is not a mapping or a weight is not a dict.
    ValueError: if the weights name no layer, or a layer that ``features``
      does not have.
  """
  if not isinstance(features, Mapping):
    raise TypeError(
        "features must map layer names to activations, e.g. {'stage4': x}; "
        f"got {type(features).__name__}"
        + (f" of shape {features.shape}" if hasattr(features, "shape") else "")
        + "; for one layer's array use gini_and_kl")
  gini_weights = _check_weights("gini_weights", gini_weights)
  kl_weights = _check_weights("kl_weights", kl_weights)
  layers = sorted(set(gini_weights) | set(kl_weights))
  if not layers:
    raise ValueError(
        "gini_weights and kl_weights name no layer; name the layer(s) to "
        f"regularise, e.g. gini_weights={{'stage4': 0.5}}; available: "
        f"{sorted(features)}")
  missing = [name for name in layers if name not in features]
  if missing:
    raise ValueError(
        f"loss weights name layers {missing} that the model does not return; "
        f"available: {sorted(features)}")
  terms: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  for name in layers:
    gini, kl = gini_and_kl(features[name], labels, num_classes,
                           axis_name=axis_name)
    terms[f"gini/{name}"] = gini
    terms[f"kl/{name}"] = kl
    total = (total + gini_weights.get(name, 0.0) * gini
             + kl_weights.get(name, 0.0) * kl)
  return total / len(layers), terms


for _fn in (class_feature_distribution, gini_loss, kl_loss,
            discriminability_loss):
  _fn.__doc__ = _fn.__doc__.replace("{axis}", _AXIS_DOC)
del _fn
