r"""The offline default: real Fashion-MNIST (Debian's files), CPU-sized ResNet.

  python experiments/train.py --config=experiments/configs/fashion_mnist.py \
    --workdir=workdirs/fmnist_gini_kl --config.objective=gini_kl

CPU-sized so that one run takes about two minutes on 2 cores: a narrow
ResNet-18 (width multiplier 1/8: 8-16-32-64 channels, CIFAR stem) on the
28x28 grey images, 3 epochs over the first 20,000 of the 55,000 training
images (the 5,000 validation and 10,000 test images are all used), batch 256,
SGD with the reference recipe's momentum and weight decay and a cosine
schedule from lr 0.1; the losses act on stage4 from epoch 1 on (the reference
recipe also trains with CE alone first). The ``:smoke`` variant is a tiny
model (one block per stage) and a few steps (seconds, for tests and CI).
"""

from discrim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet18", objective="gini_kl",
                          smoke=False)
  c = config_lib.base_config()
  c.dataset = "fashion_mnist"
  c.objective = args.objective
  config_lib.model_defaults(c, args.model, image_size=28)
  c.model_kwargs.width_multiplier = 0.125
  c.train_subset = 20_000
  c.num_epochs = 3
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.optimizer.lr = 0.1
  c.schedule.name = "cosine"
  c.loss.start_epoch = 1.0
  c.log_every_steps = 26
  if args.smoke:
    c.model_kwargs.width_multiplier = 0.125
    c.model_kwargs.stage_sizes = (1, 1, 1, 1)  # one block per stage
    c.num_epochs = 2
    c.batch_size = 64
    c.eval_batch_size = 500
    c.loss.start_epoch = 1.0
    c.log_every_steps = 5
    c.train_subset = 640  # 10 steps per epoch
    c.eval_subset = 1000
  return c
