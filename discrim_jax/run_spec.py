"""A config resolved once: :func:`resolve` turns an ml_collections config
into a frozen, validated :class:`RunSpec`, which is all that building and
running reads (``discrim_jax.runtime``, ``discrim_jax.train``).

Every check of a config lives here: those that need the config alone run in
:func:`resolve` (before anything is read, compiled or written); the two that
need the model's layer names or the training split's size are
:meth:`RunSpec.check_layers` and :meth:`RunSpec.check_batch`, which
``runtime.build`` calls as soon as it knows them.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import copy
import dataclasses
from typing import Any

import ml_collections

from discrim_jax import config_lib
from discrim_jax.config_lib import ConfigError

# Library fusions XLA:CPU can hand to YNNPACK (config.xla_cpu_ynn_fusion).
YNN_FUSION_TYPES = ("dot", "reduce", "eltwise")
_POSITIVE = ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
             "keep_checkpoints", "eval_every_epochs")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a run adds to cross-entropy: the Gini/KL weights per loss layer
  (0 for a term the objective does not use: it is still computed and
  logged) and the baseline terms' settings, ``{term: {weight, layer, ...}}``."""
  name: str
  terms: tuple[str, ...]
  layers: tuple[str, ...]
  gini_weights: dict[str, float]
  kl_weights: dict[str, float]
  baselines: dict[str, dict[str, Any]]
  start_epoch: float

  def layer_fields(self) -> dict[str, list[str]]:
    """The config field naming each layer the objective reads."""
    named = {"config.loss.layers": list(self.layers)}
    for term, b in self.baselines.items():
      named[f"config.baseline.{term}.layer"] = [b["layer"]]
    return named


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A validated description of one run; see ``config_lib.base_config`` for
  what each field means. ``config`` is the source, kept only to be written
  into the workdir (``config.json``, the run's identity)."""
  config: ml_collections.ConfigDict
  dataset: str
  data_options: dict[str, Any]  # keyword arguments of the data set readers
  data_in_memory: bool
  normalize: bool
  model: str
  model_kwargs: dict[str, Any]
  init_from: str
  objective: Objective
  optimizer: dict[str, Any]
  schedule: dict[str, Any]
  num_epochs: int
  batch_size: int
  eval_batch_size: int
  seed: int
  num_devices: int  # how many of the visible devices the mesh takes
  compiler_options: dict[str, Any]
  fusion_barriers: bool
  representation: dict[str, Any]
  log_every_steps: int
  eval_every_epochs: int
  keep_checkpoints: int
  checkpoint_every_steps: int

  def with_seed(self, seed: int) -> RunSpec:
    """The same run under another seed (its config says so too)."""
    config = copy.deepcopy(self.config)
    with config.unlocked():
      config.seed = seed
    return dataclasses.replace(self, seed=seed, config=config,
                               data_options=_data_options(config))

  @property
  def representation_layers(self) -> tuple[str, ...]:
    """The layers the representation metrics score: pre_logits and the loss
    layers."""
    return tuple(dict.fromkeys(("pre_logits",) + self.objective.layers))

  def check_layers(self, available, model_name: str) -> None:
    """ConfigError if the objective names a layer the model does not return
    (checked on shapes alone, before anything is compiled or written)."""
    for field, layers in self.objective.layer_fields().items():
      missing = [name for name in layers if name not in available]
      if missing:
        raise ConfigError(
            f"{field} names {missing}, which model {model_name} does not "
            f"return; available: {sorted(available)} (--{field}=...)")

  def check_batch(self, num_train: int) -> None:
    """ConfigError if one batch is more than the training split."""
    if self.batch_size > num_train:
      raise ConfigError(
          f"config.batch_size={self.batch_size} exceeds the {num_train} "
          f"training examples of {self.dataset}; use at most {num_train} "
          "(--config.batch_size=...)")


def resolve(config, num_devices: int, platform: str = "cpu") -> RunSpec:
  """The validated :class:`RunSpec` of ``config`` on ``num_devices`` visible
  devices of ``platform``; ConfigError naming the field otherwise."""
  terms = _validate(config, num_devices)
  used = num_devices if config.num_devices <= 0 else config.num_devices
  return RunSpec(
      config=config, dataset=config.dataset,
      data_options=_data_options(config),
      data_in_memory=config.get("data_in_memory", True),
      normalize=config.normalize, model=config.model,
      model_kwargs=config.model_kwargs.to_dict(), init_from=config.init_from,
      objective=_objective(config, terms), optimizer=config.optimizer.to_dict(),
      schedule=config.schedule.to_dict(), num_epochs=config.num_epochs,
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      seed=config.seed, num_devices=used,
      compiler_options=compiler_options(config, platform),
      fusion_barriers=config.get("xla_cpu_fusion_barriers", True),
      representation=config.representation.to_dict(),
      log_every_steps=config.log_every_steps,
      eval_every_epochs=config.eval_every_epochs,
      keep_checkpoints=config.keep_checkpoints,
      checkpoint_every_steps=config.get("checkpoint_every_steps", 0))


def _data_options(config) -> dict[str, Any]:
  return dict(
      data_dir=config.data_dir or None, image_size=config.image_size or None,
      validation_seed=config.validation_seed,
      holdout=config.get("validation_holdout", ""),
      splits=config.splits.to_dict() if "splits" in config else None,
      download=config.get("download", True),
      max_examples={"train": config.train_subset,
                    "validation": config.eval_subset,
                    "test": config.eval_subset},
      train_per_class=config.get("train_per_class", 0),
      train_subset_seed=(config.seed if config.get("resample_subset", False)
                         else None))


def _objective(config, terms: tuple[str, ...]) -> Objective:
  layers = tuple(config.loss.layers)
  return Objective(
      name=config.objective, terms=terms, layers=layers,
      gini_weights={k: float(config.loss.lambda_gini) * ("gini" in terms)
                    for k in layers},
      kl_weights={k: float(config.loss.lambda_kl) * ("kl" in terms)
                  for k in layers},
      baselines={t: config.baseline[t].to_dict() for t in terms
                 if t in config_lib.BASELINE_TERMS},
      start_epoch=float(config.loss.start_epoch))


def _validate(config, num_devices: int) -> tuple[str, ...]:
  """The checks that need the config alone; returns the objective's terms."""
  config_lib.check_values(config)
  # pylint: disable=g-import-not-at-top
  from discrim_jax import data as data_lib
  from discrim_jax import models
  # pylint: enable=g-import-not-at-top
  if not config.dataset:
    raise ConfigError(f"config.dataset is empty; use one of {list(data_lib.DATASETS)}, "
                      "a TFDS name or folder:/path (--config.dataset=...)")
  try:
    data_lib.parse_holdout(config.get("validation_holdout", ""))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model not in models.MODELS:
    raise ConfigError(f"unknown model {config.model!r}; known models: "
                      f"{sorted(models.MODELS)} (--config.model=...)")
  terms = config_lib.objective_terms(config.objective)
  _validate_baselines(config, terms)
  for field in _POSITIVE:
    if config[field] < 1:
      raise ConfigError(f"config.{field} must be >= 1, got {config[field]}")
  _validate_optimizer(config)
  unknown = set(_ynn_fusion_types(config)) - set(YNN_FUSION_TYPES)
  if unknown:
    raise ConfigError(
        f"config.xla_cpu_ynn_fusion={config.xla_cpu_ynn_fusion!r} names "
        f"{sorted(unknown)}; use a comma-separated subset of "
        f"{list(YNN_FUSION_TYPES)}, or '' for XLA's default")
  _validate_devices(config, num_devices)
  return terms


def _validate_baselines(config, terms: tuple[str, ...]) -> None:
  for term in terms:
    if term in config_lib.BASELINE_TERMS and config.baseline[term].weight <= 0:
      raise ConfigError(f"config.baseline.{term}.weight must be > 0 for "
                        f"objective {config.objective!r}, got "
                        f"{config.baseline[term].weight}")
  if "center" in terms and config.baseline.center.lr <= 0:
    raise ConfigError("config.baseline.center.lr must be > 0, got "
                      f"{config.baseline.center.lr}")


def _validate_optimizer(config) -> None:
  if config.optimizer.lr <= 0:
    raise ConfigError(f"config.optimizer.lr must be > 0, got {config.optimizer.lr}")
  if config.optimizer.name not in ("sgd", "adamw"):
    raise ConfigError(f"unknown optimizer {config.optimizer.name!r}; use 'sgd' "
                      "or 'adamw' (--config.optimizer.name=...)")
  if config.schedule.name not in ("step", "cosine", "constant"):
    raise ConfigError(f"unknown schedule {config.schedule.name!r}; use 'step', "
                      "'cosine' or 'constant' (--config.schedule.name=...)")


def _validate_devices(config, num_devices: int) -> None:
  if config.num_devices > num_devices:
    raise ConfigError(
        f"config.num_devices={config.num_devices} but only {num_devices} "
        "devices are visible; use -1 for all of them")
  n = config.num_devices if config.num_devices > 0 else num_devices
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
