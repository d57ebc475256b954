"""experiments/bench.py's convolution breakdown: the layers and the PyTorch mirror."""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench  # noqa: E402  pylint: disable=g-import-not-at-top

from discrim_jax import config_lib  # noqa: E402
from discrim_jax import train  # noqa: E402


@pytest.mark.parametrize("model,distinct,total", [("resnet18", 11, 20),
                                                  ("resnet50", 23, 53)])
def test_conv_layers_are_the_models_convolutions(model, distinct, total):
  config, layers = bench.conv_layers(model, batch=8)
  assert config.model == model
  assert len(layers) == distinct
  # ResNet-18: stem + 8 blocks x 2 + 3 projections; ResNet-50: stem + 16 x 3 + 4.
  assert sum(count for _, _, count in layers) == total
  stem, shape, count = layers[0]
  assert shape == (8, 32, 32, 3) and count == 1 and stem.features == 64


@pytest.mark.parametrize("conv", [
    nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False),
    nn.Conv(8, (1, 1), strides=2, use_bias=False),
    nn.Conv(8, (3, 3), padding=1, feature_group_count=4),
    nn.Conv(8, (7, 7), strides=4, padding=2),  # CvT-13's first embedding
    nn.Conv(8, (3, 3), padding="SAME"),
])
def test_jax_and_torch_ops_compute_the_same_gradients(conv):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 4 if conv.feature_group_count > 1 else 3),
                          np.float32)
  params = conv.init(jax.random.key(0), x)["params"]
  y = conv.apply({"params": params}, x)
  g = rng.standard_normal(y.shape, np.float32)
  options = train.compiler_options(config_lib.base_config(), "cpu")
  ours = bench._jax_conv_ops(conv, params, x, g, options)  # pylint: disable=protected-access
  theirs = bench._torch_conv_ops(conv, params, x, g, y)  # pylint: disable=protected-access
  np.testing.assert_allclose(ours["forward"](), y, rtol=1e-6)
  (tdx,) = theirs["input_grad"]()
  np.testing.assert_allclose(tdx.permute(0, 2, 3, 1).numpy(), ours["input_grad"](),
                             rtol=1e-4, atol=1e-5)
  dparams, tgrads = ours["weight_grad"](), theirs["weight_grad"]()
  assert len(tgrads) == len(dparams)
  np.testing.assert_allclose(tgrads[0].permute(2, 3, 1, 0).numpy(), dparams["kernel"],
                             rtol=1e-4, atol=1e-4)
  if "bias" in dparams:
    np.testing.assert_allclose(tgrads[1].numpy(), dparams["bias"], rtol=1e-4, atol=1e-4)


def test_torch_mirror_refuses_a_different_convolution():
  conv = nn.Conv(8, (3, 3), padding=1, use_bias=False)
  x = np.ones((1, 6, 6, 3), np.float32)
  params = conv.init(jax.random.key(0), x)["params"]
  y = conv.apply({"params": params}, x)
  with pytest.raises(ValueError, match="does not compute JAX's"):
    bench._torch_conv_ops(conv, params, x, np.ones_like(y), y + 1)  # pylint: disable=protected-access


def test_torch_mirror_refuses_uneven_padding():
  conv = nn.Conv(8, (2, 2), padding="SAME", use_bias=False)  # pads (0, 1)
  x = np.ones((1, 6, 6, 3), np.float32)
  params = conv.init(jax.random.key(0), x)["params"]
  y = conv.apply({"params": params}, x)
  with pytest.raises(ValueError, match="unevenly.*--notorch"):
    bench._torch_conv_ops(conv, params, x, np.ones_like(y), y)  # pylint: disable=protected-access
