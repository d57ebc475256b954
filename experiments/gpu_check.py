r"""The GPU check: one short script for a lent accelerator, one JSON record.

    python experiments/gpu_check.py --out=gpu_check.json

measures, in about 8 minutes on one GPU (synthetic ImageNet-sized data, no
TensorFlow needed):

* ResNet-50 at 224 px (ImageNet stem, bf16 compute, batch 256): train
  images/s with CE+Gini+KL and with CE alone, timed side by side in
  alternating rounds; the loss overhead with its per-round spread; model
  TFLOP/s and MFU against the device's peak (``--peak_tflops``, default from
  the device kind when known: H100 / H200 989 dense bf16);
* CvT-13 at 224 px (bf16): compile seconds and train images/s;
* whether ResNet-50 reaches the target of 8,000 images/s per GPU (called
  "met" only when every round does; "inconclusive: machine noisy" when the
  rounds disagree).

Each part is written to the JSON as soon as it is measured, so a run cut
short keeps what it finished. ``--tiny`` runs the same code on a CPU at a
size of seconds (32 px, width 1/8, batch 8): the suite runs it so that the
script cannot rot.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

if __package__ in (None, ""):  # run as a script: the repository on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from discrim_jax import benchmarking  # pylint: disable=g-import-not-at-top
from discrim_jax.cli import parse_flags  # pylint: disable=g-import-not-at-top

# Dense bf16 peak TFLOP/s by device kind (datasheets).
PEAK_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0,
               "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0}
TARGET_IMAGES_PER_S = 8000.0


def settings(tiny: bool) -> dict:
  """What is measured: the full size, or the tiny CPU size of the suite."""
  if tiny:
    # One block per stage: the same code and every kind of layer, at a
    # fraction of the full depth's compile time.
    return dict(image_size=32, batch=8, width=0.125, dtype="float32",
                rounds=2, steps_per_round=1, warmup=1,
                depth={"resnet50": {"stage_sizes": (1, 1, 1, 1)},
                       "cvt13": {"depths": (1, 1, 1)}})
  return dict(image_size=224, batch=256, width=1.0, dtype="bfloat16",
              rounds=5, steps_per_round=10, warmup=2, depth={})


def _program(model, s, with_losses):
  """The app's program for ``model`` at the size ``s``, on one device."""
  return benchmarking.app_program(
      model, s["batch"], s["dtype"], with_losses, image_size=s["image_size"],
      num_classes=1000, width_multiplier=s["width"], num_devices=1,
      model_kwargs=s["depth"].get(model, {}))


def resnet50(s, timing, peak: float) -> dict:
  """CE+Gini+KL and CE-only steps side by side; overhead, MFU, target."""
  steps, out = {}, {}
  for name, with_losses in (("ce_gini_kl", True), ("ce_only", False)):
    program = _program("resnet50", s, with_losses)
    state = program.init_state(0)
    images = benchmarking.app_batch(program)
    executable, compile_s = benchmarking.compiled(program.train_step, state,
                                                  images)
    steps[name] = benchmarking.stepper(executable, state, images)
    out[name] = {"compile_s": compile_s,
                 "gflop_per_step": benchmarking.model_gflop(program)}
  rounds = benchmarking.interleaved_round_rates(steps, s["batch"], timing)
  for name, rates in rounds.items():
    out[name].update(images_per_s=statistics.median(rates),
                     images_per_s_rounds=rates)
  ratio = benchmarking.round_ratios(rounds["ce_only"], rounds["ce_gini_kl"])
  out["loss_overhead"] = {k: (v - 1 if k != "rounds" else v)
                          for k, v in ratio.items()}
  full = out["ce_gini_kl"]
  full["tflop_per_s"] = full["gflop_per_step"] * full["images_per_s"] / s["batch"] / 1e3
  if peak:
    full["mfu"] = full["tflop_per_s"] / peak
  rates = benchmarking.spread(rounds["ce_gini_kl"])
  out["target"] = {"images_per_s": TARGET_IMAGES_PER_S, "rounds": rates,
                   "verdict": benchmarking.verdict(rates, TARGET_IMAGES_PER_S)}
  return out


def cvt13(s, timing) -> dict:
  """CvT-13's CE+Gini+KL step: compile seconds and images/s."""
  program = _program("cvt13", s, True)
  state = program.init_state(0)
  images = benchmarking.app_batch(program)
  executable, compile_s = benchmarking.compiled(program.train_step, state, images)
  rates = benchmarking.interleaved_round_rates(
      {"cvt13": benchmarking.stepper(executable, state, images)}, s["batch"],
      timing)["cvt13"]
  return {"compile_s": compile_s, "images_per_s": statistics.median(rates),
          "images_per_s_rounds": rates}


def run(tiny: bool, out: str | None, peak_tflops: float = 0.0) -> dict:
  """Measures every part, writing ``out`` after each; returns the record."""
  import jax  # pylint: disable=g-import-not-at-top
  s = settings(tiny)
  timing = benchmarking.Timing(s["warmup"], s["rounds"], s["steps_per_round"])
  device = jax.devices()[0]
  peak = peak_tflops or PEAK_TFLOPS.get(device.device_kind, 0.0)
  record = {"device": device.device_kind, "platform": device.platform,
            "cpu": benchmarking.cpu_model(), "jax": jax.__version__,
            "settings": s, "peak_tflops": peak or None}
  start = time.time()
  for name, part in (("resnet50", lambda: resnet50(s, timing, peak)),
                     ("cvt13", lambda: cvt13(s, timing))):
    t = time.time()
    record[name] = part()
    record[name]["wall_s"] = time.time() - t
    record["wall_s"] = time.time() - start
    if out:
      with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{name}: {json.dumps(record[name])}", flush=True)
  return record


def main(argv):
  del argv
  record = run(_TINY.value, _OUT.value, _PEAK.value)
  r = record["resnet50"]
  print(f"ResNet-50 at {record['settings']['image_size']} px: "
        f"{r['ce_gini_kl']['images_per_s']:,.0f} img/s with CE+Gini+KL; loss "
        "overhead " + benchmarking.describe(r["loss_overhead"], "+.1f", 100, "%")
        + f"; target {TARGET_IMAGES_PER_S:,.0f} img/s: {r['target']['verdict']}")
  print(f"CvT-13: compile {record['cvt13']['compile_s']:.0f} s, "
        f"{record['cvt13']['images_per_s']:,.0f} img/s")


if __name__ == "__main__":
  _TINY = flags.DEFINE_bool("tiny", False, "The suite's CPU size (seconds).")
  _OUT = flags.DEFINE_string("out", "gpu_check.json", "The JSON record.")
  _PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s for MFU (0: "
                             "from the device kind when known).")
  app.run(main, flags_parser=parse_flags)
