"""ResNets (He et al. 2016) as Flax linen modules returning (logits, features).

Layouts (blocks per stage, base widths 64-128-256-512):

* ``resnet18``: basic blocks [2, 2, 2, 2], one stem convolution.
* ``resnet50``: bottleneck blocks [3, 4, 6, 3] with expansion 4; the stride
  sits on the 3x3 convolution (torchvision's "v1.5").
* ``resnet17``: the paper names ResNet-17 but defines it nowhere public. Ours
  has 17 weighted layers counted the ResNet way (main-path convolutions plus
  the classifier, projection shortcuts not counted): a stem of two
  convolutions, basic blocks [2, 2, 2, 1] (14 convolutions) and the
  classifier, i.e. ResNet-18 with the second 512-wide block dropped and one
  more stem convolution; about 60% of ResNet-18's parameters.

Stems: ``cifar`` is a 3x3 stride-1 convolution and no max-pool (for 32x32
inputs); ``imagenet`` is a 7x7 stride-2 convolution and a 3x3 stride-2
max-pool. ResNet-17's second stem convolution is 3x3 stride 1 in both.

Convolutions have no bias; each is followed by BatchNorm (momentum 0.9, eps
1e-5, i.e. PyTorch's defaults). Projection shortcuts (1x1 convolution + BN)
are used where the shape changes.

Every ReLU output (the input of the next convolution, or of the pooling after
the last block) passes through ``common.fusion_barrier``: the same numbers,
but XLA:CPU no longer recomputes the BatchNorm/ReLU/residual chain inside the
weight-gradient transposes (a no-op on GPU and TPU; switched off with
``common.fusion_barriers(False)``).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from discrim_jax.models.common import check_images
from discrim_jax.models.common import fusion_barrier

Dtype = Any

# He-normal in fan-out mode, as torchvision initialises its ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_and_norm(dtype, train: bool):
  """Bias-free convolution and BatchNorm (PyTorch's momentum and eps)."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           kernel_init=_conv_init)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


def _relu(x):
  return fusion_barrier(nn.relu(x))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or projection shortcut."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv, norm = _conv_and_norm(self.dtype, train)
    y = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = _relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=1, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), self.strides, name="proj_conv")(x)
      x = norm(name="proj_bn")(x)
    return _relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with a shortcut."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv, norm = _conv_and_norm(self.dtype, train)
    out = self.features * self.expansion
    y = conv(self.features, (1, 1), name="conv1")(x)
    y = _relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = _relu(norm(name="bn2")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    y = norm(name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, (1, 1), self.strides, name="proj_conv")(x)
      x = norm(name="proj_bn")(x)
    return _relu(x + y)


class ResNet(nn.Module):
  """A ResNet returning ``(logits, features)``.

  ``features`` holds ``stem`` (after the stem, including any max-pool),
  ``stage1``..``stage4`` (each stage's output, NHWC) and ``pre_logits``
  (global average pool, ``(B, C)``). Dropout with rate ``dropout`` is applied
  to ``pre_logits`` before the classifier in train mode (rng ``dropout``).
  """
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int
  stem: str = "cifar"
  stem_convs: int = 1
  width_multiplier: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    check_images(images)
    if self.stem not in ("cifar", "imagenet"):
      raise ValueError(
          f"unknown stem {self.stem!r}; use 'cifar' (3x3 stride 1, no "
          "max-pool) or 'imagenet' (7x7 stride 2 + max-pool)")
    width = max(1, round(64 * self.width_multiplier))
    conv, norm = _conv_and_norm(self.dtype, train)
    features = {}
    x = images.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(width, (7, 7), 2, padding=3, name="stem_conv")(x)
    else:
      x = conv(width, (3, 3), 1, padding=1, name="stem_conv")(x)
    x = _relu(norm(name="stem_bn")(x))
    for i in range(1, self.stem_convs):
      x = conv(width, (3, 3), 1, padding=1, name=f"stem_conv{i + 1}")(x)
      x = _relu(norm(name=f"stem_bn{i + 1}")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features["stem"] = x
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(width * 2**i, strides=strides, dtype=self.dtype,
                       name=f"stage{i + 1}_block{j + 1}")(x, train=train)
      features[f"stage{i + 1}"] = x
    x = jnp.mean(x, axis=(1, 2))
    features["pre_logits"] = x
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    # float32 logits, or float64 in a float64 model (exactness tests).
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), features


ResNet17 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 1),
                             block=BasicBlock, stem_convs=2)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                             block=BottleneckBlock)
