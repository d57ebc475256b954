"""features.capture: the loss on an intermediate layer of a model that
returns logits only (written as flax examples' ResNet is), without editing it.

The model can also return that layer explicitly (``return_layer4``): both
paths run the same operations on the same inputs in one program each, so
values and gradients agree to float32 rounding of the model's own sums; the
model is tiny (sums over <= 3 x 3 x 16 = 144 terms per layer, 4 layers), so
relative rounding stays below ~1e3 * 2**-24 ~ 6e-5 in the worst case; 1e-4
bounds it on any CPU.
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discrim_jax import features as features_lib
from discrim_jax import losses

RTOL = 1e-4


class Block(nn.Module):
  filters: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    y = nn.relu(norm()(nn.Conv(self.filters, (3, 3))(x)))
    y = norm()(nn.Conv(self.filters, (3, 3))(y))
    if x.shape[-1] != self.filters:
      x = nn.Conv(self.filters, (1, 1), name="proj")(x)
    return nn.relu(x + y)


class LogitsOnlyResNet(nn.Module):
  """A tiny ResNet that returns logits, as flax examples' does."""
  num_classes: int = 4
  return_layer4: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(8, (3, 3), name="stem")(x)
    x = Block(8, name="layer1")(x, train)
    x = Block(16, name="layer4")(x, train)
    features = x
    logits = nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))
    return (logits, features) if self.return_layer4 else logits


def _setup():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 0, 1, 1, 2])
  variables = LogitsOnlyResNet().init(jax.random.key(0), images, train=False)
  return images, labels, variables


def _loss_via_capture(params, variables, images, labels):
  model = LogitsOnlyResNet()
  (logits, updates), feats = features_lib.capture(
      model.apply, dict(variables, params=params), images, layers=("layer4",),
      train=True, mutable=["batch_stats"])
  aux, _ = losses.discriminability_loss(feats, labels, 4,
                                        gini_weights={"layer4": 0.5},
                                        kl_weights={"layer4": 0.5})
  return jnp.mean(logits ** 2) + aux, updates


def _loss_explicit(params, variables, images, labels):
  model = LogitsOnlyResNet(return_layer4=True)
  (logits, layer4), updates = model.apply(
      dict(variables, params=params), images, train=True,
      mutable=["batch_stats"])
  aux, _ = losses.discriminability_loss({"layer4": layer4}, labels, 4,
                                        gini_weights={"layer4": 0.5},
                                        kl_weights={"layer4": 0.5})
  return jnp.mean(logits ** 2) + aux, updates


def test_loss_through_capture_equals_the_explicit_layer():
  images, labels, variables = _setup()
  grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))(
      variables["params"], variables, images, labels)
  (value, updates), grads = grad(_loss_via_capture)
  (want, want_updates), want_grads = grad(_loss_explicit)
  np.testing.assert_allclose(value, want, rtol=RTOL)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, expected, rtol=RTOL,
                               atol=RTOL * np.abs(expected).max())
  # The model's own mutable collections come back as apply returns them.
  assert set(updates) == {"batch_stats"} and set(want_updates) == {"batch_stats"}
  assert np.abs(np.asarray(jax.tree.leaves(grads)[0])).max() > 0


def test_capture_without_mutable_returns_the_outputs_alone():
  images, _, variables = _setup()
  logits, feats = features_lib.capture(
      LogitsOnlyResNet().apply, variables, images, layers=["layer1", "layer4/proj"],
      train=False)
  assert logits.shape == (8, 4)
  assert feats["layer1"].shape == (8, 8, 8, 8)
  assert feats["layer4/proj"].shape == (8, 8, 8, 16)
  np.testing.assert_array_equal(
      logits, LogitsOnlyResNet().apply(variables, images, train=False))


def test_unknown_layer_lists_the_paths():
  images, _, variables = _setup()
  with pytest.raises(ValueError, match=r"\['layer9'\] match no submodule.*"
                     r"available: \[.*'layer4', 'layer4/BatchNorm_0'"):
    features_lib.capture(LogitsOnlyResNet().apply, variables, images,
                         layers=("layer9",), train=False)
  with pytest.raises(TypeError, match="sequence of names"):
    features_lib.capture(LogitsOnlyResNet().apply, variables, images,
                         layers="layer4", train=False)
