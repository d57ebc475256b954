r"""Your own data: any TFDS data set, an image folder, or a streamed data set.

  # a TFDS catalogue name (classes, image shape and splits from its builder)
  python experiments/train.py --workdir=workdirs/cifar10 \
    --config=experiments/configs/custom.py:dataset=cifar10
  # a folder: ROOT/train/<class>/*.jpg (+ optional validation/, test/)
  python experiments/train.py --workdir=workdirs/mine \
    --config=experiments/configs/custom.py:dataset=folder:/data/mine,image_size=64
  # larger than memory: stream the prepared ArrayRecord files with grain
  python experiments/train.py --workdir=workdirs/in1k \
    --config=experiments/configs/custom.py:dataset=imagenet2012,image_size=224,epochs=90 \
    --config.data_in_memory=False --config.data_dir=/data/tfds_array_record

Arguments (after the colon): dataset, image_size (0: the data set's own;
224 for images of varying size; a folder's first image's size), model
(resnet17/18/50, cvt13), width (ResNet width multiplier), objective, epochs,
batch. The recipe: SGD with momentum 0.9 and weight decay 5e-4, cosine from lr
0.1 (AdamW for CvT), the losses from 10% of the epochs on; a CIFAR stem up to
64-pixel images, ImageNet's above. Every field can be overridden with
--config.FIELD=VALUE (e.g. --config.validation_holdout=5/class,
--config.splits.test='train[90%:]').
"""

from discrim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dataset="cifar10", image_size=0,
                          model="resnet18", width=1.0, objective="gini_kl",
                          epochs=30, batch=128)
  c = config_lib.base_config()
  c.dataset = args.dataset
  c.image_size = args.image_size
  c.objective = args.objective
  # The stem follows the image size (unknown until read when 0: CIFAR's).
  config_lib.model_defaults(c, args.model, image_size=args.image_size or 32)
  c.model_kwargs.width_multiplier = args.width
  c.num_epochs = args.epochs
  c.batch_size = args.batch
  c.eval_batch_size = 2 * args.batch
  if args.model != "cvt13":
    c.schedule.name = "cosine"
  c.loss.start_epoch = 0.1 * args.epochs
  return c
