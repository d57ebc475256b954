"""The benchmarks' shared pieces: the app's step, timing, the convolution
breakdown and the PyTorch mirror.

JAX vs PyTorch tolerances: the two frameworks must compute the same
convolution; their kernels sum in different orders. In float64 that leaves
~1e-16 relative differences, so 1e-10 shows the same mathematics. In float32
the gradients are sums over up to 2 x 16 x 16 = 512 positions x 9 taps x 4
channels ~ 2e4 products: worst-case relative rounding 2e4 * 2**-24 ~ 1e-3.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from discrim_jax import benchmarking
from discrim_jax import config_lib
from discrim_jax import runtime
from discrim_jax import run_spec
from discrim_jax import torch_reference

FLOAT32_RTOL = 2e4 * 2.0**-24


@pytest.mark.parametrize("model,distinct,total", [("resnet18", 11, 20),
                                                  ("resnet50", 23, 53)])
def test_conv_layers_are_the_models_convolutions(model, distinct, total):
  config, layers = benchmarking.conv_layers(model, batch=8)
  assert config.model == model
  assert len(layers) == distinct
  # ResNet-18: stem + 8 blocks x 2 + 3 projections; ResNet-50: stem + 16 x 3 + 4.
  assert sum(count for _, _, count in layers) == total
  stem, shape, count = layers[0]
  assert shape == (8, 32, 32, 3) and count == 1 and stem.features == 64


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("conv", [
    nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False),
    nn.Conv(8, (1, 1), strides=2, use_bias=False),
    nn.Conv(8, (3, 3), padding=1, feature_group_count=4),
    nn.Conv(8, (7, 7), strides=4, padding=2),  # CvT-13's first embedding
    nn.Conv(8, (3, 3), padding="SAME"),
])
def test_jax_and_torch_ops_compute_the_same_gradients(conv, x64):
  dtype, rtol = (np.float64, 1e-10) if x64 else (np.float32, FLOAT32_RTOL)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 4 if conv.feature_group_count > 1 else 3))
  x = x.astype(dtype)
  options = run_spec.compiler_options(config_lib.base_config(), "cpu")
  with jax.enable_x64(x64):
    conv = conv.clone(dtype=dtype, param_dtype=dtype)
    params = conv.init(jax.random.key(0), x)["params"]
    y = conv.apply({"params": params}, x)
    g = rng.standard_normal(y.shape).astype(dtype)
    ours = benchmarking.jax_conv_ops(conv, params, x, g, options)
    theirs = torch_reference.conv_ops(conv, params, x, g, y)
    assert ours["forward"]().dtype == dtype
    np.testing.assert_allclose(ours["forward"](), y, rtol=rtol, atol=rtol)
    (tdx,) = theirs["input_grad"]()
    assert tdx.dtype == getattr(torch, np.dtype(dtype).name)
    np.testing.assert_allclose(tdx.permute(0, 2, 3, 1).numpy(), ours["input_grad"](),
                               rtol=rtol, atol=rtol)
    dparams, tgrads = ours["weight_grad"](), theirs["weight_grad"]()
  assert len(tgrads) == len(dparams)
  # Weight gradients sum over the batch and every position: scale the
  # absolute bound by the gradient's size.
  scale = np.abs(dparams["kernel"]).max()
  np.testing.assert_allclose(tgrads[0].permute(2, 3, 1, 0).numpy(), dparams["kernel"],
                             rtol=rtol, atol=rtol * scale)
  if "bias" in dparams:
    np.testing.assert_allclose(tgrads[1].numpy(), dparams["bias"], rtol=rtol,
                               atol=rtol * np.abs(dparams["bias"]).max())


def test_timing_alternates_and_takes_own_durations():
  order = []
  fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b") or 0.25}
  times = benchmarking.interleaved_times(
      fns, benchmarking.Timing(warmup=1, rounds=2, steps_per_round=1))
  assert order == ["a", "b", "a", "b", "a", "b"]
  assert times["b"] == [0.25, 0.25] and all(0 <= t < 0.25 for t in times["a"])


def test_benchmark_times_the_apps_own_step():
  program = benchmarking.app_program("resnet18", 8, "float32", True,
                                     num_devices=1)
  assert isinstance(program, runtime.Program)
  # The step a run trains with: the config's loss layer and XLA options.
  assert program.spec.config.loss.layers == ("stage4",)
  assert program.spec.config.xla_cpu_fusion_barriers is True
  stacked = benchmarking.app_batch(program, seeds=2)
  assert stacked["image"].shape == (2, 8, 32, 32, 3)


def test_torch_mirror_refuses_a_different_convolution():
  conv = nn.Conv(8, (3, 3), padding=1, use_bias=False)
  x = np.ones((1, 6, 6, 3), np.float32)
  params = conv.init(jax.random.key(0), x)["params"]
  y = conv.apply({"params": params}, x)
  with pytest.raises(ValueError, match="does not compute JAX's"):
    torch_reference.conv_ops(conv, params, x, np.ones_like(y), y + 1)


def test_torch_mirror_refuses_uneven_padding():
  conv = nn.Conv(8, (2, 2), padding="SAME", use_bias=False)  # pads (0, 1)
  x = np.ones((1, 6, 6, 3), np.float32)
  params = conv.init(jax.random.key(0), x)["params"]
  y = conv.apply({"params": params}, x)
  with pytest.raises(ValueError, match="unevenly.*--notorch"):
    torch_reference.conv_ops(conv, params, x, np.ones_like(y), y)
