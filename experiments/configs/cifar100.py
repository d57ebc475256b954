r"""CIFAR-100, the paper's recipe (SPEC section 2), any model and objective.

  python experiments/train.py --workdir=workdirs/c100_r50_gini_kl \
    --config=experiments/configs/cifar100.py:model=resnet50,objective=gini_kl

Models: resnet17, resnet18, resnet50, cvt13. Objectives: ce, gini, kl, gini_kl.
Needs the data (TFDS downloads it where there is internet, or
--config.data_dir=DIR holding a prepared copy).
"""

from discrim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet50", objective="gini_kl")
  c = config_lib.base_config()
  c.dataset = "cifar100"
  c.objective = args.objective
  config_lib.model_defaults(c, args.model, image_size=32)
  return c
