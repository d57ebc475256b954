"""The PyTorch references the benchmarks compare JAX with.

* :func:`resnet18_step`: ResNet-18 (CIFAR stem, 100 classes) training step,
  channels-last, SGD with momentum; :class:`TorchChild` runs it in a child
  process (``python -m discrim_jax.torch_reference BATCH WARMUP``) whose steps
  take their turn in the JAX rounds.
* :func:`conv_ops`: one flax convolution mirrored in PyTorch (same weights and
  padding, output checked equal to JAX's): forward, input and weight gradient.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import json
import subprocess
import sys
import time


def conv_ops(conv, params, x, g, y):
  """PyTorch's forward, input and weight gradient of ``conv`` (channels-last),
  as no-argument functions; ``y`` is JAX's output, which PyTorch's must equal."""
  from flax.linen.linear import canonicalize_padding  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  k = tuple(conv.kernel_size)
  s = conv.strides or 1
  s = (s,) * len(k) if isinstance(s, int) else tuple(s)
  pad = canonicalize_padding(conv.padding, len(k))
  if isinstance(pad, str):
    pad = lax.padtype_to_pads(x.shape[1:-1], k, s, pad)
  if any(lo != hi for lo, hi in pad):
    raise ValueError(f"{conv} pads unevenly ({pad}); the PyTorch mirror "
                     "covers even padding only: rerun with --notorch")
  layer = torch.nn.Conv2d(x.shape[-1], conv.features, k, s,
                          padding=tuple(lo for lo, _ in pad),
                          groups=conv.feature_group_count,
                          bias="bias" in params)
  cl = torch.channels_last
  # float64 inputs (tests under jax.enable_x64) get a float64 layer.
  layer = layer.to(dtype=getattr(torch, np.asarray(x).dtype.name), memory_format=cl)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(np.array(params["kernel"]))
                       .permute(3, 2, 0, 1))
    if "bias" in params:
      layer.bias.copy_(torch.from_numpy(np.array(params["bias"])))
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  tx.requires_grad_()
  ty = layer(tx)
  got = ty.detach().permute(0, 2, 3, 1).numpy()
  if got.shape != y.shape or not np.allclose(got, np.asarray(y), rtol=1e-3,
                                              atol=1e-3):
    raise ValueError(f"PyTorch's {layer} does not compute JAX's {conv}: "
                     "the timings would not compare the same convolution")
  tg = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2).contiguous(memory_format=cl)

  def forward():
    with torch.no_grad():
      layer(tx)

  return {
      "forward": forward,
      "input_grad": lambda: torch.autograd.grad(ty, [tx], tg, retain_graph=True),
      "weight_grad": lambda: torch.autograd.grad(ty, list(layer.parameters()),
                                                 tg, retain_graph=True),
  }


def resnet18_step(batch):
  """PyTorch ResNet-18 (CIFAR stem, 100 classes) training step, channels-last."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.short = nn.Sequential()
      if stride != 1 or cin != cout:
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

  layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
  cin = 64
  for i, cout in enumerate((64, 128, 256, 512)):
    for j in range(2):
      layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 100)]
  model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  x = torch.rand(batch, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 100, (batch,))
  params = sum(p.numel() for p in model.parameters())

  def step():
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  return step, {"params": params, "threads": torch.get_num_threads(),
                "version": torch.__version__}


def serve(batch: int, warmup: int) -> None:
  """The child: warms up, then times N steps per line N read from stdin."""
  step, meta = resnet18_step(batch)
  for _ in range(warmup):
    step()
  print(json.dumps(meta), flush=True)
  for line in sys.stdin:
    times = []
    for _ in range(int(line)):
      t = time.perf_counter()
      step()
      times.append(time.perf_counter() - t)
    print(json.dumps(times), flush=True)


class TorchChild:
  """PyTorch's ResNet-18 step in a child process, timed on request.

  A child because PyTorch's compiled extensions (torch.optim loads
  torch._dynamo) segfault when they load after TensorFlow; on request so that
  its steps alternate with JAX's in the same rounds.
  """

  def __init__(self, batch: int, warmup: int):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "discrim_jax.torch_reference", str(batch),
         str(warmup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.meta = json.loads(self._line())

  def _line(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch child exited with {self.proc.wait()}; "
                         "rerun with --notorch to skip it")
    return line

  def step(self):
    """One timed step; returns its own duration (no pipe overhead)."""
    self.proc.stdin.write("1\n")
    self.proc.stdin.flush()
    return json.loads(self._line())[0]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


if __name__ == "__main__":
  serve(int(sys.argv[1]), int(sys.argv[2]))
