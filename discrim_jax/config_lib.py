"""What a config may say and what it means (ml_collections, big_vision style).

Each config file's ``get_config(arg)`` takes an optional string of
``key=value`` pairs after the colon, e.g.
``--config=experiments/configs/cifar100.py:model=resnet50,objective=ce``;
every field can then be overridden with ``--config.FIELD=VALUE``.

This module holds the fields and their defaults (:func:`base_config`), the
one list of objectives, the checks of single values (:func:`check_values`)
and the fields that make a run's identity (:data:`IDENTITY_FIELDS`).
``discrim_jax.run_spec`` resolves a whole config into what a run reads.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import copy
import json
import math
from typing import Any

import ml_collections

# The auxiliary terms an objective adds to cross-entropy: the paper's Gini
# and KL terms (config.loss) and the baselines of SPEC section 6
# (config.baseline).
TERMS = ("gini", "kl", "center", "opl", "supcon")
BASELINE_TERMS = ("center", "opl", "supcon")
TERM_NAMES = {"gini": "Gini", "kl": "KL", "center": "Center", "opl": "OPL",
              "supcon": "SupCon"}
# The one list of objectives: name -> the auxiliary terms it adds to CE. Names
# may be joined with "+" ("gini_kl+center": CE + Gini + KL + center loss).
OBJECTIVES = {
    "ce": (),
    "gini": ("gini",),
    "kl": ("kl",),
    "gini_kl": ("gini", "kl"),
    "center": ("center",),
    "opl": ("opl",),
    "supcon": ("supcon",),
}
# The objectives a comparison trains by default: CE, the paper's loss and
# each baseline (the Gini and KL terms alone are ablations, asked for by name).
COMPARED_OBJECTIVES = tuple(o for o in OBJECTIVES if o not in ("gini", "kl"))


def objective_terms(objective: str) -> tuple[str, ...]:
  """The auxiliary terms of an objective name, in :data:`TERMS` order;
  raises ConfigError for an unknown name."""
  parts = objective.split("+")
  unknown = [p for p in parts if p not in OBJECTIVES]
  if unknown:
    raise ConfigError(
        f"unknown objective {objective!r}; use one of {list(OBJECTIVES)} or "
        "several joined by '+', e.g. gini_kl+center (--config.objective=...)")
  used = {t for p in parts for t in OBJECTIVES[p]}
  return tuple(t for t in TERMS if t in used)


def objective_name(objective: str) -> str:
  """How tables name an objective: "ce" -> "CE", "gini_kl" -> "CE+Gini+KL"."""
  try:
    terms = objective_terms(objective)
  except ConfigError:
    return objective
  return "+".join(["CE"] + [TERM_NAMES[t] for t in terms])


# The fields that change a run's results. A workdir resumes only under a
# config that agrees on all of them; every other field (logging and
# evaluation cadence, checkpoints kept, data folder, device count, XLA:CPU
# speed options, eval batch size) may change on a resume, and the change is
# logged.
IDENTITY_FIELDS = (
    "dataset", "splits", "validation_holdout", "data_in_memory",
    "image_size", "normalize", "validation_seed", "train_subset",
    "train_per_class", "resample_subset",
    "eval_subset", "model", "model_kwargs", "init_from", "objective", "loss",
    "num_epochs", "batch_size", "optimizer", "schedule", "seed")
# ... and, for the baseline terms an objective uses, their settings
# (config.baseline.<term>): see identity(). Identity fields added after runs
# were first recorded, with the value those runs had:
_ADDED_IDENTITY_FIELDS = {
    "splits": {"train": "", "validation": "", "test": ""},
    "validation_holdout": "", "data_in_memory": True, "train_per_class": 0,
    "resample_subset": False}

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
  # One of data.DATASETS, any TFDS catalogue name (cifar10, imagenette,
  # imagenet2012, ...) or folder:/path/to/root (root/train/<class>/*.jpg).
  c.dataset = "cifar100"
  c.data_dir = ""  # TFDS data folder; "" means TFDS's default
  # TFDS splits ("" = automatic: train; the data set's validation split or a
  # part of train held out; test, or validation where there is no test).
  c.splits = ml_collections.ConfigDict(dict(train="", validation="", test=""))
  # Held out of train for validation when there is no validation split:
  # "5000" images, "0.1" of train, "5/class"; "" = the data set's default.
  c.validation_holdout = ""
  # False: stream from the prepared ArrayRecord files (grain) instead of
  # reading the splits into host memory; for data sets larger than memory.
  c.data_in_memory = True
  c.download = True  # False: never touch the network; fail if not prepared
  # Square image side; 0 means the data set's own (224 for images of varying
  # size, a folder's first image's shorter side).
  c.image_size = 0
  c.normalize = False  # the reference recipe uses no mean/std normalisation
  c.validation_seed = 0
  c.train_subset = 0  # >0: train on the first N training examples only
  c.train_per_class = 0  # >0: on the first N training examples of each class
  # With train_per_class: each seed draws its own N examples of each class
  # (CE and every objective share the draw of a seed, as they share its
  # initialisation and data order) instead of all taking the first N.
  c.resample_subset = False
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
  c.loss.start_epoch = 10.0  # every auxiliary term is off before this epoch
  # The baseline terms (SPEC section 6), used by objectives center, opl and
  # supcon (alone or joined with others by "+"), each on one feature layer.
  c.baseline = ml_collections.ConfigDict(dict(
      # Wen et al.: centres trained by SGD at their own learning rate, on the
      # gradient of the unweighted loss (as KaiyangZhou/pytorch-center-loss).
      center=dict(weight=0.003, layer="pre_logits", lr=0.5),
      # Ranasinghe et al. (kahnchana/opl).
      opl=dict(weight=1.0, layer="pre_logits", gamma=0.5),
      # Khosla et al., one view per image, on a 2-layer MLP projection head
      # (head_dim outputs) that only training uses. The weight has no
      # reference value for an auxiliary term: 1.0, as OPL's.
      supcon=dict(weight=1.0, layer="pre_logits", temperature=0.1,
                  head_dim=128)))
  # Representation metrics (SPEC section 7) at the end of a run: kNN and
  # linear-probe accuracy and NC1 on pre_logits and the loss layers.
  c.representation = ml_collections.ConfigDict(dict(
      enabled=True,
      # The first N training examples' features form the kNN bank and the
      # probe's training set (0: the whole training split). 10,000 keeps the
      # metrics under 10% of the default Fashion-MNIST run's time.
      max_train_examples=10_000))

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


def with_fields(config, **fields):
  """A copy of ``config`` with dotted fields set: ``with_fields(c,
  **{"loss.lambda_kl": 1.0, "batch_size": 64})``."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in fields.items():
      target = config
      *path, leaf = key.split(".")
      for p in path:
        target = target[p]
      target[leaf] = value
  return config


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


def _leaves(d, prefix: str = ""):
  """``(dotted path, value)`` of every leaf of a config dict."""
  for key, value in d.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def field_names(config) -> list[str]:
  """Every dotted field a config has (what ``--config.FIELD=`` may set)."""
  return [path for path, _ in _leaves(config)]


# Fields that count or weigh something: >= 0 (0 is each one's "off" or "all").
NON_NEGATIVE = (
    "train_subset", "train_per_class", "eval_subset", "validation_seed", "seed",
    "loss.lambda_gini", "loss.lambda_kl", "loss.start_epoch",
    "optimizer.weight_decay", "optimizer.momentum", "schedule.warmup_epochs",
    "representation.max_train_examples", "checkpoint_every_steps")


def check_values(config) -> None:
  """Every number finite, every count and weight >= 0; ConfigError naming
  the field otherwise. Needs nothing but the config."""
  for path, value in _leaves(config):
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"config.{path} is {v}; it must be a finite number "
                          f"(--config.{path}=...)")
  as_dict = dict(_leaves(config))
  for path in NON_NEGATIVE:
    if path in as_dict and as_dict[path] < 0:
      raise ConfigError(f"config.{path} must be >= 0 (0: "
                        f"{'off' if '.' in path else 'the default'}), got "
                        f"{as_dict[path]} (--config.{path}=...)")


def identity(config) -> dict[str, Any]:
  """The fields of ``config`` (a ConfigDict or its JSON dict) that make a
  run's identity, as plain JSON values: :data:`IDENTITY_FIELDS` and the
  settings of the baseline terms its objective uses (a run without them has
  none, so configs written before they existed keep their identity)."""
  as_dict = (config if isinstance(config, dict)
             else json.loads(config.to_json_best_effort()))
  out = {k: as_dict.get(k, _ADDED_IDENTITY_FIELDS.get(k))
         for k in IDENTITY_FIELDS if k in as_dict or k in _ADDED_IDENTITY_FIELDS}
  used = [t for t in objective_terms(as_dict["objective"])
          if t in BASELINE_TERMS]
  if used:
    out["baseline"] = {t: as_dict["baseline"][t] for t in used}
  return out
