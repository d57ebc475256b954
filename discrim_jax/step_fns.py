"""The pure functions a run is made of: the state, one train step, one
evaluation step, one feature step, and the state's initialiser. Nothing here
is jitted or reads a config: ``discrim_jax.runtime`` binds them to a
:class:`~discrim_jax.run_spec.RunSpec` and jits them (and
``discrim_jax.seed_groups`` vmaps the same functions over seeds).
"""

from __future__ import annotations

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from discrim_jax import baseline_losses
from discrim_jax import losses
from discrim_jax.optim import AUX


def model_params(params) -> dict[str, Any]:
  """The model's own parameters: ``params`` without the training-only ones."""
  return {k: v for k, v in params.items() if k != AUX}


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key of dropout/drop-path (raw uint32[2]); kept in the state rather
  # than the program, so that runs differing only in seed share one compile.
  rng: Any = None


def baseline_terms(features, labels, aux_params, baselines: dict[str, Any]
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the baseline terms (``RunSpec.objective.baselines``) and
  each unweighted value, keyed ``center``/``opl``/``supcon``."""
  terms = {}
  if "center" in baselines:
    b = baselines["center"]
    terms["center"] = baseline_losses.center_loss(
        features[b["layer"]], labels, aux_params["centers"])
  if "opl" in baselines:
    b = baselines["opl"]
    terms["opl"] = baseline_losses.orthogonal_projection_loss(
        features[b["layer"]], labels, gamma=b["gamma"])
  if "supcon" in baselines:
    b = baselines["supcon"]
    head = baseline_losses.ProjectionHead(b["head_dim"])
    embeddings = head.apply({"params": aux_params["projection"]},
                            features[b["layer"]])
    terms["supcon"] = baseline_losses.supervised_contrastive_loss(
        embeddings, labels, temperature=b["temperature"])
  # Each term is float32 at least (float64 in a float64 model).
  total = sum(baselines[term]["weight"] * value for term, value in terms.items())
  return total, terms


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, *, model, num_classes: int,
               gini_weights, kl_weights, aux_start_step: int,
               schedule: optax.Schedule, baselines=None):
  """One step on a global batch; returns the new state and metrics (the
  loss terms, accuracy, the step's learning rate, gradient, parameter and
  update norms). Every auxiliary term (Gini/KL and the ``baselines``) is
  off before ``aux_start_step``."""
  labels = batch["label"]
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    (logits, features), updates = model.apply(
        {"params": model_params(params), "batch_stats": state.batch_stats},
        batch["image"], train=True, rngs={"dropout": rng},
        mutable=["batch_stats"])
    ce = jnp.mean(_cross_entropy(logits, labels))
    aux, terms = jnp.zeros((), ce.dtype), {}
    if gini_weights or kl_weights:  # no loss layer: no statistics at all
      aux, terms = losses.discriminability_loss(
          features, labels, num_classes, gini_weights=gini_weights,
          kl_weights=kl_weights)
    if baselines:
      extra, extra_terms = baseline_terms(features, labels, params.get(AUX, {}),
                                          baselines)
      aux = aux + extra
      terms.update(extra_terms)
    aux_scale = (state.step >= aux_start_step).astype(ce.dtype)
    loss = ce + aux_scale * aux
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates["batch_stats"],
                  dict(terms, ce=ce, loss=loss, accuracy=accuracy))

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  updates = jax.tree.map(jnp.subtract, new_state.params, state.params)
  metrics.update(grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(new_state.params),
                 update_norm=optax.tree.norm(updates),
                 learning_rate=schedule(state.step))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model, num_classes: int,
              layers: tuple[str, ...]):
  """Sums over the real examples: correct predictions, cross-entropy and, per
  loss layer, the per-class feature strengths that give the matrix P."""
  logits, features = model.apply({"params": model_params(state.params),
                                  "batch_stats": state.batch_stats},
                                 batch["image"], train=False)
  return _eval_sums(logits, features, batch, num_classes, layers)


def _eval_sums(logits, features, batch, num_classes, layers):
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
  ce = _cross_entropy(logits, batch["label"]) * mask
  out = {"correct": jnp.sum(correct), "ce": jnp.sum(ce), "count": jnp.sum(mask)}
  for layer in layers:
    out[f"class_sums/{layer}"], out[f"class_counts/{layer}"] = (
        losses.class_feature_sums(features[layer], batch["label"], num_classes,
                                  weights=mask))
  return out


def features_step(state: TrainState, batch, *, model, num_classes: int,
                  loss_layers: tuple[str, ...], layers: tuple[str, ...]):
  """:func:`eval_step`'s sums and, for the representation metrics, each of
  ``layers``' features pooled to ``(B, F)`` in float32 (float64 stays
  float64), with the batch's labels and mask: one pass gives both."""
  logits, features = model.apply({"params": model_params(state.params),
                                  "batch_stats": state.batch_stats},
                                 batch["image"], train=False)
  return (_eval_sums(logits, features, batch, num_classes, loss_layers),
          {"features": {layer: baseline_losses.pool(features[layer])
                        for layer in layers},
           "label": batch["label"], "mask": batch["mask"]})


def init_fn(model, tx, image_shape, dtype, aux_init=None):
  """``init_state(seed)``: a fresh TrainState (float64 parameters for a
  float64 model; ``aux_init`` adds the training-only ones)."""
  def init_state(seed) -> TrainState:
    key = jax.random.key(seed)
    variables = model.init(key, jnp.zeros(image_shape, jnp.float32), train=False)
    params = variables["params"]
    if aux_init is not None:
      params = dict(params, **{AUX: aux_init(jax.random.fold_in(key, 1))})
    if dtype == jnp.float64:  # a float64 model keeps float64 parameters
      params, variables = jax.tree.map(lambda v: v.astype(dtype),
                                       (params, variables))
    return TrainState.create(apply_fn=model.apply, params=params,
                             batch_stats=variables.get("batch_stats", {}), tx=tx,
                             rng=jax.random.PRNGKey(seed + 1))
  return init_state


def aux_init_fn(baselines, feature_shapes, num_classes):
  """The initialiser of the training-only parameters, or None: the centres
  (standard normal, as the reference) and SupCon's projection head."""
  if "center" not in baselines and "supcon" not in baselines:
    return None

  def aux_init(key):
    aux = {}
    if "center" in baselines:
      dim = feature_shapes[baselines["center"]["layer"]].shape[-1]
      aux["centers"] = jax.random.normal(jax.random.fold_in(key, 0),
                                         (num_classes, dim), jnp.float32)
    if "supcon" in baselines:
      b = baselines["supcon"]
      shape = feature_shapes[b["layer"]]
      aux["projection"] = baseline_losses.ProjectionHead(b["head_dim"]).init(
          jax.random.fold_in(key, 1), jnp.zeros(shape.shape, jnp.float32)
      )["params"]
    return aux
  return aux_init


def feature_shapes(model, image_shape) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of the model's returned features, without computing them.

  Kept for recent models (Flax modules compare and hash by their fields):
  builds that differ only in what the steps do (objective, optimiser, as
  in a harness's runs) do not trace the model's init again for them
  (0.4-0.6 s for ResNet-50 or CvT-13 at 224 px on a CPU)."""
  key = (model, tuple(image_shape), jax.config.jax_enable_x64)
  try:
    hash(key)
  except TypeError:  # a module with an unhashable field: not kept
    return _feature_shapes.__wrapped__(*key)
  return dict(_feature_shapes(*key))


@functools.lru_cache(maxsize=16)
def _feature_shapes(model, image_shape, x64):
  del x64  # part of the key only: it can change the features' dtypes

  def init_features(x):
    return model.init_with_output(jax.random.key(0), x, train=False)[0]

  _, features = jax.eval_shape(init_features,
                               jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return features
