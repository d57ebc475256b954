r"""Caltech-101 (102 TFDS labels incl. background), any model and objective.

  python experiments/train.py --workdir=workdirs/c101_r18_gini_kl \
    --config=experiments/configs/caltech101.py:model=resnet18,objective=gini_kl

Images are resized to image_size (224 by default, ImageNet stem for ResNets);
5 training images per class are held out for validation. Models: resnet17,
resnet18, resnet50, cvt13. Objectives: ce, gini, kl, gini_kl.
"""

from discrim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet18", objective="gini_kl",
                          image_size=224)
  c = config_lib.base_config()
  c.dataset = "caltech101"
  c.image_size = args.image_size
  c.objective = args.objective
  # About 2,550 training images: a smaller batch keeps the step count sane.
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 100
  c.schedule.boundaries_epochs = (30, 60, 80)
  c.loss.start_epoch = 5.0
  config_lib.model_defaults(c, args.model, image_size=args.image_size)
  return c
