r"""Benchmark: train/eval step throughput, loss overhead, XLA levers, PyTorch.

  python experiments/bench.py [--models=resnet18,resnet50,cvt13] [--batch_size=64]
      [--dtypes=float32,bfloat16] [--bf16_models=resnet18] [--rounds=5]
      [--steps_per_round=2] [--levers] [--lever_models=resnet18] [--notorch]
      [--peak_tflops=0] [--out=bench.json]
  python experiments/bench.py --convs [--models=resnet18] [--notorch]

Everything is measured in this one process and run, on synthetic 32x32x3 data
with 100 classes (the CIFAR-100 shape), so the ratios are side by side:

* train step images/s with CE only (no auxiliary statistics computed) and with
  CE+Gini+KL on the last stage; their ratio is the loss overhead. The two
  compiled steps are timed in alternating rounds (``--rounds`` rounds of
  ``--steps_per_round`` steps each) so that a slow spell of a shared machine
  hits both; figures are medians over all timed steps, compile time apart;
* eval step images/s; peak host memory (max RSS) and, on an accelerator,
  peak device memory; model TFLOP/s (XLA's FLOP count of the CE+Gini+KL step
  lowered for one CPU device, before backend fusions, times steps/s) and,
  given ``--peak_tflops``, model FLOP utilisation;
* ``--levers``: the CE step of each of ``--lever_models`` (ResNet-18) with
  and without the model's fusion barriers, compiled with each set of XLA:CPU
  options in ``LEVERS``, timed in alternating rounds; the speed-up is against
  XLA's defaults without barriers;
* the input pipeline alone (``data.measure_throughput``) on Fashion-MNIST,
  and its rate over the ResNet-18 train step's consumption;
* with ``--torch`` (the optional ``bench`` dependency group), the same
  ResNet-18 training step in PyTorch (channels-last, same batch, SGD with
  momentum, CIFAR stem), in a child process whose steps take their turn in
  the JAX ResNet-18 rounds: the JAX/PyTorch ratio.

The JAX steps are the training app's own (``train.build``), so they use the
config's defaults, ``xla_cpu_ynn_fusion="dot,reduce"`` and
``xla_cpu_fusion_barriers=True`` included.

``--convs`` measures something else instead: each distinct convolution of the
``--models``' train step (found by tracing the model) timed alone, its
forward pass, input gradient and weight gradient, in JAX with the training
app's XLA options and, with ``--torch``, in PyTorch in this process
(channels-last; its output is checked equal to JAX's), alternating; the
totals weight each by how often the step runs it. It says how much of the
whole-step gap the convolution kernels account for. Under
``taskset -c 0`` both frameworks get one CPU (PyTorch follows the affinity).
"""

import functools
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
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", 2, "Timed steps per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_LEVERS = flags.DEFINE_bool("levers", True, "Also time LEVERS (--lever_models).")
_LEVER_MODELS = flags.DEFINE_list("lever_models", ["resnet18"],
                                  "Models whose CE step --levers times.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch's ResNet-18 step.")
_INPUT = flags.DEFINE_bool("input", True, "Also time the input pipeline.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0,
    "The device's peak dense TFLOP/s in the compute dtype (e.g. 989 for an "
    "H200 in bfloat16); with it, the table gives model FLOP utilisation.")
_CONVS = flags.DEFINE_bool(
    "convs", False,
    "Instead of whole steps, time each convolution of the --models' train "
    "step alone (forward, input gradient, weight gradient) in JAX and, with "
    "--torch, in PyTorch, and sum them as the step runs them.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here as well.")
_TORCH_ONLY = flags.DEFINE_bool("torch_only", False, "Internal: the PyTorch child.")

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_DOT_REDUCE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# What --levers times on the CE step: name -> (the model's fusion barriers,
# XLA:CPU options). Our defaults are config.xla_cpu_fusion_barriers=True and
# config.xla_cpu_ynn_fusion="dot,reduce".
LEVERS = {
    "XLA defaults": (False, {}),
    "YNNPACK dot,reduce": (False, {_YNN: _DOT_REDUCE}),
    "YNNPACK dot,reduce + fusion barriers (our default)": (
        True, {_YNN: _DOT_REDUCE}),
    "fusion barriers, XLA's default options": (True, {}),
    "ours + YNNPACK eltwise": (
        True, {_YNN: _DOT_REDUCE + ",LIBRARY_FUSION_TYPE_ELTWISE"}),
    "ours, YNNPACK dot only": (True, {_YNN: "LIBRARY_FUSION_TYPE_DOT"}),
    "ours + fast math": (
        True, {_YNN: _DOT_REDUCE, "xla_cpu_enable_fast_math": True}),
    "ours + concurrency-optimised scheduler": (
        True, {_YNN: _DOT_REDUCE,
               "xla_cpu_enable_concurrency_optimized_scheduler": True}),
    "XNNPACK": (False, {"xla_cpu_use_xnnpack": True}),
    "oneDNN (custom calls)": (
        False, {"xla_cpu_use_onednn": True,
                "xla_cpu_experimental_onednn_custom_call": True}),
}


def _cpus():
  """CPUs this process may run on (``taskset`` narrows them)."""
  if hasattr(os, "sched_getaffinity"):  # not on macOS
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def _interleaved_rates(fns, batch):
  """images/s of each no-argument step in ``fns``, timed in alternating rounds."""
  return {name: batch / statistics.median(ts)
          for name, ts in _interleaved_times(fns).items()}


def _interleaved_times(fns):
  """Seconds of each call of each no-argument function in ``fns``, timed in
  alternating rounds (--rounds x --steps_per_round, after --warmup calls)."""
  for fn in fns.values():
    for _ in range(_WARMUP.value):
      fn()
  times = {name: [] for name in fns}
  for _ in range(_ROUNDS.value):
    for name, fn in fns.items():
      # Let the last step's worker threads (XLA's, or the PyTorch child's
      # OpenMP threads) stop spinning before the next step is timed.
      time.sleep(0.3)
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        own = fn()  # a step that times itself returns its duration
        times[name].append(own if own is not None else time.perf_counter() - t)
  return times


def _trainer(model, batch, dtype, with_losses, **overrides):
  from discrim_jax import config_lib, train  # pylint: disable=g-import-not-at-top
  from discrim_jax.data.synthetic import SyntheticDataset  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config_lib.model_defaults(config, model, image_size=32)
  config.model_kwargs.dtype = dtype
  config.batch_size = config.eval_batch_size = batch
  config.num_epochs = 1
  if not with_losses:
    config.loss.layers = ()  # CE only: no auxiliary statistics at all
  config.update(overrides)
  return train.build(config, dataset=SyntheticDataset(num_examples=batch * 4))


def _model_gflop(trainer):
  """XLA's FLOP count of ``trainer``'s train step before backend fusions, in
  GFLOP.

  Counted on the step lowered for one CPU device, whatever the benchmark runs
  on: the count is the model's, and XLA gives none before compilation on GPU
  (after it, convolutions run as cuDNN calls that it does not count).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from discrim_jax import train  # pylint: disable=g-import-not-at-top
  cpu = train.build(trainer.config, dataset=trainer.dataset,
                    devices=jax.devices("cpu")[:1])
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                cpu.dataset.batch(cpu.config.batch_size))
  lowered = cpu.train_step.lower(cpu.abstract_state, abstract_batch)
  return lowered.cost_analysis()["flops"] / 1e9


def _batch(trainer):
  """One batch of the synthetic images as global arrays on the trainer's mesh
  (no tf.data: the JAX steps are also timed where TensorFlow is absent)."""
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  return data.to_global_batch(trainer.dataset.batch(trainer.config.batch_size),
                              trainer.batch_sharding)


def _stepper(executable, state, images):
  """A no-argument function running one step; the state is threaded through."""
  import jax  # pylint: disable=g-import-not-at-top
  holder = {"state": state}

  def step():
    holder["state"], metrics = executable(holder["state"], images)
    jax.block_until_ready(metrics)
  return step


def _compile(lowered, options=None):
  """(executable, compile seconds) of ``lowered`` with XLA ``options``."""
  t = time.perf_counter()
  executable = lowered.compile(compiler_options=options)
  return executable, time.perf_counter() - t


def _compiled(jitted, *args):
  """(executable, compile seconds) of ``jitted`` at ``args``."""
  return _compile(jitted.lower(*args))


def bench_jax(model, batch, dtype, others=None):
  """CE-only and CE+Gini+KL train steps (alternating), then the eval step.

  ``others``: more steps (name -> function) timed in the same rounds.
  """
  import jax  # pylint: disable=g-import-not-at-top
  out, steps = {}, {}
  for name, with_losses in (("ce_only", False), ("ce_gini_kl", True)):
    trainer = _trainer(model, batch, dtype, with_losses)
    state = trainer.init_state(0)
    images = _batch(trainer)
    executable, compile_s = _compiled(trainer.train_step, state, images)
    steps[name] = _stepper(executable, state, images)
    out[name] = {"train_compile_s": compile_s,
                 "train_gflop_per_step": _model_gflop(trainer)}
  for name, rate in _interleaved_rates({**steps, **(others or {})}, batch).items():
    out.setdefault(name, {})["train_images_per_s"] = rate
  state = trainer.init_state(0)
  eval_batch = _batch(trainer)
  executable, out["eval_compile_s"] = _compiled(trainer.eval_step, state, eval_batch)

  def evaluate():
    jax.block_until_ready(executable(state, eval_batch))
  out["eval_images_per_s"] = _interleaved_rates({"eval": evaluate}, batch)["eval"]
  out["loss_overhead"] = (out["ce_only"]["train_images_per_s"]
                          / out["ce_gini_kl"]["train_images_per_s"] - 1)
  full = out["ce_gini_kl"]
  full["train_tflop_per_s"] = (
      full["train_gflop_per_step"] * full["train_images_per_s"] / batch / 1e3)
  if _PEAK.value:
    full["mfu"] = full["train_tflop_per_s"] / _PEAK.value
  return out


def bench_levers(model, batch):
  """The model's CE step under each of ``LEVERS``, timed side by side."""
  lowered, trainers, images = {}, {}, {}
  for barriers in (False, True):
    trainers[barriers] = _trainer(model, batch, "float32", False,
                                  xla_cpu_ynn_fusion="",
                                  xla_cpu_fusion_barriers=barriers)
    state = trainers[barriers].init_state(0)
    images[barriers] = _batch(trainers[barriers])
    lowered[barriers] = trainers[barriers].train_step.lower(
        state, images[barriers])
  steps, compile_s = {}, {}
  for name, (barriers, options) in LEVERS.items():
    executable, compile_s[name] = _compile(lowered[barriers], options)
    # Each executable donates its input state: give each its own copy.
    steps[name] = _stepper(executable, trainers[barriers].init_state(0),
                           images[barriers])
  rates = _interleaved_rates(steps, batch)
  base = rates["XLA defaults"]
  return {name: {"fusion_barriers": LEVERS[name][0],
                 "options": LEVERS[name][1], "train_images_per_s": rate,
                 "speedup": rate / base, "compile_s": compile_s[name]}
          for name, rate in rates.items()}


def conv_layers(model, batch):
  """The convolutions of ``model``'s forward pass on the benchmark's synthetic
  batch, in order.

  A list of ``(module, input shape, count)``, one entry per distinct
  convolution (``flax.linen.Conv`` fields and input shape); the first
  convolution of the pass reads the images, so a train step needs no input
  gradient for it.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  trainer = _trainer(model, batch, "float32", False)
  layers = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      conv = context.module.clone(parent=None, name=None)
      key = (repr(conv), tuple(args[0].shape))
      layers.setdefault(key, [conv, tuple(args[0].shape), 0])[2] += 1
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, *trainer.dataset.image_shape), "float32")
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: trainer.model.init(jax.random.key(0), x, train=False),
                   images)
  return trainer.config, [tuple(v) for v in layers.values()]


def bench_convs(model, batch):
  """Each convolution of ``model``'s train step timed alone, in JAX (the
  training app's XLA:CPU options) and, with --torch, in PyTorch.

  For each distinct convolution: the forward pass, the input gradient and the
  weight gradient (a train step computes all three, except the input gradient
  of the convolution that reads the images), medians in ms, alternating
  between the two frameworks. Totals weight each by how often the step runs
  it: the time a train step spends in convolution kernels.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from discrim_jax import train  # pylint: disable=g-import-not-at-top
  config, layers = conv_layers(model, batch)
  options = train.compiler_options(config, jax.devices()[0].platform)
  rows = []
  for i, (conv, shape, count) in enumerate(layers):
    rng = np.random.default_rng(i)
    x = jax.device_put(rng.standard_normal(shape, np.float32))
    params = jax.jit(conv.init)(jax.random.key(i), x)["params"]
    y = jax.eval_shape(conv.apply, {"params": params}, x)
    g = jax.device_put(rng.standard_normal(y.shape, np.float32))
    jax_ops = _jax_conv_ops(conv, params, x, g, options)
    y = jax_ops["forward"]()
    fns = {("jax", op): fn for op, fn in jax_ops.items()}
    if _TORCH.value:
      fns.update({("torch", op): fn
                  for op, fn in _torch_conv_ops(conv, params, x, g, y).items()})
    times = _interleaved_times({k: _dropping_result(fn) for k, fn in fns.items()})
    row = {"input": list(shape), "output": list(y.shape),
           "kernel": list(conv.kernel_size), "strides": conv.strides,
           "count": count, "needs_input_grad": i > 0}
    for (framework, op), ts in times.items():
      row.setdefault(framework, {})[op] = 1e3 * statistics.median(ts)
    rows.append(row)
  totals = {}
  for row in rows:
    for framework in ("jax", "torch"):
      for op, ms in row.get(framework, {}).items():
        if op != "input_grad" or row["needs_input_grad"]:
          t = totals.setdefault(framework, {})
          t[op] = t.get(op, 0.0) + row["count"] * ms
  return {"layers": rows, "totals_ms": totals}


def _jax_conv_ops(conv, params, x, g, options):
  """JAX's forward, input and weight gradient of ``conv`` (cotangent ``g``),
  compiled with XLA ``options`` here (not in the first timed call), as
  no-argument functions."""
  import jax  # pylint: disable=g-import-not-at-top

  def apply(p, x):
    return conv.apply({"params": p}, x)

  def input_grad(p, x, g):
    return jax.vjp(lambda x: apply(p, x), x)[1](g)[0]

  def weight_grad(p, x, g):
    return jax.vjp(lambda p: apply(p, x), p)[1](g)[0]

  calls = {"forward": (apply, (params, x)),
           "input_grad": (input_grad, (params, x, g)),
           "weight_grad": (weight_grad, (params, x, g))}
  return {op: functools.partial(
      lambda f, a: jax.block_until_ready(f(*a)),
      _compile(jax.jit(f).lower(*a), options)[0], a)
          for op, (f, a) in calls.items()}


def _dropping_result(fn):
  """``fn`` returning None (``_interleaved_times`` reads a returned value as
  the call's own duration)."""

  def call():
    fn()
  return call


def _torch_conv_ops(conv, params, x, g, y):
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
  layer = layer.to(memory_format=cl)
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


def bench_torch(batch):
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


def serve_torch(batch):
  """The child: warms up, then times N steps per line N read from stdin."""
  step, meta = bench_torch(batch)
  for _ in range(_WARMUP.value):
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

  def __init__(self, batch):
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--torch_only",
         f"--batch_size={batch}", f"--warmup={_WARMUP.value}"],
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


def main(argv):
  del argv
  batch = _BATCH.value
  if _TORCH_ONLY.value:
    serve_torch(batch)
    return
  import jax  # pylint: disable=g-import-not-at-top
  results = {"batch_size": batch, "rounds": _ROUNDS.value,
             "steps_per_round": _STEPS.value,
             "device": str(jax.devices()[0].device_kind), "cpus": _cpus(),
             "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "models": {}}
  if _CONVS.value:
    results["convs"] = {m: bench_convs(m, batch) for m in _MODELS.value}
    _print_conv_tables(results)
    _write(results)
    return
  first, *others = _DTYPES.value
  runs = [(m, first) for m in _MODELS.value]
  runs += [(m, d) for d in others for m in _MODELS.value if m in _BF16_MODELS.value]
  for model, dtype in runs:
    key = model if dtype == "float32" else f"{model} ({dtype})"
    torch_child = TorchChild(batch) if key == "resnet18" and _TORCH.value else None
    others = {"torch": torch_child.step} if torch_child else None
    r = results["models"][key] = dict(dtype=dtype, **bench_jax(model, batch, dtype, others))
    if torch_child:
      torch_child.close()
      results["torch_resnet18"] = dict(torch_child.meta, **r.pop("torch"))
      results["jax_over_torch_resnet18"] = (
          r["ce_only"]["train_images_per_s"]
          / results["torch_resnet18"]["train_images_per_s"])
    print(f"{key}: {json.dumps(r)}", flush=True)
  if _LEVERS.value:
    results["levers"] = {m: bench_levers(m, batch) for m in _LEVER_MODELS.value}
    print(f"levers: {json.dumps(results['levers'])}", flush=True)
  r18 = results["models"].get("resnet18")
  if _INPUT.value:
    from discrim_jax.data import measure_throughput  # pylint: disable=g-import-not-at-top
    results["input_images_per_s"] = {
        "fashion_mnist": measure_throughput("fashion_mnist", batch, 200)}
    if r18:
      results["input_over_resnet18_step"] = (
          results["input_images_per_s"]["fashion_mnist"]
          / r18["ce_gini_kl"]["train_images_per_s"])
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  if "peak_bytes_in_use" in stats:
    results["peak_device_gib"] = stats["peak_bytes_in_use"] / 2**30
  _print_tables(results)
  _write(results)


def _write(results):
  print(json.dumps(results))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


def _print_conv_tables(results):
  """One markdown table per model: ms per convolution and framework."""
  ops = ("forward", "input_grad", "weight_grad")
  for model, r in results["convs"].items():
    torch_ = "torch" in r["totals_ms"]
    print()
    print(f"{model}: each convolution of the train step alone, batch "
          f"{results['batch_size']}, {results['cpus']} CPUs, JAX "
          f"{results['jax']}; medians of {results['rounds']} x "
          f"{results['steps_per_round']} calls, ms"
          + (" (JAX / PyTorch)" if torch_ else ""))
    print()
    print("| input -> output (kernel, stride) | count | forward "
          "| input gradient | weight gradient |")
    print("|---|---|---|---|---|")

    def cell(times, op):
      return (f"{times['jax'][op]:.1f}" +
              (f" / {times['torch'][op]:.1f}" if torch_ else ""))

    for row in r["layers"]:
      grads = (cell(row, "input_grad") if row["needs_input_grad"]
               else "(not needed)")
      print(f"| {'x'.join(map(str, row['input'][1:]))} -> "
            f"{'x'.join(map(str, row['output'][1:]))} "
            f"({'x'.join(map(str, row['kernel']))}, {row['strides']}) "
            f"| {row['count']} | {cell(row, 'forward')} | {grads} "
            f"| {cell(row, 'weight_grad')} |")
    total = r["totals_ms"]
    print(f"| **per train step** | | {cell(total, 'forward')} "
          f"| {cell(total, 'input_grad')} | {cell(total, 'weight_grad')} |")
    jax_sum = sum(total["jax"][op] for op in ops)
    line = f"{model}: {jax_sum:.0f} ms of convolutions per train step in JAX"
    if torch_:
      torch_sum = sum(total["torch"][op] for op in ops)
      line += (f", {torch_sum:.0f} ms in PyTorch: JAX/PyTorch = "
               f"{torch_sum / jax_sum:.2f} on the convolutions alone")
    print(line)


def _print_tables(results):
  """Markdown tables and the three targets of the benchmark."""
  print()
  print(f"Batch {results['batch_size']}, {results['cpus']} CPUs "
        f"({results['device']}), JAX {results['jax']}, "
        f"XLA_FLAGS={results['xla_flags'] or '(none)'}; medians of "
        f"{results['rounds']} x {results['steps_per_round']} timed steps")
  print()
  print("| model | train img/s, CE | train img/s, CE+Gini+KL | loss overhead "
        "| eval img/s | compile s (train) | model TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for model, r in results["models"].items():
    full = r["ce_gini_kl"]
    mfu = f"{100 * full['mfu']:.1f}%" if "mfu" in full else "(--peak_tflops)"
    print(f"| {model} | {r['ce_only']['train_images_per_s']:.1f} "
          f"| {full['train_images_per_s']:.1f} "
          f"| {100 * r['loss_overhead']:+.1f}% "
          f"| {r['eval_images_per_s']:.1f} "
          f"| {full['train_compile_s']:.1f} | {full['train_tflop_per_s']:.3f} "
          f"| {mfu} |")
  if "torch_resnet18" in results:
    t = results["torch_resnet18"]
    print(f"| resnet18, PyTorch {t['version']} channels-last "
          f"| {t['train_images_per_s']:.1f} | | | | | | |")
  for model, levers in results.get("levers", {}).items():
    print()
    print(f"| {model} CE step: barriers, XLA:CPU options | img/s | vs XLA defaults |")
    print("|---|---|---|")
    for name, r in levers.items():
      print(f"| {name} | {r['train_images_per_s']:.1f} | {r['speedup']:.2f}x |")
  print()
  r18 = results["models"].get("resnet18")
  if r18:
    overhead = r18["loss_overhead"]
    print(f"Target, loss overhead <= 2% of the ResNet-18 step: "
          f"{100 * overhead:+.1f}% ({'met' if overhead <= 0.02 else 'NOT met'})")
  if "input_over_resnet18_step" in results:
    ratio = results["input_over_resnet18_step"]
    print(f"Target, input pipeline >= 10x the ResNet-18 step's consumption: "
          f"{results['input_images_per_s']['fashion_mnist']:,.0f} images/s = "
          f"{ratio:,.0f}x ({'met' if ratio >= 10 else 'NOT met'})")
  if "jax_over_torch_resnet18" in results:
    ratio = results["jax_over_torch_resnet18"]
    print(f"Target, JAX >= PyTorch on the ResNet-18 step: JAX/PyTorch = "
          f"{ratio:.2f} ({'met' if ratio >= 1 else 'NOT met'})")
  print(f"Peak host memory (max RSS): {results['peak_rss_gib']:.2f} GiB")
  if "peak_device_gib" in results:
    print(f"Peak device memory (all steps of the run): "
          f"{results['peak_device_gib']:.2f} GiB")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
