"""What the benchmarks share: the app's own steps and side-by-side timing.

``experiments/bench.py`` (whole train/eval steps) and
``experiments/bench_convs.py`` (each convolution alone, :func:`conv_layers`,
:func:`jax_conv_ops`) time what the training app builds: :func:`app_program`
goes through ``runtime.build``, the builder ``train_and_evaluate`` uses, so the
benchmark's step is the one users run.
Compared functions are timed in alternating rounds (:func:`interleaved_times`),
so that a slow spell of a shared machine hits all of them.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Timing:
  """How calls are timed: ``warmup`` untimed calls, then ``rounds`` rounds of
  ``steps_per_round`` calls of each function in turn."""
  warmup: int = 2
  rounds: int = 5
  steps_per_round: int = 2


def cpus() -> int:
  """CPUs this process may run on (``taskset`` narrows them)."""
  if hasattr(os, "sched_getaffinity"):  # not on macOS
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def cpu_model() -> str:
  """The CPU's model name and whether it has AVX512_BF16 (Linux), for the
  record: kernels and their speed differ between CPUs."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return "unknown"
  name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.startswith("model name")), "unknown")
  flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                if line.startswith("flags")), [])
  extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
  return f"{name} ({', '.join(extras) or 'no AVX-512'})"


def interleaved_times(fns: dict[Any, Any], timing: Timing) -> dict[Any, list[float]]:
  """Seconds of each call of each no-argument function in ``fns``, timed in
  alternating rounds. A function that returns a number returns its own
  duration (the PyTorch child's steps), which is used instead."""
  for fn in fns.values():
    for _ in range(timing.warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(timing.rounds):
    for name, fn in fns.items():
      # Let the last call's worker threads (XLA's, or the PyTorch child's
      # OpenMP threads) stop spinning before the next one is timed.
      time.sleep(0.3)
      for _ in range(timing.steps_per_round):
        t = time.perf_counter()
        own = fn()
        times[name].append(own if own is not None else time.perf_counter() - t)
  return times


def interleaved_rates(fns, batch: int, timing: Timing) -> dict[Any, float]:
  """images/s of each no-argument step in ``fns`` (medians), timed in
  alternating rounds."""
  return {name: batch / statistics.median(ts)
          for name, ts in interleaved_times(fns, timing).items()}


def interleaved_round_rates(fns, batch: int, timing: Timing
                            ) -> dict[Any, list[float]]:
  """images/s of each step in ``fns`` per round (the median of the round's
  calls), timed in alternating rounds: the rates of one round were measured
  under the same load, so their ratio is the figure to compare."""
  n = timing.steps_per_round
  return {name: [batch / statistics.median(ts[r * n:(r + 1) * n])
                 for r in range(timing.rounds)]
          for name, ts in interleaved_times(fns, timing).items()}


def spread(values) -> dict[str, float]:
  """min, median and max of per-round figures."""
  values = list(values)
  return {"min": min(values), "median": statistics.median(values),
          "max": max(values), "rounds": len(values)}


def round_ratios(a: list[float], b: list[float]) -> dict[str, float]:
  """The :func:`spread` of ``a[r] / b[r]`` over rounds ``r`` (two rates
  timed side by side)."""
  return spread(x / y for x, y in zip(a, b, strict=True))


def verdict(figure: dict[str, float], target: float, *,
            at_most: bool = False) -> str:
  """"met" when every round's figure meets ``target`` (``figure >= target``,
  or ``<=`` with ``at_most``), "NOT met" when none does, and otherwise
  "inconclusive: machine noisy" (the rounds disagree, so the spread, not
  the code, decides)."""
  ok = (lambda v: v <= target) if at_most else (lambda v: v >= target)
  if ok(figure["min"]) and ok(figure["max"]):
    return "met"
  if not ok(figure["min"]) and not ok(figure["max"]):
    return "NOT met"
  return "inconclusive: machine noisy"


def describe(figure: dict[str, float], fmt: str = ".2f", scale: float = 1.0,
             suffix: str = "") -> str:
  """``median (min-max over N rounds)`` of a :func:`spread`."""
  f = lambda v: format(scale * v, fmt) + suffix  # pylint: disable=unnecessary-lambda-assignment
  return (f"{f(figure['median'])} (min {f(figure['min'])}, max "
          f"{f(figure['max'])} over {figure['rounds']} rounds)")


def app_config(model: str, batch: int, dtype: str, with_losses: bool,
               image_size: int = 32, width_multiplier: float | None = None,
               **overrides):
  """The config the benchmarks time: the app's defaults for ``model`` at
  ``image_size`` (32: the CIFAR stem; 224: the ImageNet stem), ``batch``
  images, compute ``dtype``; CE only (no auxiliary statistics at all)
  unless ``with_losses``."""
  from discrim_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config_lib.model_defaults(config, model, image_size=image_size)
  config.model_kwargs.dtype = dtype
  if width_multiplier is not None:
    config.model_kwargs.width_multiplier = width_multiplier
  config.batch_size = config.eval_batch_size = batch
  config.num_epochs = 1
  if not with_losses:
    config.loss.layers = ()
  config.update(overrides)
  return config


def app_program(model: str, batch: int, dtype: str, with_losses: bool,
                image_size: int = 32, num_classes: int = 100,
                width_multiplier: float | None = None, **overrides):
  """``runtime.build_from_config`` of :func:`app_config` on synthetic images of
  ``image_size`` (``num_classes`` classes)."""
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  from discrim_jax.data.synthetic import SyntheticDataset  # pylint: disable=g-import-not-at-top
  return runtime.build_from_config(
      app_config(model, batch, dtype, with_losses, image_size,
                 width_multiplier, **overrides),
      dataset=SyntheticDataset(num_classes=num_classes, num_examples=batch * 4,
                               image_shape=(image_size, image_size, 3)))


def model_gflop(program) -> float:
  """XLA's FLOP count of ``program``'s train step before backend fusions, in
  GFLOP.

  Counted on the step lowered for one CPU device (the program's own step
  where it runs on one), whatever the benchmark runs on: the count is the
  model's, and XLA gives none before compilation on GPU (after it,
  convolutions run as cuDNN calls that it does not count).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from discrim_jax import runtime  # pylint: disable=g-import-not-at-top
  cpu = program
  if [d.platform for d in program.mesh.devices.flat] != ["cpu"]:
    cpu = runtime.build_from_config(program.spec.config, dataset=program.dataset,
                                    devices=jax.devices("cpu")[:1])
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                cpu.dataset.batch(cpu.spec.batch_size))
  lowered = cpu.train_step.lower(cpu.abstract_state, abstract_batch)
  return lowered.cost_analysis()["flops"] / 1e9


def app_batch(program, seeds: int = 0):
  """One batch of the synthetic images as global arrays on the program's mesh
  (no tf.data: the steps are also timed where TensorFlow is absent); with
  ``seeds``, stacked for the vmapped step."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from discrim_jax import data  # pylint: disable=g-import-not-at-top
  batch = program.dataset.batch(program.spec.batch_size)
  if not seeds:
    return data.to_global_batch(batch, program.batch_sharding)
  stacked = {k: np.stack([v] * seeds) for k, v in batch.items()}
  return data.to_global_batch(stacked, NamedSharding(program.mesh, P(None, "data")))


def stepper(executable, state, batch):
  """A no-argument function running one step; the state is threaded through."""
  import jax  # pylint: disable=g-import-not-at-top
  holder = {"state": state}

  def step():
    holder["state"], metrics = executable(holder["state"], batch)
    jax.block_until_ready(metrics)
  return step


def compile_lowered(lowered, options=None):
  """(executable, compile seconds) of ``lowered`` with XLA ``options``."""
  t = time.perf_counter()
  executable = lowered.compile(compiler_options=options)
  return executable, time.perf_counter() - t


def compiled(jitted, *args):
  """(executable, compile seconds) of ``jitted`` at ``args``."""
  return compile_lowered(jitted.lower(*args))


def write(results: dict[str, Any], out: str | None) -> None:
  print(json.dumps(results))
  if out:
    with open(out, "w") as f:
      json.dump(results, f, indent=2)


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
  program = app_program(model, batch, "float32", False)
  layers = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      conv = context.module.clone(parent=None, name=None)
      key = (repr(conv), tuple(args[0].shape))
      layers.setdefault(key, [conv, tuple(args[0].shape), 0])[2] += 1
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, *program.dataset.image_shape), "float32")
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: program.model.init(jax.random.key(0), x, train=False),
                   images)
  return program.spec.config, [tuple(v) for v in layers.values()]


def jax_conv_ops(conv, params, x, g, options):
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
      compile_lowered(jax.jit(f).lower(*a), options)[0], a)
          for op, (f, a) in calls.items()}
