"""CvT-13 (Wu et al. 2021, "CvT: Introducing Convolutions to Vision Transformers").

The official configuration: three stages with embedding dims 64/192/384, depths
1/2/10 and heads 1/3/6, MLP ratio 4. Each stage starts with a convolutional
token embedding (kernels 7/3/3, strides 4/2/2, padding 2/1/1; a convolution
with bias, then LayerNorm) and has no position embedding. Inside attention,
queries, keys and values come from a depthwise 3x3 convolution (no bias) ->
BatchNorm -> flatten -> linear (with bias); the query projection has stride 1,
keys and values stride 2. As in the official code, the attention logits are
scaled by ``dim ** -0.5`` of the full stage width, not the per-head width.
Blocks are pre-norm with drop-path (rates 0/0/0.1, linear in depth within a
stage) and QuickGELU ``x * sigmoid(1.702 x)``; LayerNorm eps is 1e-5. Stage 3
prepends a class token, which bypasses the depthwise convolutions; the head is
LayerNorm on the class token then a linear classifier. Linear layers use a
truncated-normal(0.02) init.

At 32x32 input the token grids are 8x8, 4x4 and 2x2.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from discrim_jax.models.common import check_images

Dtype = Any

_dense_init = nn.initializers.truncated_normal(stddev=0.02)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,  # the official CvT code
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # HF transformers
}


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (rng 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class ConvProjection(nn.Module):
  """Depthwise 3x3 convolution (no bias) -> BatchNorm -> flattened tokens."""
  strides: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid, *, train: bool):
    dim = grid.shape[-1]
    x = nn.Conv(dim, (3, 3), self.strides, padding=1, feature_group_count=dim,
                use_bias=False, dtype=self.dtype, name="conv")(grid)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    return x.reshape(x.shape[0], -1, dim)


class ConvAttention(nn.Module):
  """Multi-head attention with convolutional q/k/v projections."""
  num_heads: int
  with_cls_token: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw: tuple[int, int], *, train: bool):
    b, _, dim = x.shape
    h, w = hw
    if self.with_cls_token:
      cls, tokens = x[:, :1], x[:, 1:]
    else:
      tokens = x
    grid = tokens.reshape(b, h, w, dim)
    dense = functools.partial(nn.Dense, dim, dtype=self.dtype,
                              kernel_init=_dense_init)
    qkv = []
    for name, strides in (("q", 1), ("k", 2), ("v", 2)):
      t = ConvProjection(strides, dtype=self.dtype, name=f"conv_proj_{name}")(
          grid, train=train)
      if self.with_cls_token:
        t = jnp.concatenate([cls.astype(t.dtype), t], axis=1)
      t = dense(name=f"proj_{name}")(t)
      qkv.append(t.reshape(b, t.shape[1], self.num_heads, dim // self.num_heads))
    q, k, v = qkv
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * dim**-0.5
    # Softmax in float32 at least (bf16 logits), float64 in a float64 model.
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    attn = jax.nn.softmax(logits.astype(wide), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, -1, dim)
    return dense(name="proj")(out)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""
  num_heads: int
  mlp_ratio: float
  drop_path: float
  with_cls_token: bool
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, hw, *, train: bool):
    dim = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_dense_init)
    drop = DropPath(self.drop_path)
    y = ConvAttention(self.num_heads, self.with_cls_token, dtype=self.dtype,
                      name="attn")(norm(name="norm1")(x), hw, train=train)
    x = x + drop(y, deterministic=not train)
    y = norm(name="norm2")(x)
    y = dense(int(dim * self.mlp_ratio), name="mlp_fc1")(y)
    y = dense(dim, name="mlp_fc2")(ACTIVATIONS[self.activation](y))
    return x + drop(y, deterministic=not train)


class CvT(nn.Module):
  """A Convolutional vision Transformer returning ``(logits, features)``.

  ``features`` holds ``stage1``..``stage3`` (each stage's tokens as NHWC maps,
  the class token excluded) and ``pre_logits`` (the class token after the final
  LayerNorm, ``(B, dims[-1])``).
  """
  num_classes: int
  dims: Sequence[int] = (64, 192, 384)
  depths: Sequence[int] = (1, 2, 10)
  heads: Sequence[int] = (1, 3, 6)
  patch_sizes: Sequence[int] = (7, 3, 3)
  patch_strides: Sequence[int] = (4, 2, 2)
  patch_paddings: Sequence[int] = (2, 1, 1)
  drop_path_rates: Sequence[float] = (0.0, 0.0, 0.1)
  mlp_ratio: float = 4.0
  # "quick_gelu" as in the official code; "gelu" matches Hugging Face's port.
  activation: str = "quick_gelu"
  width_multiplier: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    check_images(images)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; use one of "
                       f"{sorted(ACTIVATIONS)}")
    features = {}
    x = images.astype(self.dtype)
    num_stages = len(self.dims)
    cls = None
    for s in range(num_stages):
      dim = max(self.heads[s], round(self.dims[s] * self.width_multiplier))
      dim -= dim % self.heads[s]
      last = s == num_stages - 1
      k, st, p = self.patch_sizes[s], self.patch_strides[s], self.patch_paddings[s]
      x = nn.Conv(dim, (k, k), st, padding=p, dtype=self.dtype,
                  name=f"stage{s + 1}_embed_conv")(x)
      b, h, w, _ = x.shape
      x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                       name=f"stage{s + 1}_embed_norm")(x.reshape(b, h * w, dim))
      if last:
        cls_token = self.param("cls_token", _dense_init, (1, 1, dim), jnp.float32)
        x = jnp.concatenate(
            [jnp.broadcast_to(cls_token, (b, 1, dim)).astype(x.dtype), x], axis=1)
      rates = np.linspace(0.0, self.drop_path_rates[s], self.depths[s])
      for j in range(self.depths[s]):
        x = Block(self.heads[s], self.mlp_ratio, float(rates[j]),
                  with_cls_token=last, activation=self.activation,
                  dtype=self.dtype,
                  name=f"stage{s + 1}_block{j + 1}")(x, (h, w), train=train)
      if last:
        cls, x = x[:, 0], x[:, 1:]
      x = x.reshape(b, h, w, dim)
      features[f"stage{s + 1}"] = x
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(cls)
    features["pre_logits"] = x
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_dense_init,
                      name="head")(x)
    # float32 logits, or float64 in a float64 model (exactness tests).
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), features


CvT13 = CvT
