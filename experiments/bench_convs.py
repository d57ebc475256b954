r"""Each convolution of a model's train step timed alone, in JAX and PyTorch.

  python experiments/bench_convs.py [--models=resnet18] [--batch_size=64]
      [--notorch] [--rounds=5] [--steps_per_round=2] [--out=convs.json]

Each distinct convolution of the ``--models``' train step (found by tracing
the model) is timed alone: its forward pass, input gradient and weight
gradient, in JAX with the training app's XLA options and, unless
``--notorch``, in PyTorch in this process (channels-last; its output is
checked equal to JAX's), alternating; the totals weight each by how often the
step runs it. It says how much of the whole-step gap to PyTorch
(``experiments/bench.py``) the convolution kernels account for. Under
``taskset -c 0`` both frameworks get one CPU (PyTorch follows the affinity).
"""

import os
import statistics

from absl import app
from absl import flags

from discrim_jax import benchmarking
from discrim_jax import torch_reference
from discrim_jax.cli import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_MODELS = flags.DEFINE_list("models", ["resnet18"], "Models.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", 2, "Timed calls per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch's convolutions.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here as well.")


def bench_convs(model, batch, timing, with_torch):
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
  from discrim_jax import run_spec  # pylint: disable=g-import-not-at-top
  config, layers = benchmarking.conv_layers(model, batch)
  options = run_spec.compiler_options(config, jax.devices()[0].platform)
  rows = []
  for i, (conv, shape, count) in enumerate(layers):
    rng = np.random.default_rng(i)
    x = jax.device_put(rng.standard_normal(shape, np.float32))
    params = jax.jit(conv.init)(jax.random.key(i), x)["params"]
    y = jax.eval_shape(conv.apply, {"params": params}, x)
    g = jax.device_put(rng.standard_normal(y.shape, np.float32))
    jax_ops = benchmarking.jax_conv_ops(conv, params, x, g, options)
    y = jax_ops["forward"]()
    fns = {("jax", op): fn for op, fn in jax_ops.items()}
    if with_torch:
      fns.update({("torch", op): fn for op, fn in
                  torch_reference.conv_ops(conv, params, x, g, y).items()})
    times = benchmarking.interleaved_times(
        {k: _dropping_result(fn) for k, fn in fns.items()}, timing)
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


def _dropping_result(fn):
  """``fn`` returning None (``benchmarking.interleaved_times`` reads a returned value as
  the call's own duration)."""

  def call():
    fn()
  return call


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


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  timing = benchmarking.Timing(_WARMUP.value, _ROUNDS.value, _STEPS.value)
  results = {"batch_size": _BATCH.value, "rounds": _ROUNDS.value,
             "steps_per_round": _STEPS.value, "cpus": benchmarking.cpus(),
             "cpu": benchmarking.cpu_model(), "jax": jax.__version__,
             "convs": {m: bench_convs(m, _BATCH.value, timing, _TORCH.value)
                       for m in _MODELS.value}}
  _print_conv_tables(results)
  benchmarking.write(results, _OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
