r"""100 printed characters from Debian's fonts (``make fonts``), unseen
typefaces at test: the offline many-class data set.

  make fonts
  python experiments/train.py --config=experiments/configs/fonts.py \
    --workdir=workdirs/fonts_gini_kl

The Fashion-MNIST default's CPU-sized model and recipe (a ResNet-18 at width
1/8, CIFAR stem; 3 epochs, lr 0.1 cosine, the losses from epoch 1) on the
32x32 grey glyphs, at the paper's batch of 200: a
batch holds about two images per class, as CIFAR-100's and Caltech-101's do
in the paper. 41,600 training images (104 typefaces x 4 drawings), 4,600
validation (23 other typefaces), 10,000 test (50 more).
"""

from discrim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet18", objective="gini_kl",
                              smoke=False)
  c = config_lib.base_config()
  c.dataset = "fonts"
  c.objective = args.objective
  config_lib.model_defaults(c, args.model, image_size=32)
  c.model_kwargs.width_multiplier = 0.125
  c.num_epochs = 3
  c.batch_size = 200
  c.eval_batch_size = 1000
  c.optimizer.lr = 0.1
  c.schedule.name = "cosine"
  c.loss.start_epoch = 1.0
  c.log_every_steps = 52
  if args.smoke:
    c.model_kwargs.stage_sizes = (1, 1, 1, 1)  # one block per stage
    c.num_epochs = 2
    c.batch_size = 100
    c.train_subset = 1000  # 10 steps per epoch
    c.eval_subset = 1000
    c.log_every_steps = 5
  return c
