"""Baseline auxiliary losses for a head-to-head with the Gini/KL terms.

Three well-known ways of making features discriminative, each added to
cross-entropy with its own weight and computed over the whole (global) batch
Notation: features ``f`` of shape ``(B, ..., F)`` are
global-average-pooled to ``(B, F)`` first; ``z`` is ``f`` L2-normalised per
example (a zero row stays zero); ``y`` the integer labels.

* **Center loss** (Wen et al., ECCV 2016): ``L = mean_i 1/2 ||f_i - c[y_i]||^2``
  with learnable class centres ``c`` of shape ``(C, F)``.
* **Orthogonal projection loss** (Ranasinghe et al., ICCV 2021, as in the
  reference code kahnchana/opl): ``s`` = mean of ``z_i . z_j`` over pairs
  ``i != j`` of the same class, ``d`` = mean of ``z_i . z_j`` over pairs of
  different classes (no absolute value), each with ``+1e-6`` in the
  denominator; ``L = (1 - s) + gamma * d``.
* **Supervised contrastive loss** (Khosla et al., NeurIPS 2020), one view per
  image: for each anchor ``i`` with positives ``P(i) = {p != i : y_p = y_i}``,
  ``l_i = -(1/|P(i)|) sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i}
  exp(z_i.z_a / t))``; ``L`` is the mean of ``l_i`` over the anchors that have
  a positive, 0 if none has.

Statistics are computed in float32 (float64 stays float64). The functions are
pure and jit-able; under ``jax.jit`` with the batch sharded over a mesh
(``Auto`` or ``Explicit`` axes) they give the global batch's value. Inside
``jax.shard_map`` or ``jax.pmap``, OPL and SupCon take ``axis_name``: each
device's examples are then compared with every device's, so value and
gradient are the whole batch's. The center loss is a mean over examples:
average it over devices (``jax.lax.pmean``) as cross-entropy is. Values and gradients are finite for a class
with one example, a batch of one class, all classes distinct, zero features,
B = 1 and bf16 inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["center_loss", "center_sgd", "orthogonal_projection_loss",
           "supervised_contrastive_loss", "ProjectionHead", "pool", "normalize"]

_EPS = 1e-6  # the reference OPL code's denominator guard

# An axis name of jax.shard_map / jax.pmap (a string, or a tuple of them).
AxisName = Hashable | tuple[Hashable, ...] | None


def _check(features, labels) -> tuple[jax.Array, jax.Array]:
  features, labels = jnp.asarray(features), jnp.asarray(labels)
  if features.ndim < 2:
    raise ValueError(f"features must have rank >= 2 (batch first, features "
                     f"last), got shape {features.shape}")
  if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
    raise ValueError(f"labels must have shape ({features.shape[0]},), got "
                     f"{labels.shape} (features have shape {features.shape})")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  return features, labels


def _explicit_spec(x: jax.Array):
  """The mesh and spec of ``x`` when its type carries a sharded axis (a mesh
  with Explicit axes), else None."""
  sharding = jax.typeof(x).sharding
  if any(axis is not None for axis in getattr(sharding, "spec", ())):
    return sharding.mesh, sharding.spec
  return None


def _replicated(x: jax.Array) -> jax.Array:
  """``x`` whole on every device when its type is sharded (Explicit axes):
  the pairwise terms compare every example with every other."""
  if _explicit_spec(x) is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _all_examples(z: jax.Array, labels: jax.Array, axis_name: AxisName):
  """Every device's ``(z, labels)`` along ``axis_name`` (this device's own
  when it is None), in device order."""
  if axis_name is None:
    return z, labels
  return (jax.lax.all_gather(z, axis_name, tiled=True),
          jax.lax.all_gather(labels, axis_name, tiled=True))


def _offset(batch: int, axis_name: AxisName) -> jax.Array | int:
  """Where this device's examples start in the gathered batch."""
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * batch


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def pool(features: jax.Array) -> jax.Array:
  """``(B, ..., F)`` -> ``(B, F)``: the mean over the middle axes, in float32
  (float64 for float64 input)."""
  x = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def normalize(f: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm; a zero row stays zero, with a zero
  (not NaN) gradient."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  nonzero = sq > 0
  # Double `where`: the untaken branch must not produce inf/NaN gradients.
  return jnp.where(nonzero, f * jax.lax.rsqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _gram(z: jax.Array, others: jax.Array) -> jax.Array:
  return jnp.einsum("if,jf->ij", z, others, precision=jax.lax.Precision.HIGHEST)


def _pairs(labels: jax.Array, others: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
  """``(same class, same example)`` masks of shape ``(B, B_all)``."""
  same = labels[:, None] == others[None, :]
  rows = jnp.arange(labels.shape[0])[:, None] + offset
  itself = rows == jnp.arange(others.shape[0])[None, :]
  return same, itself


def center_loss(features: jax.Array, labels: jax.Array,
                centers: jax.Array) -> jax.Array:
  """``mean_i 1/2 ||f_i - c[y_i]||^2`` (Wen et al. 2016).

  Args:
    features: activations of shape ``(B, ..., F)``, pooled to ``(B, F)``.
    labels: integer labels of shape ``(B,)`` in ``[0, C)``.
    centers: the class centres, shape ``(C, F)``; trained by gradient (the
      reference trains them with SGD at their own learning rate, 0.5).

  Returns:
    A float32 scalar; NaN under ``jax.jit`` if a label is outside ``[0, C)``
    (a concrete out-of-range label raises ValueError).
  """
  features, labels = _check(features, labels)
  centers = jnp.asarray(centers)
  f = pool(features)
  if centers.ndim != 2 or centers.shape[1] != f.shape[1]:
    raise ValueError(f"centers must have shape (C, {f.shape[1]}), got "
                     f"{centers.shape}")
  num_classes = centers.shape[0]
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    concrete = np.asarray(labels)
    if concrete.min() < 0 or concrete.max() >= num_classes:
      raise ValueError(f"labels must lie in [0, {num_classes}), got "
                       f"[{concrete.min()}, {concrete.max()}]")
  # c[y_i] as a one-hot product (exact: one term of each sum is non-zero),
  # which keeps the batch's sharding under Explicit mesh axes, where a
  # gather would need its output sharding spelled out.
  onehot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype)
  c = jnp.einsum("bc,cf->bf", onehot, centers.astype(f.dtype),
                 precision=jax.lax.Precision.HIGHEST)
  value = 0.5 * jnp.mean(jnp.sum(jnp.square(f - c), axis=-1))
  valid = jnp.all((labels >= 0) & (labels < num_classes))
  return jnp.where(valid, value, jnp.nan)


def center_sgd(tx: optax.GradientTransformation, *, weight: float,
               lr: float = 0.5,
               is_centers: Callable[[tuple[str, ...]], bool] = (
                   lambda path: path[-1] == "centers")
               ) -> optax.GradientTransformation:
  """``tx`` for the model's parameters and, for the class centres, plain SGD
  at ``lr`` on the gradient of the *unweighted* center loss, as the
  reference trains them (it divides the centres' gradient by the loss
  ``weight``): no weight decay, no momentum, whatever ``tx`` does.

  Args:
    tx: the model's optimiser.
    weight: the center loss's weight in the total loss.
    lr: the centres' learning rate (0.5 in the reference).
    is_centers: which parameters are the centres, given their path in the
      parameter tree (default: a leaf named ``centers``).

  Returns:
    An ``optax.multi_transform`` over the parameter tree.
  """
  if weight <= 0 or lr <= 0:
    raise ValueError(f"weight and lr must be > 0, got weight={weight}, lr={lr}")
  centers_tx = optax.chain(optax.scale(1.0 / weight), optax.sgd(lr))

  def labels(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: "centers" if is_centers(path) else "main" for path in flat})
  return optax.multi_transform({"main": tx, "centers": centers_tx}, labels)


def orthogonal_projection_loss(features: jax.Array, labels: jax.Array, *,
                               gamma: float = 0.5,
                               axis_name: AxisName = None) -> jax.Array:
  """``(1 - s) + gamma * d`` (Ranasinghe et al. 2021; see the module
  docstring): pulls same-class normalised features together and pushes
  different classes towards orthogonality.

  Args:
    features: activations of shape ``(B, ..., F)``, pooled to ``(B, F)``.
    labels: integer labels of shape ``(B,)`` (any integers).
    gamma: weight of the different-class term.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split
      over: pairs then span every device's examples.

  Returns:
    A float32 scalar. With no same-class pair ``s`` is 0 (the loss is then
    ``1 + gamma * d``), as in the reference code.
  """
  features, labels = _check(features, labels)
  z = _replicated(normalize(pool(features)))
  labels = _replicated(labels)
  z_all, labels_all = _all_examples(z, labels, axis_name)
  dot = _gram(z, z_all)
  same, itself = _pairs(labels, labels_all, _offset(labels.shape[0], axis_name))
  pos = (same & ~itself).astype(dot.dtype)
  neg = (~same).astype(dot.dtype)
  sums = _psum((jnp.sum(pos * dot), jnp.sum(pos), jnp.sum(neg * dot),
                jnp.sum(neg)), axis_name)
  s = sums[0] / (sums[1] + _EPS)
  d = sums[2] / (sums[3] + _EPS)
  return (1.0 - s) + gamma * d


def supervised_contrastive_loss(embeddings: jax.Array, labels: jax.Array, *,
                                temperature: float = 0.1,
                                axis_name: AxisName = None) -> jax.Array:
  """The supervised contrastive loss with one view per image (Khosla et al.
  2020; see the module docstring), on L2-normalised ``embeddings``.

  Args:
    embeddings: shape ``(B, ..., D)``, pooled to ``(B, D)`` (in the training
      app: the output of a projection head that inference does not use).
    labels: integer labels of shape ``(B,)`` (any integers).
    temperature: ``t``.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split
      over: each device's anchors are then contrasted with every device's
      examples.

  Returns:
    A float32 scalar: the mean of ``l_i`` over the anchors that have a
    positive, 0 when none has.
  """
  embeddings, labels = _check(embeddings, labels)
  z = _replicated(normalize(pool(embeddings)))
  labels = _replicated(labels)
  z_all, labels_all = _all_examples(z, labels, axis_name)
  logits = _gram(z, z_all) / temperature
  if labels_all.shape[0] == 1:  # no other example: no anchor has a positive
    return jnp.zeros((), logits.dtype)
  same, itself = _pairs(labels, labels_all, _offset(labels.shape[0], axis_name))
  # log sum_{a != i} exp(logits[i, a]): every row has B_all - 1 >= 1 terms.
  lse = jax.nn.logsumexp(logits, axis=1, where=~itself, keepdims=True)
  log_prob = logits - lse
  pos = same & ~itself
  num_pos = jnp.sum(pos, axis=1)
  has_pos = num_pos > 0
  per_anchor = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.where(
      has_pos, num_pos, 1)
  total, anchors = _psum((jnp.sum(jnp.where(has_pos, per_anchor, 0.0)),
                          jnp.sum(has_pos)), axis_name)
  return jnp.where(anchors > 0, total / jnp.maximum(anchors, 1), 0.0)


class ProjectionHead(nn.Module):
  """SupCon's projection head (Khosla et al.): pooled features -> Dense(F) ->
  ReLU -> Dense(``features``). Trained with the model, unused at inference."""
  features: int = 128

  @nn.compact
  def __call__(self, x):
    x = pool(x)
    x = nn.relu(nn.Dense(x.shape[-1], name="hidden")(x))
    return nn.Dense(self.features, name="out")(x)
