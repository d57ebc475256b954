"""Shared pieces of the experiment configs (ml_collections, big_vision style).

Each config file's ``get_config(arg)`` takes an optional string of
``key=value`` pairs after the colon, e.g.
``--config=experiments/configs/cifar100.py:model=resnet50,objective=ce``;
every field can then be overridden with ``--config.FIELD=VALUE``.
"""

from __future__ import annotations

import ml_collections

OBJECTIVES = ("ce", "gini", "kl", "gini_kl")


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

  c.objective = "gini_kl"  # one of ce, gini, kl, gini_kl
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
    raise ValueError(f"unknown model {model!r}; use resnet17, resnet18, "
                     "resnet50 or cvt13")
