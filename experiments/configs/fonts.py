r"""100 printed characters from Debian's fonts (``make fonts``), unseen
typefaces at test: the offline many-class data set.

  make fonts
  python experiments/train.py --config=experiments/configs/fonts.py \
    --workdir=workdirs/fonts_gini_kl

The Fashion-MNIST default's CPU-sized model and recipe (a ResNet-18 at width
1/8, CIFAR stem) on the 32x32 grey glyphs, at the paper's batch of 200: a
batch holds about two images per class, as CIFAR-100's and Caltech-101's do
in the paper. 41,600 training images (104 typefaces x 4 drawings), 4,600
validation (23 other typefaces), 10,000 test (50 more).
"""

from discrim_jax import config_lib
from experiments.configs import fashion_mnist


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet18", objective="gini_kl",
                              smoke=False)
  c = fashion_mnist.get_config(arg)
  c.dataset = "fonts"
  config_lib.model_defaults(c, c.model, image_size=32)
  c.model_kwargs.width_multiplier = 0.125
  if not args.smoke:
    c.batch_size = 200
    c.train_subset = 0
  return c
