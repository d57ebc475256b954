"""The training application: ``train_and_evaluate(config, workdir)``.

One ``jax.jit``-ed train step over a 1-D ``'data'`` mesh of all devices: the
batch is sharded, the state replicated, so BatchNorm and the Gini/KL losses see
the global batch. Checkpoints go through orbax's ``CheckpointManager`` (the
latest ``config.keep_checkpoints`` plus the best by validation accuracy);
rerunning with the same workdir resumes exactly where the last checkpoint left
off. The final test evaluation uses the best-validation checkpoint.

Workdir contents: ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step and split), TensorBoard events, ``checkpoints/`` and, at the end,
``summary.json`` and ``feature_class_matrix.npz`` (the matrix P of each loss
layer over the test split, for the best-validation model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import copy
import dataclasses
import functools
import json
import logging as std_logging
import math
import os
from pathlib import Path
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from discrim_jax import data as data_lib
from discrim_jax import losses
from discrim_jax import models

OBJECTIVES = {
    "ce": (False, False),
    "gini": (True, False),
    "kl": (False, True),
    "gini_kl": (True, True),
}


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key of dropout/drop-path (raw uint32[2]); kept in the state rather
  # than the program, so that runs differing only in seed share one compile.
  rng: Any = None


# Library fusions XLA:CPU can hand to YNNPACK (config.xla_cpu_ynn_fusion).
YNN_FUSION_TYPES = ("dot", "reduce", "eltwise")
# Config fields that change speed, not results: a run may resume with others.
SPEED_ONLY_FIELDS = ("xla_cpu_ynn_fusion", "xla_cpu_fusion_barriers")


class ConfigError(ValueError):
  """A config value that cannot work; the message names it and the way out."""


# ---------------------------------------------------------------- the config


def loss_weights(config) -> tuple[dict[str, float], dict[str, float]]:
  """(gini_weights, kl_weights) from ``config.objective`` and ``config.loss``."""
  if config.objective not in OBJECTIVES:
    raise ConfigError(f"unknown objective {config.objective!r}; use one of "
                      f"{sorted(OBJECTIVES)} (--config.objective=...)")
  use_gini, use_kl = OBJECTIVES[config.objective]
  # Terms that are off get weight 0: they are still computed and logged, so
  # that a CE run shows the Gini and KL values it would have had.
  layers = list(config.loss.layers)
  gini = {k: float(config.loss.lambda_gini) * use_gini for k in layers}
  kl = {k: float(config.loss.lambda_kl) * use_kl for k in layers}
  return gini, kl


def validate_config(config) -> None:
  """Checks the values a run cannot work without; raises ConfigError."""
  if config.dataset not in data_lib.DATASETS:
    raise ConfigError(f"unknown data set {config.dataset!r}; known data sets: "
                      f"{list(data_lib.DATASETS)} (--config.dataset=...)")
  if config.model not in models.MODELS:
    raise ConfigError(f"unknown model {config.model!r}; known models: "
                      f"{sorted(models.MODELS)} (--config.model=...)")
  loss_weights(config)
  for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
                "keep_checkpoints", "eval_every_epochs"):
    if config[field] < 1:
      raise ConfigError(f"config.{field} must be >= 1, got {config[field]}")
  if config.optimizer.lr <= 0:
    raise ConfigError(f"config.optimizer.lr must be > 0, got {config.optimizer.lr}")
  if config.optimizer.name not in ("sgd", "adamw"):
    raise ConfigError(f"unknown optimizer {config.optimizer.name!r}; use 'sgd' "
                      "or 'adamw' (--config.optimizer.name=...)")
  if config.schedule.name not in ("step", "cosine", "constant"):
    raise ConfigError(f"unknown schedule {config.schedule.name!r}; use 'step', "
                      "'cosine' or 'constant' (--config.schedule.name=...)")
  unknown = set(_ynn_fusion_types(config)) - set(YNN_FUSION_TYPES)
  if unknown:
    raise ConfigError(
        f"config.xla_cpu_ynn_fusion={config.xla_cpu_ynn_fusion!r} names "
        f"{sorted(unknown)}; use a comma-separated subset of "
        f"{list(YNN_FUSION_TYPES)}, or '' for XLA's default")
  if config.num_devices > jax.device_count():
    raise ConfigError(
        f"config.num_devices={config.num_devices} but only {jax.device_count()} "
        "devices are visible; use -1 for all of them")
  n = config.num_devices if config.num_devices > 0 else jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % n:
      raise ConfigError(
          f"config.{field}={config[field]} is not divisible by the {n} devices; "
          f"use a multiple of {n}")


def _ynn_fusion_types(config) -> list[str]:
  return [k.strip() for k in config.get("xla_cpu_ynn_fusion", "").split(",")
          if k.strip()]


def compiler_options(config, platform: str) -> dict[str, Any]:
  """XLA options for the jitted steps on ``platform`` (from the config)."""
  kinds = _ynn_fusion_types(config)
  if platform != "cpu" or not kinds:
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type": ",".join(
      f"LIBRARY_FUSION_TYPE_{k.upper()}" for k in kinds)}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir_config(config, workdir: Path) -> None:
  """Writes config.json, or refuses a workdir that holds a different run."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    for field in SPEED_ONLY_FIELDS:
      saved.pop(field, None)
      current.pop(field, None)
    if saved != current:
      a, b = _flat(saved), _flat(current)
      diff = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
      raise ConfigError(
          f"workdir {workdir} holds a run with a different config ("
          + "; ".join(diff) + "); use a new --workdir to start a new run")
  elif jax.process_index() == 0:
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------- model and optimizer


def create_model(config, num_classes: int):
  kwargs = dict(config.model_kwargs)
  try:
    if "fusion_barriers" in models.model_fields(config.model):
      kwargs.setdefault("fusion_barriers",
                        bool(config.get("xla_cpu_fusion_barriers", True)))
    return models.create_model(config.model, num_classes=num_classes, **kwargs)
  except ValueError as e:
    raise ConfigError(f"{e} (--config.model_kwargs...)") from None


def create_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  s, lr = config.schedule, config.optimizer.lr
  total = config.num_epochs * steps_per_epoch
  warmup = int(s.warmup_epochs * steps_per_epoch)
  if s.name == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch): s.decay for e in s.boundaries_epochs})
  elif s.name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    main = optax.constant_schedule(lr)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def create_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == "sgd":
    # PyTorch-style L2: decay added to the gradient before momentum.
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.sgd(schedule, momentum=o.momentum or None,
                                 nesterov=o.nesterov))
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)


# ----------------------------------------------------------------- the steps


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, *, model, num_classes: int,
               gini_weights, kl_weights, aux_start_step: int):
  """One SGD step on a global batch; returns the new state and metrics."""
  labels = batch["label"]
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    (logits, features), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    ce = jnp.mean(_cross_entropy(logits, labels))
    aux, terms = losses.discriminability_loss(
        features, labels, num_classes, gini_weights=gini_weights,
        kl_weights=kl_weights)
    aux_scale = (state.step >= aux_start_step).astype(jnp.float32)
    loss = ce + aux_scale * aux
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates["batch_stats"],
                  dict(terms, ce=ce, loss=loss, accuracy=accuracy))

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  updates = jax.tree.map(jnp.subtract, new_state.params, state.params)
  metrics.update(grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(new_state.params),
                 update_norm=optax.tree.norm(updates))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model, num_classes: int,
              layers: tuple[str, ...]):
  """Sums over the real examples: correct predictions, cross-entropy and, per
  loss layer, the per-class feature strengths that give the matrix P."""
  logits, features = model.apply({"params": state.params,
                                  "batch_stats": state.batch_stats},
                                 batch["image"], train=False)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
  ce = _cross_entropy(logits, batch["label"]) * mask
  out = {"correct": jnp.sum(correct), "ce": jnp.sum(ce), "count": jnp.sum(mask)}
  for layer in layers:
    out[f"class_sums/{layer}"], out[f"class_counts/{layer}"] = (
        losses.class_feature_sums(features[layer], batch["label"], num_classes,
                                  weights=mask))
  return out


# ------------------------------------------------------------------- helpers


class MetricsLog:
  """``metrics.jsonl`` plus CLU writers; only process 0 writes."""

  def __init__(self, workdir: Path, restored_step: int):
    self._primary = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    if self._primary and self.path.exists():
      # Records after the restored checkpoint belong to the lost tail of an
      # interrupted run, and the test record to the end of a finished one:
      # this run writes them again.
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line)["step"] <= restored_step
              and json.loads(line)["split"] != "test"]
      self.path.write_text("".join(k + "\n" for k in kept))
    # CLU's writers import TensorFlow, so CLU is imported where a run starts:
    # build() and the compiled steps need JAX alone (see experiments/bench.py).
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not self._primary, asynchronous=False)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()})
    if self._primary:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, "split": split, **values}) + "\n")

  def close(self):
    self.writer.flush()
    self.writer.close()


def _check_finite(history: list[dict[str, float]], first_step: int,
                  last_good: int | None, workdir: Path) -> None:
  for offset, metrics in enumerate(history):
    for term in ["loss", "ce"] + sorted(k for k in metrics if "/" in k):
      value = metrics[term]
      if not math.isfinite(value):
        kept = (f"the last good checkpoint (step {last_good}) is kept in "
                f"{workdir / 'checkpoints'}" if last_good is not None
                else "no checkpoint had been saved yet")
        raise FloatingPointError(
            f"non-finite {term} = {value} at step {first_step + offset}; {kept}; "
            "lower --config.optimizer.lr or the loss weights, then rerun")


def _restore(manager, step: int, abstract_state, workdir: Path):
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises many types for unreadable files
    raise RuntimeError(
        f"cannot restore the checkpoint of step {step} in {workdir / 'checkpoints'} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); move that step's "
        "folder aside to resume from an earlier one, or use a new --workdir"
    ) from None


def quiet_library_logs() -> None:
  """Drops orbax's and TFDS's INFO chatter (lines per save/read) from the console."""
  noisy = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorflow_datasets"))

  class _Filter:

    def filter(self, record) -> bool:
      return (record.levelno >= std_logging.WARNING
              or not any(n in record.pathname for n in noisy))

  logging.get_absl_handler().python_handler.addFilter(_Filter())


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Multi-host (multi-controller) start-up: TPU pods, multi-GPU hosts, SLURM.

  ``mode``: ``"true"`` always calls ``jax.distributed.initialize()`` (which
  reads the coordinator from the environment), ``"false"`` never, ``"auto"``
  when the environment names more than one process.
  """
  if mode not in ("auto", "true", "false"):
    raise ConfigError(f"--distributed must be auto, true or false, got {mode!r}")
  env = os.environ
  many = (env.get("JAX_COORDINATOR_ADDRESS")
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or int(env.get("SLURM_NTASKS", "1")) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if mode == "true" or (mode == "auto" and many):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())


# ----------------------------------------------------------- the application


def load_dataset(config) -> data_lib.Dataset:
  """The data set a config names (read lazily, once)."""
  return data_lib.Dataset(
      config.dataset, data_dir=config.data_dir or None,
      image_size=config.image_size or None,
      validation_seed=config.validation_seed,
      max_examples={"train": config.train_subset,
                    "validation": config.eval_subset,
                    "test": config.eval_subset})


@dataclasses.dataclass
class Trainer:
  """Everything built from a config that the loop and the tests need.

  ``train_step`` and ``eval_step`` are single-replica jitted steps;
  ``replica_train_step`` and ``replica_eval_step`` are the same steps under
  ``jax.vmap`` over a leading axis of independent replicas (seeds): N models
  and optimizer states trained by one compiled program.
  """
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: Any
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: NamedSharding
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  replica_train_step: Callable[..., Any]
  replica_eval_step: Callable[..., Any]
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
    stacked = self.stack(state)
    return self.evaluate_replicas(stacked, split, with_features=with_features)[0]

  def evaluate_replicas(self, states, split: str, *, with_features: bool = False):
    """:meth:`evaluate` for stacked replicas; returns one result per replica."""
    totals = None
    for batch in self.batches(split, train=False):
      out = jax.device_get(self.replica_eval_step(states, batch))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    results = []
    for r in range(len(totals["count"])):
      count = float(totals["count"][r])
      metrics = {"accuracy": float(totals["correct"][r]) / count,
                 "ce": float(totals["ce"][r]) / count, "num_examples": count}
      if not with_features:
        results.append(metrics)
        continue
      matrices = {}
      for layer in self.config.loss.layers:
        p = losses.distribution_from_sums(totals[f"class_sums/{layer}"][r],
                                          totals[f"class_counts/{layer}"][r])
        matrices[layer] = np.asarray(p)
        metrics[f"gini/{layer}"] = float(losses.gini_from_distribution(p))
      results.append((metrics, matrices))
    return results


def build(config, *, dataset: data_lib.Dataset | None = None,
          devices: list[jax.Device] | None = None) -> Trainer:
  """Builds data, model, mesh, shardings and the jitted steps from a config.

  ``devices``: those of the mesh (default: ``jax.devices()``); the first
  ``config.num_devices`` of them where that is set.
  """
  validate_config(config)
  if dataset is None:
    dataset = load_dataset(config)
  num_classes = dataset.num_classes
  model = create_model(config, num_classes)
  devices = list(jax.devices() if devices is None else devices)
  if config.num_devices > 0:
    devices = devices[:config.num_devices]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  replica_batch_sharding = NamedSharding(mesh, P(None, "data"))
  options = compiler_options(config, devices[0].platform)

  steps_per_epoch = data_lib.steps_per_epoch(dataset, config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(
        f"config.batch_size={config.batch_size} exceeds the "
        f"{len(dataset.arrays('train')[1])} training examples of {config.dataset}")
  total_steps = config.num_epochs * steps_per_epoch
  schedule = create_schedule(config, steps_per_epoch)
  tx = create_optimizer(config, schedule)
  image_shape = (1,) + tuple(dataset.image_shape)

  def init_state(seed) -> TrainState:
    variables = model.init(jax.random.key(seed),
                           jnp.zeros(image_shape, jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx,
                             rng=jax.random.PRNGKey(seed + 1))

  abstract_state = jax.eval_shape(init_state, 0)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  gini_weights, kl_weights = loss_weights(config)
  step = functools.partial(
      train_step, model=model, num_classes=num_classes,
      gini_weights=gini_weights, kl_weights=kl_weights,
      aux_start_step=int(config.loss.start_epoch * steps_per_epoch))
  evaluate = functools.partial(eval_step, model=model, num_classes=num_classes,
                               layers=tuple(config.loss.layers))
  return Trainer(
      config=config, dataset=dataset, model=model, mesh=mesh,
      state_sharding=state_sharding, batch_sharding=batch_sharding,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      schedule=schedule,
      train_step=jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated),
                         donate_argnums=0, compiler_options=options),
      eval_step=jax.jit(evaluate, in_shardings=(state_sharding, batch_sharding),
                        out_shardings=replicated, compiler_options=options),
      replica_train_step=jax.jit(
          jax.vmap(step), in_shardings=(replicated, replica_batch_sharding),
          out_shardings=(replicated, replicated), donate_argnums=0,
          compiler_options=options),
      replica_eval_step=jax.jit(
          jax.vmap(evaluate, in_axes=(0, None)),
          in_shardings=(replicated, batch_sharding), out_shardings=replicated,
          compiler_options=options),
      init_state=jax.jit(init_state, out_shardings=state_sharding),
      abstract_state=abstract_state,
      stack=jax.jit(lambda *states: jax.tree.map(lambda *x: jnp.stack(x), *states),
                    out_shardings=replicated),
      unstack=jax.jit(lambda states, r: jax.tree.map(lambda x: x[r], states),
                      out_shardings=state_sharding))


def _load_pretrained(trainer: Trainer, state: TrainState) -> TrainState:
  from discrim_jax import pretrained  # pylint: disable=g-import-not-at-top
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  loaded = pretrained.load_pretrained(trainer.config.init_from,
                                      trainer.config.model, variables)
  logging.info("Initialised from %s", trainer.config.init_from)
  new = state.replace(params=loaded["params"],
                      batch_stats=loaded.get("batch_stats", {}),
                      opt_state=state.tx.init(loaded["params"]))
  return jax.device_put(new, trainer.state_sharding)


def _checkpoint_manager(config, workdir: Path) -> ocp.CheckpointManager:
  best_metric = lambda m: m["accuracy"]  # pylint: disable=unnecessary-lambda-assignment
  options = ocp.CheckpointManagerOptions(
      best_fn=best_metric, best_mode="max",  # makes the manager keep metrics
      preservation_policy=checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=config.keep_checkpoints),
          checkpoint_managers.BestN(get_metric_fn=best_metric, n=1),
      ]),
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                               options=options)


@dataclasses.dataclass
class _Replica:
  """One seed's run: its config, workdir, checkpoints and metrics log."""
  config: ml_collections.ConfigDict
  workdir: Path
  manager: ocp.CheckpointManager
  log: MetricsLog | None = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: Callable[[int], None] | None = None,
                       dataset: data_lib.Dataset | None = None
                       ) -> dict[str, Any]:
  """Trains, evaluates, checkpoints; returns the summary (also summary.json).

  Args:
    config: an experiment config (see ``experiments/configs``).
    workdir: where checkpoints, metrics and the summary go; a workdir holding a
      checkpoint of the same config is resumed.
    step_callback: called with the step number after each train step (on the
      host, without waiting for the device).
    dataset: an already loaded data set (saves reading it again).
  """
  return train_and_evaluate_seeds(config, {config.seed: workdir},
                                  step_callback=step_callback,
                                  dataset=dataset)[config.seed]


def train_and_evaluate_seeds(config: ml_collections.ConfigDict,
                             workdirs: dict[int, str], *,
                             step_callback: Callable[[int], None] | None = None,
                             dataset: data_lib.Dataset | None = None
                             ) -> dict[int, dict[str, Any]]:
  """:func:`train_and_evaluate` for several seeds trained together.

  The seeds' models and optimizer states are stacked and trained by one
  ``jax.vmap``-ed, jitted step (one compile, N models); each seed keeps its own
  data order, workdir, checkpoints, metrics and summary, which equal those of
  training it alone up to float rounding (the batched convolutions round
  differently; training amplifies that over many steps, as it does any
  rounding). Worth it for small models that leave the machine idle.
  Returns ``{seed: summary}``.
  """
  seeds = list(workdirs)
  validate_config(config)
  replicas = []
  for seed in seeds:
    seed_config = copy.deepcopy(config)
    with seed_config.unlocked():
      seed_config.seed = seed
    path = Path(workdirs[seed])
    path.mkdir(parents=True, exist_ok=True)
    check_workdir_config(seed_config, path)
    replicas.append(_Replica(seed_config, path, None))  # type: ignore[arg-type]
  trainer = build(config, dataset=dataset)
  start = time.time()
  try:
    for r in replicas:
      r.manager = _checkpoint_manager(config, r.workdir)
    latest = [r.manager.latest_step() for r in replicas]
    if len(set(latest)) > 1:
      raise RuntimeError(
          f"the seeds' workdirs hold checkpoints of different steps {latest}; "
          "train them one at a time (without --vmap_seeds) to resume")
    if latest[0] is not None:
      states = [_restore(r.manager, latest[0], trainer.abstract_state, r.workdir)
                for r in replicas]
      logging.info("Resumed from the checkpoints of step %d", latest[0])
    else:
      states = [trainer.init_state(seed) for seed in seeds]
      if config.init_from:
        states = [_load_pretrained(trainer, state) for state in states]
    step = latest[0] or 0
    for r in replicas:
      r.log = MetricsLog(r.workdir, step)
    images_per_s = _train_loop(trainer, trainer.stack(*states), step, replicas,
                               seeds, step_callback)
    summaries = {}
    best_states, best_steps = [], []
    for r in replicas:
      r.manager.wait_until_finished()  # the last save is asynchronous
      best_steps.append(r.manager.best_step())
      best_states.append(_restore(r.manager, best_steps[-1],
                                  trainer.abstract_state, r.workdir))
    tests = trainer.evaluate_replicas(trainer.stack(*best_states), "test",
                                      with_features=True)
    for seed, r, best_step, (test, matrices) in zip(seeds, replicas, best_steps,
                                                     tests):
      r.log.write(best_step, "test", test)
      r.log.close()
      summary = {
          "test_accuracy": test["accuracy"], "test_ce": test["ce"],
          "best_validation_step": best_step,
          "best_validation_accuracy": float(
              r.manager.metrics(best_step)["accuracy"]),
          "wall_time_s": time.time() - start,
          "train_images_per_s": images_per_s / len(seeds),
          "total_steps": trainer.total_steps, "dataset": config.dataset,
          "model": config.model, "objective": config.objective, "seed": seed,
          "num_devices": trainer.mesh.size, "trained_with_seeds": seeds}
      if jax.process_index() == 0:
        np.savez_compressed(r.workdir / "feature_class_matrix.npz", **matrices)
        (r.workdir / "summary.json").write_text(
            json.dumps(summary, indent=2, sort_keys=True) + "\n")
      summaries[seed] = summary
    return summaries
  finally:
    for r in replicas:
      if r.manager is not None:
        r.manager.wait_until_finished()
        r.manager.close()


def _train_loop(trainer: Trainer, states, step: int, replicas: list[_Replica],
                seeds: list[int], step_callback) -> float:
  """Trains the stacked replicas to the end; returns total images/s."""
  config = trainer.config
  total = trainer.total_steps
  eval_every = config.eval_every_epochs * trainer.steps_per_epoch
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(
      num_train_steps=total, writer=replicas[0].log.writer,
      every_steps=config.log_every_steps, every_secs=60)
  pending: list[dict[str, jax.Array]] = []
  pending_start = step
  timed_steps, timed_seconds, t_mark = 0, 0.0, None
  batches = trainer.replica_batches(seeds, step)
  while step < total:
    states, metrics = trainer.replica_train_step(states, next(batches))
    pending.append(metrics)
    step += 1
    if step_callback is not None:
      step_callback(step)
    report(step)
    is_eval = step % eval_every == 0 or step == total
    is_log = step % config.log_every_steps == 0 or is_eval
    if is_log:
      history = jax.device_get(pending)
      learning_rate = float(jax.jit(trainer.schedule)(step - 1))
      for i, r in enumerate(replicas):
        mine = [{k: float(v[i]) for k, v in h.items()} for h in history]
        _check_finite(mine, pending_start + 1, r.manager.latest_step(), r.workdir)
        means = {k: float(np.mean([h[k] for h in mine])) for k in mine[-1]}
        means["learning_rate"] = learning_rate
        r.log.write(step, "train", means)
      # Throughput over whole log intervals, excluding the first (compile).
      now = time.time()
      if t_mark is not None:
        timed_steps += len(pending)
        timed_seconds += now - t_mark
      pending, pending_start = [], step
    if is_eval:
      for i, (r, val) in enumerate(zip(replicas, trainer.evaluate_replicas(
          states, "validation"))):
        r.log.write(step, "validation", val)
        r.manager.save(step, args=ocp.args.StandardSave(trainer.unstack(states, i)),
                       metrics={"accuracy": val["accuracy"]})
        logging.info("step %d: seed %d validation accuracy %.4f", step,
                     r.config.seed, val["accuracy"])
    if is_log:
      t_mark = time.time()
  if timed_seconds == 0:
    return float("nan")
  return timed_steps * config.batch_size * len(replicas) / timed_seconds
