"""The state, the optimiser and schedule, and the jitted train and eval steps.

:func:`build` turns a config into a :class:`Trainer`: the data set, the model,
a 1-D ``'data'`` mesh, the shardings (batch sharded, state replicated, so
BatchNorm and the Gini/KL losses see the global batch) and the steps, each
built once from one function:

* ``train_step`` / ``eval_step``: one model, ``jax.jit`` of :func:`train_step`
  and :func:`eval_step`. This is what a run trains with, what the benchmark
  times and what the tests check.
* ``replica_train_step`` / ``replica_eval_step``: the same two functions under
  ``jax.vmap`` over a leading axis of independent replicas (seeds trained
  together, ``--vmap_seeds``).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Callable, Iterator
import dataclasses
import functools
from typing import Any

from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from discrim_jax import baseline_losses
from discrim_jax import config_lib
from discrim_jax import data as data_lib
from discrim_jax import losses
from discrim_jax import models
from discrim_jax import representation
from discrim_jax.config_lib import ConfigError
from discrim_jax.models import common


# The key in ``TrainState.params`` of the parameters that only training uses:
# the class centres of the center loss and SupCon's projection head. Present
# only for objectives that have them; the model's own parameters (all that
# evaluation, export and pretrained import see) are the other keys.
AUX = "aux"


def model_params(params) -> dict[str, Any]:
  """The model's own parameters: ``params`` without the training-only ones."""
  return {k: v for k, v in params.items() if k != AUX}


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key of dropout/drop-path (raw uint32[2]); kept in the state rather
  # than the program, so that runs differing only in seed share one compile.
  rng: Any = None


def create_model(config, num_classes: int):
  try:
    return models.create_model(config.model, num_classes=num_classes,
                               **config.model_kwargs)
  except ValueError as e:
    raise ConfigError(f"{e} (--config.model_kwargs...)") from None


def create_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step. Warm-up replaces the first steps of the
  schedule; the step schedule's boundaries stay at their epochs."""
  s, lr = config.schedule, config.optimizer.lr
  total = config.num_epochs * steps_per_epoch
  warmup = int(s.warmup_epochs * steps_per_epoch)
  if s.name == "step":
    # join_schedules counts the second schedule's steps from the warm-up's end.
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warmup: s.decay
             for e in s.boundaries_epochs})
  elif s.name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    main = optax.constant_schedule(lr)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def weight_decay_mask(params) -> Any:
  """True for the parameters AdamW decays: convolution and dense kernels.

  As the official CvT (``WITHOUT_WD_LIST`` bn/bias/ln and its
  ``no_weight_decay`` set): biases, BatchNorm/LayerNorm scales and the class
  token are not decayed.
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: path[-1] == "kernel" for path in flat})


def create_optimizer(config, schedule) -> optax.GradientTransformation:
  """The model's optimiser; with the center loss, its class centres get their
  own: SGD at ``config.baseline.center.lr`` on the unweighted loss's
  gradient (the reference divides the centres' gradient by the weight)."""
  o = config.optimizer
  if o.name == "sgd":
    # PyTorch-style L2 on every parameter, as the reference recipe: decay
    # added to the gradient before momentum.
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(schedule, momentum=o.momentum or None,
                               nesterov=o.nesterov))
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                     mask=weight_decay_mask)
  center = config_lib.baselines(config).get("center")
  if center is None:
    return tx
  return baseline_losses.center_sgd(
      tx, weight=center["weight"], lr=center["lr"],
      is_centers=lambda path: path[:2] == (AUX, "centers"))


def baseline_terms(features, labels, aux_params, baselines: dict[str, Any]
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the baseline terms (``config_lib.baselines``) and
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


def load_dataset(config):
  """The data set a config names: a :class:`discrim_jax.data.Dataset` read
  lazily into memory, or streamed (``config.data_in_memory=False``)."""
  kwargs = dict(
      data_dir=config.data_dir or None, image_size=config.image_size or None,
      validation_seed=config.validation_seed,
      holdout=config.get("validation_holdout", ""),
      splits=config.splits.to_dict() if "splits" in config else None,
      download=config.get("download", True),
      max_examples={"train": config.train_subset,
                    "validation": config.eval_subset,
                    "test": config.eval_subset},
      train_per_class=config.get("train_per_class", 0))
  try:
    if config.get("data_in_memory", True):
      return data_lib.Dataset(config.dataset, **kwargs)
    from discrim_jax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.StreamingDataset(config.dataset, **kwargs)
  except ValueError as e:
    raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Trainer:
  """Everything built from a config that the loop, the benchmark and the
  tests need (see the module docstring for the steps)."""
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: Any
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: NamedSharding
  steps_per_epoch: int
  total_steps: int
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  replica_train_step: Callable[..., Any]
  replica_eval_step: Callable[..., Any]
  features_step: Callable[..., Any]
  init_state: Callable[[int], TrainState]
  abstract_state: Any
  stack: Callable[..., Any]
  unstack: Callable[..., Any]

  def batches(self, split: str, *, train: bool, start_step: int = 0,
              seed: int | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global batches of a split for one seed (default: ``config.seed``)."""
    for batch in self._local_batches(split, train, start_step, seed):
      yield data_lib.to_global_batch(batch, self.batch_sharding)

  def replica_batches(self, seeds, start_step: int
                      ) -> Iterator[dict[str, jax.Array]]:
    """Training batches of several seeds stacked on a leading replica axis."""
    sharding = NamedSharding(self.mesh, P(None, "data"))
    its = [self._local_batches("train", True, start_step, s) for s in seeds]
    for parts in zip(*its):
      stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
      yield data_lib.to_global_batch(stacked, sharding)

  def _local_batches(self, split, train, start_step, seed):
    c = self.config
    return data_lib.make_iterator(
        self.dataset, split, c.batch_size if train else c.eval_batch_size,
        train=train, seed=c.seed if seed is None else seed,
        start_step=start_step, normalize=c.normalize)

  def evaluate(self, state, split: str, *, with_features: bool = False):
    """Accuracy and cross-entropy over a split; with ``with_features`` also
    ``(metrics, {layer: P})`` with P the feature-class matrix of the split."""
    return self._results(self._totals(self.eval_step, state, split),
                         with_features)

  def evaluate_replicas(self, states, split: str, *,
                        with_features: bool = False) -> list[Any]:
    """:meth:`evaluate` for stacked replicas; one result per replica."""
    totals = self._totals(self.replica_eval_step, states, split)
    return [self._results(jax.tree.map(lambda x: x[r], totals), with_features)  # pylint: disable=cell-var-from-loop
            for r in range(len(totals["count"]))]

  def features(self, state, split: str, *, max_examples: int = 0
               ) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """``(metrics, {layer: (N, F) pooled features}, labels)`` of a split's
    un-augmented examples, gathered on every host, for the layers of
    :func:`representation_layers`; ``metrics`` are :meth:`evaluate`'s with
    ``with_features`` (from the same pass). With ``max_examples`` > 0 only
    the first examples are read, and ``metrics`` is None."""
    sums = []

    def step(batch):  # the split's eval sums come from the same pass
      totals, out = self.features_step(state, batch)
      sums.append(totals)
      return out
    features, labels = representation.extract(
        step, self.batches(split, train=False), max_examples=max_examples)
    metrics = None
    if not max_examples:
      totals = functools.reduce(  # batch after batch, as evaluate() sums
          lambda a, b: jax.tree.map(np.add, a, b), jax.device_get(sums))
      metrics = self._results(totals, True)
    return metrics, features, labels

  def _totals(self, step, state, split):
    totals = None
    for batch in self.batches(split, train=False):
      out = jax.device_get(step(state, batch))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    return totals

  def _results(self, totals, with_features: bool):
    count = float(totals["count"])
    metrics = {"accuracy": float(totals["correct"]) / count,
               "ce": float(totals["ce"]) / count, "num_examples": count}
    if not with_features:
      return metrics
    matrices = {}
    for layer in self.config.loss.layers:
      p = losses.distribution_from_sums(totals[f"class_sums/{layer}"],
                                        totals[f"class_counts/{layer}"])
      matrices[layer] = np.asarray(p)
      metrics[f"gini/{layer}"] = float(losses.gini_from_distribution(p))
    return metrics, matrices


def _init_fn(model, tx, image_shape, dtype, aux_init=None):
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


def _aux_init_fn(baselines, feature_shapes, num_classes):
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


def _feature_shapes(model, image_shape) -> dict[str, jax.ShapeDtypeStruct]:
  _, features = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
      jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return features


def _check_layers(model, features, config) -> None:
  """Raises ConfigError if a loss names a layer the model does not return
  (checked on shapes alone, before anything is compiled or written)."""
  named = {"config.loss.layers": list(config.loss.layers)}
  for term, b in config_lib.baselines(config).items():
    named[f"config.baseline.{term}.layer"] = [b["layer"]]
  for field, layers in named.items():
    missing = [name for name in layers if name not in features]
    if missing:
      raise ConfigError(
          f"{field} names {missing}, which model {model.__class__.__name__}"
          f" does not return; available: {sorted(features)} (--{field}=...)")


def representation_layers(config) -> tuple[str, ...]:
  """The layers whose features the representation metrics score: pre_logits
  and the loss layers."""
  return tuple(dict.fromkeys(("pre_logits",) + tuple(config.loss.layers)))


def build(config, *, dataset: data_lib.Dataset | None = None,
          devices: list[jax.Device] | None = None) -> Trainer:
  """Builds data, model, mesh, shardings and the jitted steps from a config.

  ``devices``: those of the mesh (default: ``jax.devices()``); the first
  ``config.num_devices`` of them where that is set.
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate_config(config, len(devices))
  if dataset is None:
    dataset = load_dataset(config)
  num_classes = dataset.num_classes
  model = create_model(config, num_classes)
  image_shape = (1,) + tuple(dataset.image_shape)
  feature_shapes = _feature_shapes(model, image_shape)
  _check_layers(model, feature_shapes, config)
  baselines = config_lib.baselines(config)
  if config.num_devices > 0:
    devices = devices[:config.num_devices]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  replica_batch_sharding = NamedSharding(mesh, P(None, "data"))
  options = config_lib.compiler_options(config, devices[0].platform)

  steps_per_epoch = data_lib.steps_per_epoch(dataset, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(
        f"config.batch_size={config.batch_size} exceeds the "
        f"{dataset.num_examples('train')} training examples of {config.dataset}")
  schedule = create_schedule(config, steps_per_epoch)
  tx = create_optimizer(config, schedule)
  init_state = _init_fn(model, tx, image_shape, jnp.dtype(model.dtype),
                        _aux_init_fn(baselines, feature_shapes, num_classes))
  abstract_state = jax.eval_shape(init_state, 0)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  gini_weights, kl_weights = config_lib.loss_weights(config)
  # The CPU fusion barriers' switch (models.common) is applied here, once.
  barriers = config.get("xla_cpu_fusion_barriers", True)
  step = common.with_fusion_barriers(functools.partial(
      train_step, model=model, num_classes=num_classes,
      gini_weights=gini_weights, kl_weights=kl_weights,
      aux_start_step=int(config.loss.start_epoch * steps_per_epoch),
      schedule=schedule, baselines=baselines), barriers)
  evaluate = common.with_fusion_barriers(functools.partial(
      eval_step, model=model, num_classes=num_classes,
      layers=tuple(config.loss.layers)), barriers)
  jit = functools.partial(jax.jit, compiler_options=options)
  return Trainer(
      config=config, dataset=dataset, model=model, mesh=mesh,
      state_sharding=state_sharding, batch_sharding=batch_sharding,
      steps_per_epoch=steps_per_epoch,
      total_steps=config.num_epochs * steps_per_epoch,
      train_step=jit(step, in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated),
                     donate_argnums=0),
      eval_step=jit(evaluate, in_shardings=(state_sharding, batch_sharding),
                    out_shardings=replicated),
      replica_train_step=jit(
          jax.vmap(step), in_shardings=(replicated, replica_batch_sharding),
          out_shardings=(replicated, replicated), donate_argnums=0),
      replica_eval_step=jit(
          jax.vmap(evaluate, in_axes=(0, None)),
          in_shardings=(replicated, batch_sharding), out_shardings=replicated),
      features_step=jit(
          common.with_fusion_barriers(functools.partial(
              features_step, model=model, num_classes=num_classes,
              loss_layers=tuple(config.loss.layers),
              layers=representation_layers(config)), barriers),
          in_shardings=(state_sharding, batch_sharding),
          out_shardings=replicated),
      init_state=jax.jit(init_state, out_shardings=state_sharding),
      abstract_state=abstract_state,
      stack=jax.jit(lambda *states: jax.tree.map(lambda *x: jnp.stack(x), *states),
                    out_shardings=replicated),
      unstack=jax.jit(lambda states, r: jax.tree.map(lambda x: x[r], states),
                      out_shardings=state_sharding))
