r"""Converts a PyTorch checkpoint into our Flax variables, saved with orbax.

  python experiments/convert.py --model=resnet50 --checkpoint=resnet50.pth \
      --out=pretrained/resnet50_imagenet [--num_classes=1000]

Sources: torchvision ResNet-18/50 state dicts, Microsoft's CvT-13 ``.pth`` or
the Hugging Face CvT ``.safetensors``/``.bin``. Nothing is downloaded. Train
from the result with ``--config.init_from=pretrained/resnet50_imagenet``.
"""

import os

from absl import app
from absl import flags

from discrim_jax import cli
from discrim_jax.cli import parse_flags, run_with_one_line_errors

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_MODEL = flags.DEFINE_enum("model", None, ["resnet18", "resnet50", "cvt13"], "Model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The PyTorch file.")
_OUT = flags.DEFINE_string("out", None, "Folder to write (must not exist).")
_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes of the checkpoint's head.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input size used to build the model.")
flags.mark_flags_as_required(["model", "checkpoint", "out"])


def convert():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from discrim_jax import models, pretrained  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(_OUT.value)
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; choose a new --out (nothing is overwritten)")
  overrides = {"stem": "imagenet"} if _MODEL.value.startswith("resnet") else {}
  model = models.create_model(_MODEL.value, num_classes=_CLASSES.value, **overrides)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, _SIZE.value, _SIZE.value, 3)), train=False))
  variables = pretrained.load_pretrained(_CHECKPOINT.value, _MODEL.value, abstract)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out, variables)
  checkpointer.wait_until_finished()
  return out


def main(argv):
  del argv
  if run_with_one_line_errors(
      lambda: cli.dry_run(f"convert {_CHECKPOINT.value} into {_OUT.value}")):
    return
  print(f"wrote {run_with_one_line_errors(convert)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
