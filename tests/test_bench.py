"""The benchmarks' shared pieces: the app's step, timing, the convolution
breakdown and the PyTorch mirror.

JAX vs PyTorch tolerances: the two frameworks must compute the same
convolution; their kernels sum in different orders. In float64 that leaves
~1e-16 relative differences, so 1e-10 shows the same mathematics. In float32
the gradients are sums over up to 2 x 16 x 16 = 512 positions x 9 taps x 4
channels ~ 2e4 products: worst-case relative rounding 2e4 * 2**-24 ~ 1e-3.
"""

import json

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


def test_round_rates_and_ratios_keep_each_rounds_figure():
  durations = iter([0.5, 0.5, 1.0, 1.0,   # round 1: a twice, then b twice
                    1.0, 1.0, 1.0, 1.0])  # round 2: the machine slowed a
  fns = {"a": lambda: next(durations), "b": lambda: next(durations)}
  timing = benchmarking.Timing(warmup=0, rounds=2, steps_per_round=2)
  rates = benchmarking.interleaved_round_rates(fns, 10, timing)
  assert rates == {"a": [20.0, 10.0], "b": [10.0, 10.0]}
  ratio = benchmarking.round_ratios(rates["a"], rates["b"])
  assert ratio == {"min": 1.0, "median": 1.5, "max": 2.0, "rounds": 2}


@pytest.mark.parametrize("low,high,target,at_most,expected", [
    (1.1, 1.3, 1.0, False, "met"),
    (0.7, 0.9, 1.0, False, "NOT met"),
    (0.8, 1.6, 1.0, False, "inconclusive: machine noisy"),
    (-0.05, 0.01, 0.02, True, "met"),
    (-0.03, 0.21, 0.02, True, "inconclusive: machine noisy"),
    (0.05, 0.21, 0.02, True, "NOT met"),
])
def test_a_target_is_called_only_when_every_round_agrees(low, high, target,
                                                        at_most, expected):
  figure = {"min": low, "median": (low + high) / 2, "max": high, "rounds": 5}
  assert benchmarking.verdict(figure, target, at_most=at_most) == expected


def test_bench_prints_targets_with_their_spread():
  from experiments import bench  # pylint: disable=g-import-not-at-top
  results = {"models": {"resnet18": {"loss_overhead_spread": {
      "min": -0.034, "median": 0.05, "max": 0.21, "rounds": 5}}},
             "jax_over_torch_resnet18_spread": {
                 "min": 0.8, "median": 0.82, "max": 0.85, "rounds": 5}}
  lines = bench.target_lines(results)
  assert lines[0].endswith("+5.0% (min -3.4%, max +21.0% over 5 rounds): "
                           "inconclusive: machine noisy")
  assert lines[1].endswith("0.82 (min 0.80, max 0.85 over 5 rounds): NOT met")


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


def test_gpu_check_runs_at_its_tiny_size(tmp_path):
  """experiments/gpu_check.py, the script a lent GPU runs, end to end on this
  CPU at its tiny size: every part measured and written to its JSON."""
  from experiments import gpu_check  # pylint: disable=g-import-not-at-top
  out = tmp_path / "gpu_check.json"
  record = gpu_check.run(tiny=True, out=str(out), peak_tflops=1.0)
  assert json.loads(out.read_text()) == json.loads(json.dumps(record))
  r = record["resnet50"]
  assert r["ce_gini_kl"]["images_per_s"] > 0 and r["ce_only"]["images_per_s"] > 0
  assert 0 < r["ce_gini_kl"]["mfu"] < 1 and r["ce_gini_kl"]["gflop_per_step"] > 0
  assert len(r["ce_gini_kl"]["images_per_s_rounds"]) == 2
  # A 2-core CPU is nowhere near the GPU target: every round says so.
  assert r["target"]["verdict"] == "NOT met"
  assert record["cvt13"]["compile_s"] > 0 and record["cvt13"]["images_per_s"] > 0
