"""What a config may say and what it means (ml_collections, big_vision style).

Each config file's ``get_config(arg)`` takes an optional string of
``key=value`` pairs after the colon, e.g.
``--config=experiments/configs/cifar100.py:model=resnet50,objective=ce``;
every field can then be overridden with ``--config.FIELD=VALUE``.

This module holds the one list of objectives, the checks a config must pass
before anything is built (:func:`validate_config`), the fields that make a
run's identity (:data:`IDENTITY_FIELDS`) and the XLA options the config asks
for (:func:`compiler_options`).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

# The one list of objectives: name -> (Gini term on, KL term on).
OBJECTIVES = {
    "ce": (False, False),
    "gini": (True, False),
    "kl": (False, True),
    "gini_kl": (True, True),
}
OBJECTIVE_NAMES = {"ce": "CE", "gini": "CE+Gini", "kl": "CE+KL",
                   "gini_kl": "CE+Gini+KL"}

# The fields that change a run's results. A workdir resumes only under a
# config that agrees on all of them; every other field (logging and
# evaluation cadence, checkpoints kept, data folder, device count, XLA:CPU
# speed options, eval batch size) may change on a resume, and the change is
# logged.
IDENTITY_FIELDS = (
    "dataset", "image_size", "normalize", "validation_seed", "train_subset",
    "eval_subset", "model", "model_kwargs", "init_from", "objective", "loss",
    "num_epochs", "batch_size", "optimizer", "schedule", "seed")

# Library fusions XLA:CPU can hand to YNNPACK (config.xla_cpu_ynn_fusion).
YNN_FUSION_TYPES = ("dot", "reduce", "eltwise")


class ConfigError(ValueError):
  """A config value that cannot work; the message names it and the way out."""


def parse_arg(arg: str | None, **defaults):
  """Parses ``"a=1,b=x"`` into a ConfigDict of ``defaults`` updated by it."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      # A bare word is a flag: "smoke" -> smoke=True.
      key, value = item, "True"
    else:
      key, value = item.split("=", 1)
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out)}")
    kind = type(out[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has, with the reference recipe's values."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar100"
  c.data_dir = ""  # TFDS data folder; "" means TFDS's default
  c.image_size = 0  # Caltech-101 resize target; 0 means the data set's default
  c.normalize = False  # the reference recipe uses no mean/std normalisation
  c.validation_seed = 0
  c.train_subset = 0  # >0: train on the first N training examples only
  c.eval_subset = 0  # >0: evaluate on the first N validation/test examples

  c.model = "resnet18"
  c.model_kwargs = ml_collections.ConfigDict()
  # Start from pretrained weights: a torchvision/CvT PyTorch file or a folder
  # written by experiments/convert.py ("" = from scratch). Used only when the
  # workdir has no checkpoint yet; a head of another size is re-initialised.
  c.init_from = ""

  c.objective = "gini_kl"  # one of OBJECTIVES
  c.loss = ml_collections.ConfigDict()
  c.loss.layers = ("stage4",)  # the output of the last residual stage
  c.loss.lambda_gini = 0.5
  c.loss.lambda_kl = 0.5
  c.loss.start_epoch = 10.0  # auxiliary terms switched off before this epoch

  c.num_epochs = 250
  c.batch_size = 200
  c.eval_batch_size = 500
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
      b1=0.9, b2=0.999))
  c.schedule = ml_collections.ConfigDict(dict(
      name="step", boundaries_epochs=(60, 120, 160, 200), decay=0.2,
      warmup_epochs=0.0))

  c.seed = 0
  c.num_devices = -1  # -1: all devices
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.keep_checkpoints = 2
  # Also checkpoint every N steps between evaluations (0: at evaluations
  # only), for long epochs; SIGTERM/SIGINT always checkpoint the last step.
  c.checkpoint_every_steps = 0
  # The fusion kinds (of dot, reduce, eltwise) that XLA:CPU hands to the
  # YNNPACK library. "dot,reduce" keeps convolutions on XLA's own (Eigen)
  # kernels, which are faster here than XLA's default of handing them to
  # YNNPACK too: ResNet-18's train step runs about 2x faster on a 2-core
  # Xeon (experiments/bench.py measures it). "" keeps XLA's default. Ignored
  # on GPU/TPU. Speed only: not part of a run's identity.
  c.xla_cpu_ynn_fusion = "dot,reduce"
  # ResNets: store each ReLU output behind models.common.fusion_barrier, so
  # that XLA:CPU's weight-gradient transposes read it instead of recomputing
  # the BatchNorm/ReLU chain (ResNet-18's CPU train step: about 1.2x faster).
  # Same numbers; a no-op on GPU/TPU. Speed only, like xla_cpu_ynn_fusion.
  c.xla_cpu_fusion_barriers = True
  return c


def model_defaults(c: ml_collections.ConfigDict, model: str,
                   image_size: int) -> None:
  """Per-architecture recipe: stem, dropout, loss layer, optimiser."""
  c.model = model
  if model.startswith("resnet"):
    c.model_kwargs = ml_collections.ConfigDict(dict(
        stem="cifar" if image_size <= 64 else "imagenet",
        dropout=0.4 if model == "resnet50" else 0.0,
        dtype="float32", width_multiplier=1.0))
    c.loss.layers = ("stage4",)
  elif model == "cvt13":
    c.model_kwargs = ml_collections.ConfigDict(dict(
        dtype="float32", width_multiplier=1.0, dropout=0.0))
    c.loss.layers = ("stage3",)
    # Transformers train with AdamW + warm-up + cosine.
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 10.0
  else:
    from discrim_jax import models  # pylint: disable=g-import-not-at-top
    raise ValueError(f"unknown model {model!r}; use one of {sorted(models.MODELS)}")


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


def validate_config(config, num_devices: int) -> None:
  """Checks the values a run cannot work without; raises ConfigError.

  ``num_devices``: how many devices the run can see.
  """
  # pylint: disable=g-import-not-at-top
  from discrim_jax import data as data_lib
  from discrim_jax import models
  # pylint: enable=g-import-not-at-top
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
  if config.get("checkpoint_every_steps", 0) < 0:
    raise ConfigError("config.checkpoint_every_steps must be >= 0 (0: at "
                      f"evaluations only), got {config.checkpoint_every_steps}")
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


def identity(config) -> dict[str, Any]:
  """The fields of ``config`` (a ConfigDict or its JSON dict) that make a
  run's identity, as plain JSON values."""
  as_dict = (config if isinstance(config, dict)
             else json.loads(config.to_json_best_effort()))
  return {k: as_dict[k] for k in IDENTITY_FIELDS if k in as_dict}
