r"""The offline default: real Fashion-MNIST (Debian's files), CPU-sized ResNet.

  python experiments/train.py --config=experiments/configs/fashion_mnist.py \
    --workdir=workdirs/fmnist_gini_kl --config.objective=gini_kl

A narrow ResNet-18 (width multiplier 1/4: 16-32-64-128 channels) with the
CIFAR stem on 28x28 grey images, SGD with the reference recipe's momentum and
weight decay and a cosine schedule, the losses on stage4 from epoch 1. The
``:smoke`` variant is a tiny model and a few steps (seconds, for tests/CI).
"""

from discrim_jax import config_lib as common


def get_config(arg=None):
  args = common.parse_arg(arg, model="resnet18", objective="gini_kl",
                          smoke=False)
  c = common.base_config()
  c.dataset = "fashion_mnist"
  c.objective = args.objective
  common.model_defaults(c, args.model, image_size=28)
  c.model_kwargs.width_multiplier = 0.25
  c.num_epochs = 3
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.optimizer.lr = 0.05
  c.schedule.name = "cosine"
  c.loss.start_epoch = 1
  c.log_every_steps = 100
  if args.smoke:
    c.model_kwargs.width_multiplier = 0.125
    c.num_epochs = 2
    c.batch_size = 64
    c.eval_batch_size = 500
    c.loss.start_epoch = 1
    c.log_every_steps = 5
    c.train_subset = 640  # 10 steps per epoch
    c.eval_subset = 1000
  return c
