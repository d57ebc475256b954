"""Pretrained import: same weights, same logits as the PyTorch reference models.

The checkpoints are made here from randomly initialised reference models
(torchvision's ResNets, Hugging Face's CvT), with random BatchNorm statistics
so that those are checked too; nothing is downloaded.

Tolerances: the two frameworks compute the same network with kernels that sum
in different orders. In float64 (``jax.enable_x64``, the PyTorch model in
double) that leaves ~1e-16 relative per operation, and 1e-9 on the logits
shows the same mathematics through ~50 layers. In float32 the logits (O(1),
see ``_randomize_bn``) come through ~50 layers of sums over up to
3 x 3 x 512 = 4,608 terms: the worst-case relative rounding per layer,
4608 * 2**-24 ~ 3e-4, is what the 1e-3 bound allows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discrim_jax import models, pretrained
from discrim_jax import runtime

try:
  import torch
  import torchvision
  import transformers
except ImportError as e:  # A failure with the reason, never a silent skip.
  raise ImportError(
      f"the pretrained-import tests need torch, torchvision and transformers ({e}); "
      "`make test` installs them (pip install -e '.[test,pretrained]')") from e

SIZE = 64  # enough for every stride of the ImageNet stem / CvT embeddings
# See the module docstring.
FLOAT32_BOUND = 1e-3


def _randomize_bn(module, seed=0):
  # Random statistics, and scales below 1 so that a deep random ResNet's
  # logits stay O(1): an absolute bound is then a relative bound too.
  gen = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
      m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 0.4 + 0.1)
      m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch_logits(module, images):
  with torch.no_grad():
    out = module(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return (out.logits if hasattr(out, "logits") else out).numpy()


def _ours(name, num_classes, state, **overrides):
  """``(model, converted variables)``: every weight comes from ``state``, so
  the model's own init is needed for its structure alone (its shapes: an
  init compiled for values would cost CvT-13 several seconds)."""
  model = models.create_model(name, num_classes=num_classes, **overrides)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  converted = pretrained.convert(state, variables,
                                 architecture=pretrained.architecture_of(name))
  return model, converted


def _images(n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_same_logits(name):
  torch.manual_seed(0)
  reference = getattr(torchvision.models, name)(weights=None).eval()
  _randomize_bn(reference)
  model, converted = _ours(name, 1000, _numpy_state(reference), stem="imagenet")
  assert converted.pop("head_reinitialized") is False
  images = _images()
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(converted, images)
  expected = _torch_logits(reference, images)
  assert np.abs(expected).max() > 0.01  # not a degenerate comparison
  assert np.abs(np.asarray(logits) - expected).max() < FLOAT32_BOUND


@pytest.mark.parametrize("name", ["resnet18", "cvt13"])
def test_same_logits_in_float64(name):
  """The same mathematics: JAX and PyTorch agree where rounding is 1e-16."""
  torch.manual_seed(0)
  if name == "cvt13":
    reference = transformers.CvtForImageClassification(
        transformers.CvtConfig(num_labels=10)).eval()
    overrides = {"activation": "gelu"}
  else:
    reference = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    overrides = {"stem": "imagenet"}
  _randomize_bn(reference)
  reference = reference.double()
  with jax.enable_x64(True):
    model = models.create_model(name, num_classes=10, dtype="float64", **overrides)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    variables = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float64), variables)
    converted = pretrained.convert(_numpy_state(reference), variables,
                                   architecture=pretrained.architecture_of(name))
    converted.pop("head_reinitialized")
    images = _images(seed=1).astype(np.float64)
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(converted, images)
    assert logits.dtype == jnp.float64
  expected = _torch_logits(reference, images)
  assert np.abs(expected).max() > 0.01
  # float64 on both sides: ~20 layers of sums over <= 3 x 3 x 512 terms
  # carry a relative rounding of ~20 * 5e3 * 2**-53 ~ 1e-11; 1e-9 is 100x that.
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-9, atol=1e-9)


def test_huggingface_cvt13_same_logits(tmp_path):
  torch.manual_seed(0)
  reference = transformers.CvtForImageClassification(
      transformers.CvtConfig(num_labels=1000)).eval()
  _randomize_bn(reference)
  state = _numpy_state(reference)
  # Hugging Face's port uses exact GELU where the official code has QuickGELU.
  model, converted = _ours("cvt13", 1000, state, activation="gelu")
  converted.pop("head_reinitialized")
  images = _images()
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(converted, images)
  assert np.abs(np.asarray(logits) - _torch_logits(reference, images)).max() < FLOAT32_BOUND
  # Microsoft's original names (what its .pth holds) convert to the same weights.
  microsoft = pretrained.hf_cvt_to_microsoft(state)
  assert "stage2.blocks.0.attn.conv_proj_q.conv.weight" in microsoft
  path = tmp_path / "CvT-13-224x224-IN-1k.pth"
  torch.save({k: torch.from_numpy(v) for k, v in microsoft.items()}, path)
  again = pretrained.convert(pretrained.load_state_dict(path), converted,
                             architecture="cvt")
  again.pop("head_reinitialized")
  jax.tree.map(np.testing.assert_array_equal, again, converted)


def test_head_reinitialized_for_another_number_of_classes(tmp_path):
  reference = torchvision.models.resnet18(weights=None)
  path = tmp_path / "resnet18.pth"
  torch.save(reference.state_dict(), path)
  model = models.create_model("resnet18", num_classes=10, stem="imagenet")
  variables = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))()
  loaded = pretrained.load_pretrained(path, "resnet18", variables)
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                variables["params"]["head"]["kernel"])
  np.testing.assert_array_equal(
      loaded["params"]["stem_conv"]["kernel"],
      reference.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_missing_unexpected_and_mismatched_keys_are_named():
  state = _numpy_state(torchvision.models.resnet18(weights=None))
  model = models.create_model("resnet18", num_classes=1000, stem="imagenet")
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  broken = dict(state)
  del broken["layer2.0.conv1.weight"]
  broken["layer9.0.conv1.weight"] = state["layer1.0.conv1.weight"]
  with pytest.raises(ValueError, match=r"missing keys \['layer2.0.conv1.weight'\].*"
                     r"unexpected keys \['layer9.0.conv1.weight'\]"):
    pretrained.convert(broken, variables, architecture="resnet")
  r50 = _numpy_state(torchvision.models.resnet50(weights=None))
  with pytest.raises(ValueError, match="does not fit this resnet"):
    pretrained.convert(r50, variables, architecture="resnet")
  with pytest.raises(ValueError, match="no pretrained import for 'resnet17'"):
    pretrained.architecture_of("resnet17")
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    pretrained.load_state_dict("/nonexistent/resnet.pth")


def test_convert_cli_and_training_from_it(tmp_path, smoke_config):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from discrim_jax.data.synthetic import SyntheticDataset  # pylint: disable=g-import-not-at-top

  reference = torchvision.models.resnet18(weights=None)
  path = tmp_path / "resnet18.pth"
  torch.save(reference.state_dict(), path)
  repo = Path(__file__).resolve().parents[1]
  out = tmp_path / "converted"
  cmd = [sys.executable, str(repo / "experiments" / "convert.py"), "--model=resnet18",
         f"--checkpoint={path}", f"--out={out}", "--image_size=64"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
  assert result.returncode == 0, result.stderr[-2000:]
  # Running it again must not overwrite what it wrote.
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(repo)))
  assert again.returncode == 1 and "exists" in again.stderr

  config = smoke_config(**{"model_kwargs.width_multiplier": 1.0,
                           "model_kwargs.stage_sizes": (2, 2, 2, 2)})
  config.unlock()
  config.model_kwargs.stem = "imagenet"
  config.init_from = str(out)
  program = runtime.build_from_config(
      config, dataset=SyntheticDataset(num_classes=7, image_shape=(64, 64, 3)))
  state = pretrained.into_state(config.init_from, config.model,
                                program.init_state(0), program.state_sharding)
  np.testing.assert_allclose(
      np.asarray(state.params["stage2_block1"]["conv1"]["kernel"]),
      reference.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  assert state.params["head"]["kernel"].shape == (512, 7)  # re-initialised head
