r"""Benchmark: train/eval step throughput, loss overhead, input pipeline, PyTorch.

  python experiments/bench.py [--models=resnet18,resnet50,cvt13] [--batch_size=64]
      [--dtypes=float32,bfloat16] [--bf16_models=resnet18] [--steps=5]
      [--notorch] [--out=bench.json]

Everything is measured in this one process and run, on synthetic 32x32x3 data
with 100 classes (the CIFAR-100 shape), so the ratios are side by side:

* train step images/s with CE only (no auxiliary statistics computed) and with
  CE+Gini+KL on the last stage; their ratio is the loss overhead;
* eval step images/s; compile times; peak host memory (max RSS);
* the input pipeline alone (``data.measure_throughput``) on Fashion-MNIST;
* with ``--torch`` (the optional ``bench`` dependency group), the same
  ResNet-18 training step in PyTorch (channels-last, same batch, SGD with
  momentum, CIFAR stem), timed in the same run: the JAX/PyTorch ratio.

Figures are medians of ``--steps`` timed steps after ``--warmup`` untimed ones.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_MODELS = flags.DEFINE_list("models", ["resnet18", "resnet50", "cvt13"], "Models.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_DTYPES = flags.DEFINE_list(
    "dtypes", ["float32", "bfloat16"],
    "Compute dtypes of the JAX models to measure (parameters stay float32).")
_BF16_MODELS = flags.DEFINE_list(
    "bf16_models", ["resnet18"], "Models also measured in the other dtypes.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch's ResNet-18 step.")
_INPUT = flags.DEFINE_bool("input", True, "Also time the input pipeline.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here as well.")
_TORCH_ONLY = flags.DEFINE_bool("torch_only", False, "Internal: the PyTorch child.")


def _median_rate(fn, steps, warmup, batch):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return batch / statistics.median(times)


def bench_jax(model, batch, dtype, steps, warmup, with_losses):
  import jax  # pylint: disable=g-import-not-at-top
  from discrim_jax import config_lib, train  # pylint: disable=g-import-not-at-top
  from discrim_jax.data.synthetic import SyntheticDataset  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config_lib.model_defaults(config, model, image_size=32)
  config.model_kwargs.dtype = dtype
  config.batch_size = config.eval_batch_size = batch
  config.num_epochs = 1
  if not with_losses:
    config.loss.layers = ()  # CE only: no auxiliary statistics at all
  trainer = train.build(config, dataset=SyntheticDataset(num_examples=batch * 4))
  state = trainer.init_state(0)
  batches = trainer.batches("train", train=True)
  images = next(batches)
  t = time.perf_counter()
  state, metrics = trainer.train_step(state, images)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  holder = {"state": state}

  def step():
    holder["state"], m = trainer.train_step(holder["state"], images)
    jax.block_until_ready(m)

  rate = _median_rate(step, steps, warmup, batch)
  out = {"train_images_per_s": rate, "train_compile_s": compile_s}
  if with_losses:
    eval_batch = next(trainer.batches("validation", train=False))
    t = time.perf_counter()
    jax.block_until_ready(trainer.eval_step(holder["state"], eval_batch))
    out["eval_compile_s"] = time.perf_counter() - t
    out["eval_images_per_s"] = _median_rate(
        lambda: jax.block_until_ready(trainer.eval_step(holder["state"], eval_batch)),
        steps, warmup, batch)
  return out


def bench_torch(batch, steps, warmup):
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

  return {"train_images_per_s": _median_rate(step, steps, warmup, batch),
          "params": params, "threads": torch.get_num_threads(),
          "version": torch.__version__}


def main(argv):
  del argv
  if _TORCH_ONLY.value:
    print(json.dumps(bench_torch(_BATCH.value, _STEPS.value, _WARMUP.value)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  batch, steps, warmup = _BATCH.value, _STEPS.value, _WARMUP.value
  results = {"batch_size": batch,
             "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "models": {}}
  first, *others = _DTYPES.value
  runs = [(m, first) for m in _MODELS.value]
  runs += [(m, d) for d in others for m in _MODELS.value if m in _BF16_MODELS.value]
  for model, dtype in runs:
    ce = bench_jax(model, batch, dtype, steps, warmup, with_losses=False)
    full = bench_jax(model, batch, dtype, steps, warmup, with_losses=True)
    key = model if dtype == first else f"{model} ({dtype})"
    results["models"][key] = {
        "dtype": dtype, "ce_only": ce, "ce_gini_kl": full,
        "loss_overhead": ce["train_images_per_s"] / full["train_images_per_s"] - 1}
    print(f"{key}: {json.dumps(results['models'][key])}", flush=True)
  if _INPUT.value:
    from discrim_jax.data import measure_throughput  # pylint: disable=g-import-not-at-top
    results["input_images_per_s"] = {
        "fashion_mnist": measure_throughput("fashion_mnist", batch, 200)}
  if _TORCH.value:
    # In a child process: PyTorch's compiled extensions (torch.optim loads
    # torch._dynamo) segfault when they load after TensorFlow.
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--torch_only",
         f"--batch_size={batch}", f"--steps={steps}", f"--warmup={warmup}"],
        capture_output=True, text=True, check=True)
    results["torch_resnet18"] = json.loads(child.stdout.strip().splitlines()[-1])
    if "resnet18" in results["models"]:
      results["jax_over_torch_resnet18"] = (
          results["models"]["resnet18"]["ce_only"]["train_images_per_s"]
          / results["torch_resnet18"]["train_images_per_s"])
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  print()
  print(f"Batch {batch}, {results['cpus']} CPUs ({results['device']}), "
        f"XLA_FLAGS={results['xla_flags'] or '(none)'}")
  print()
  print("| model | train img/s, CE | train img/s, CE+Gini+KL | loss overhead "
        "| eval img/s | compile s (train) |")
  print("|---|---|---|---|---|---|")
  for model, r in results["models"].items():
    print(f"| {model} | {r['ce_only']['train_images_per_s']:.1f} "
          f"| {r['ce_gini_kl']['train_images_per_s']:.1f} "
          f"| {100 * r['loss_overhead']:+.1f}% "
          f"| {r['ce_gini_kl']['eval_images_per_s']:.1f} "
          f"| {r['ce_gini_kl']['train_compile_s']:.1f} |")
  if "torch_resnet18" in results:
    t = results["torch_resnet18"]
    print(f"| resnet18, PyTorch {t['version']} channels-last "
          f"| {t['train_images_per_s']:.1f} | | | | |")
    if "jax_over_torch_resnet18" in results:
      print(f"\nJAX/PyTorch, ResNet-18 train step: "
            f"{results['jax_over_torch_resnet18']:.2f}")
  if "input_images_per_s" in results:
    print(f"Input pipeline (Fashion-MNIST, augmented): "
          f"{results['input_images_per_s']['fashion_mnist']:,.0f} images/s")
  print(f"Peak host memory (max RSS): {results['peak_rss_gib']:.2f} GiB")
  print(json.dumps(results))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
