r"""Benchmark: train/eval step throughput, loss overhead, XLA levers, PyTorch.

  python experiments/bench.py [--models=resnet18,resnet50,cvt13] [--batch_size=64]
      [--dtypes=float32,bfloat16] [--bf16_models=resnet18] [--rounds=5]
      [--steps_per_round=2] [--levers] [--lever_models=resnet18] [--notorch]
      [--peak_tflops=0] [--out=bench.json]

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
* ``--vmap_seeds=N`` (default 2; 0 skips it): for each of ``--vmap_models``,
  the CE+Gini+KL step of N seeds trained together (the app's step under
  ``jax.vmap``, what ``compare.py --vmap_seeds`` runs) beside the single-seed
  step, in the same rounds: images/s per seed, and whether vmapping pays;
* the input pipeline alone (``data.measure_throughput``) on Fashion-MNIST,
  and its rate over the ResNet-18 train step's consumption;
* with ``--torch`` (the optional ``bench`` dependency group), the same
  ResNet-18 training step in PyTorch (channels-last, same batch, SGD with
  momentum, CIFAR stem), in a child process whose steps take their turn in
  the JAX ResNet-18 rounds: the JAX/PyTorch ratio.

The JAX steps are the training app's own (``runtime.build``, through
``benchmarking.app_program``: the step ``train_and_evaluate`` runs), so they
use the config's defaults, ``xla_cpu_ynn_fusion="dot,reduce"`` and
``xla_cpu_fusion_barriers=True`` included. ``experiments/bench_convs.py``
times each convolution alone.
"""

import json
import os
import resource

from absl import app
from absl import flags

from discrim_jax.cli import parse_flags
from discrim_jax import benchmarking
from discrim_jax import torch_reference

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
_VMAP_SEEDS = flags.DEFINE_integer(
    "vmap_seeds", 2, "Also time this many seeds trained together (0: skip).")
_VMAP_MODELS = flags.DEFINE_list("vmap_models", ["resnet18"],
                                 "Models whose vmapped-seeds step is timed.")
_INPUT = flags.DEFINE_bool("input", True, "Also time the input pipeline.")
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0,
    "The device's peak dense TFLOP/s in the compute dtype (e.g. 989 for an "
    "H200 in bfloat16); with it, the table gives model FLOP utilisation.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here as well.")

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


def bench_jax(model, batch, dtype, timing, others=None, vmap_seeds=0):
  """CE-only and CE+Gini+KL train steps (alternating), then the eval step.

  ``others``: more steps (name -> function) timed in the same rounds.
  ``vmap_seeds``: also the CE+Gini+KL step of that many seeds under
  ``jax.vmap`` (``seed_groups.VmappedSeeds``, as ``--vmap_seeds`` trains),
  in the same rounds. Ratios of steps timed side by side are kept per round
  (``*_spread``: min, median, max), so that a target is called only when
  every round agrees.
  """
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  out, steps = {}, {}
  for name, with_losses in (("ce_only", False), ("ce_gini_kl", True)):
    program = benchmarking.app_program(model, batch, dtype, with_losses)
    state = program.init_state(0)
    images = benchmarking.app_batch(program)
    executable, compile_s = benchmarking.compiled(program.train_step, state, images)
    steps[name] = benchmarking.stepper(executable, state, images)
    out[name] = {"train_compile_s": compile_s,
                 "train_gflop_per_step": benchmarking.model_gflop(program)}
  if vmap_seeds:
    from discrim_jax import seed_groups  # pylint: disable=g-import-not-at-top
    group = seed_groups.VmappedSeeds(
        program, list(range(vmap_seeds)),
        [program.init_state(s) for s in range(vmap_seeds)])
    images = benchmarking.app_batch(program, seeds=vmap_seeds)
    executable, compile_s = benchmarking.compiled(group.train_step,
                                                  group.state, images)
    steps["vmapped"] = benchmarking.stepper(executable, group.state, images)
    out["vmapped"] = {"seeds": vmap_seeds, "train_compile_s": compile_s}
  rounds = benchmarking.interleaved_round_rates(
      {**steps, **(others or {})}, batch, timing)
  if vmap_seeds:  # each vmapped call trains vmap_seeds models on a batch each
    rounds["vmapped"] = [vmap_seeds * r for r in rounds["vmapped"]]
  for name, rates in rounds.items():
    out.setdefault(name, {}).update(train_images_per_s=statistics.median(rates),
                                    train_images_per_s_rounds=rates)
  if vmap_seeds:
    spread = benchmarking.round_ratios(
        [r / vmap_seeds for r in rounds["vmapped"]], rounds["ce_gini_kl"])
    out["vmapped"]["per_seed_vs_single"] = spread["median"]
    out["vmapped"]["per_seed_vs_single_spread"] = spread
  state = program.init_state(0)
  eval_batch = benchmarking.app_batch(program)
  executable, out["eval_compile_s"] = benchmarking.compiled(program.eval_step, state, eval_batch)

  def evaluate():
    jax.block_until_ready(executable(state, eval_batch))
  out["eval_images_per_s"] = benchmarking.interleaved_rates(
      {"eval": evaluate}, batch, timing)["eval"]
  ratio = benchmarking.round_ratios(rounds["ce_only"], rounds["ce_gini_kl"])
  out["loss_overhead_spread"] = {k: v - 1 if k != "rounds" else v
                                 for k, v in ratio.items()}
  out["loss_overhead"] = out["loss_overhead_spread"]["median"]
  full = out["ce_gini_kl"]
  full["train_tflop_per_s"] = (
      full["train_gflop_per_step"] * full["train_images_per_s"] / batch / 1e3)
  if _PEAK.value:
    full["mfu"] = full["train_tflop_per_s"] / _PEAK.value
  return out


def bench_levers(model, batch, timing):
  """The model's CE step under each of ``LEVERS``, timed side by side."""
  lowered, programs, images = {}, {}, {}
  for barriers in (False, True):
    programs[barriers] = benchmarking.app_program(
        model, batch, "float32", False, xla_cpu_ynn_fusion="",
        xla_cpu_fusion_barriers=barriers)
    state = programs[barriers].init_state(0)
    images[barriers] = benchmarking.app_batch(programs[barriers])
    lowered[barriers] = programs[barriers].train_step.lower(
        state, images[barriers])
  steps, compile_s = {}, {}
  for name, (barriers, options) in LEVERS.items():
    executable, compile_s[name] = benchmarking.compile_lowered(
        lowered[barriers], options)
    # Each executable donates its input state: give each its own copy.
    steps[name] = benchmarking.stepper(executable, programs[barriers].init_state(0),
                           images[barriers])
  rates = benchmarking.interleaved_rates(steps, batch, timing)
  base = rates["XLA defaults"]
  return {name: {"fusion_barriers": LEVERS[name][0],
                 "options": LEVERS[name][1], "train_images_per_s": rate,
                 "speedup": rate / base, "compile_s": compile_s[name]}
          for name, rate in rates.items()}


def main(argv):
  del argv
  batch = _BATCH.value
  timing = benchmarking.Timing(_WARMUP.value, _ROUNDS.value, _STEPS.value)
  import jax  # pylint: disable=g-import-not-at-top
  results = {"batch_size": batch, "rounds": _ROUNDS.value,
             "steps_per_round": _STEPS.value,
             "device": str(jax.devices()[0].device_kind), "cpus": benchmarking.cpus(), "cpu": benchmarking.cpu_model(),
             "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "models": {}}
  first, *others = _DTYPES.value
  runs = [(m, first) for m in _MODELS.value]
  runs += [(m, d) for d in others for m in _MODELS.value if m in _BF16_MODELS.value]
  for model, dtype in runs:
    key = model if dtype == "float32" else f"{model} ({dtype})"
    torch_child = (torch_reference.TorchChild(batch, _WARMUP.value)
                   if key == "resnet18" and _TORCH.value else None)
    others = {"torch": torch_child.step} if torch_child else None
    vmap = (_VMAP_SEEDS.value if dtype == first and model in _VMAP_MODELS.value
            else 0)
    r = results["models"][key] = dict(dtype=dtype, **bench_jax(
        model, batch, dtype, timing, others, vmap))
    if torch_child:
      torch_child.close()
      results["torch_resnet18"] = dict(torch_child.meta, **r.pop("torch"))
      spread = benchmarking.round_ratios(
          r["ce_only"]["train_images_per_s_rounds"],
          results["torch_resnet18"]["train_images_per_s_rounds"])
      results["jax_over_torch_resnet18"] = spread["median"]
      results["jax_over_torch_resnet18_spread"] = spread
    print(f"{key}: {json.dumps(r)}", flush=True)
  if _LEVERS.value:
    results["levers"] = {m: bench_levers(m, batch, timing)
                         for m in _LEVER_MODELS.value}
    print(f"levers: {json.dumps(results['levers'])}", flush=True)
  r18 = results["models"].get("resnet18")
  if _INPUT.value:
    from discrim_jax.data import measure_throughput  # pylint: disable=g-import-not-at-top
    results["input_images_per_s"] = {
        "fashion_mnist": measure_throughput("fashion_mnist", batch, 200)}
    if r18:
      spread = benchmarking.spread(
          results["input_images_per_s"]["fashion_mnist"] / rate
          for rate in r18["ce_gini_kl"]["train_images_per_s_rounds"])
      results["input_over_resnet18_step"] = spread["median"]
      results["input_over_resnet18_step_spread"] = spread
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  if "peak_bytes_in_use" in stats:
    results["peak_device_gib"] = stats["peak_bytes_in_use"] / 2**30
  _print_tables(results)
  benchmarking.write(results, _OUT.value)


def _print_tables(results):
  """Markdown tables and the three targets of the benchmark."""
  print()
  print(f"Batch {results['batch_size']}, {results['cpus']} CPUs "
        f"({results['device']}; {results['cpu']}), JAX {results['jax']}, "
        f"XLA_FLAGS={results['xla_flags'] or '(none)'}; medians of "
        f"{results['rounds']} x {results['steps_per_round']} timed steps")
  print()
  print("| model | train img/s, CE | train img/s, CE+Gini+KL | loss overhead [min, max over rounds] "
        "| eval img/s | compile s (train) | model TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for model, r in results["models"].items():
    full = r["ce_gini_kl"]
    mfu = f"{100 * full['mfu']:.1f}%" if "mfu" in full else "(--peak_tflops)"
    print(f"| {model} | {r['ce_only']['train_images_per_s']:.1f} "
          f"| {full['train_images_per_s']:.1f} "
          f"| {100 * r['loss_overhead']:+.1f}% "
          f"[{100 * r['loss_overhead_spread']['min']:+.1f}, "
          f"{100 * r['loss_overhead_spread']['max']:+.1f}] "
          f"| {r['eval_images_per_s']:.1f} "
          f"| {full['train_compile_s']:.1f} | {full['train_tflop_per_s']:.3f} "
          f"| {mfu} |")
  if "torch_resnet18" in results:
    t = results["torch_resnet18"]
    print(f"| resnet18, PyTorch {t['version']} channels-last "
          f"| {t['train_images_per_s']:.1f} | | | | | | |")
  for model, r in results["models"].items():
    if "vmapped" in r:
      v = r["vmapped"]
      print(f"{model}: {v['seeds']} seeds vmapped, "
            f"{v['train_images_per_s'] / v['seeds']:.1f} img/s per seed vs "
            f"{r['ce_gini_kl']['train_images_per_s']:.1f} for one seed alone "
            f"({benchmarking.describe(v['per_seed_vs_single_spread'])}; "
            "vmapping pays here: "
            f"{benchmarking.verdict(v['per_seed_vs_single_spread'], 1.0)})")
  for model, levers in results.get("levers", {}).items():
    print()
    print(f"| {model} CE step: barriers, XLA:CPU options | img/s | vs XLA defaults |")
    print("|---|---|---|")
    for name, r in levers.items():
      print(f"| {name} | {r['train_images_per_s']:.1f} | {r['speedup']:.2f}x |")
  print()
  for line in target_lines(results):
    print(line)
  print(f"Peak host memory (max RSS): {results['peak_rss_gib']:.2f} GiB")
  if "peak_device_gib" in results:
    print(f"Peak device memory (all steps of the run): "
          f"{results['peak_device_gib']:.2f} GiB")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)


def target_lines(results) -> list[str]:
  """The benchmark's targets, each with its per-round spread and a verdict
  the spread allows ("inconclusive: machine noisy" when rounds disagree)."""
  lines = []
  r18 = results["models"].get("resnet18")
  if r18:
    overhead = r18["loss_overhead_spread"]
    lines.append("Target, loss overhead <= 2% of the ResNet-18 step: "
                 + benchmarking.describe(overhead, "+.1f", 100, "%") + ": "
                 + benchmarking.verdict(overhead, 0.02, at_most=True))
  if "input_over_resnet18_step_spread" in results:
    ratio = results["input_over_resnet18_step_spread"]
    lines.append(
        "Target, input pipeline >= 10x the ResNet-18 step's consumption: "
        f"{results['input_images_per_s']['fashion_mnist']:,.0f} images/s = "
        + benchmarking.describe(ratio, ",.0f", suffix="x") + ": "
        + benchmarking.verdict(ratio, 10))
  if "jax_over_torch_resnet18_spread" in results:
    ratio = results["jax_over_torch_resnet18_spread"]
    lines.append("Target, JAX >= PyTorch on the ResNet-18 step: JAX/PyTorch = "
                 + benchmarking.describe(ratio) + ": "
                 + benchmarking.verdict(ratio, 1))
  return lines

