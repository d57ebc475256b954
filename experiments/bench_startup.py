r"""Start-up at 224 px: from process start to the first train step, cold and
warm.

    python experiments/bench_startup.py --models=resnet50,cvt13 --out=startup.json

For each model, two fresh processes build the app's program (ImageNet stem,
224x224x3 synthetic images, 1000 classes, CE+Gini+KL, batch
``--batch_size``) and run one train step: the first with an empty persistent
compilation cache (cold: a new machine, or a changed program), the second
with the cache the first filled (warm: a rerun or resume). Each process
reports its phases, seconds since the interpreter started:

* ``imports``: JAX, Flax and the app's modules;
* ``build``: ``runtime.build_from_config`` (model init traced, shapes, shardings);
* ``trace``: ``jax.jit(...).trace`` of the train step (Python tracing);
* ``lower``: lowering to StableHLO;
* ``compile``: XLA's passes and code generation, or the cache's load;
* ``first_step``: running it once.

``--xla_knob`` measures the cold compile again with one XLA flag set (e.g.
``--xla_knob=--xla_backend_optimization_level=1``), to see what a knob buys.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_MODELS = flags.DEFINE_list("models", ["resnet50", "cvt13"], "Models.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Image side.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON record.")
_KNOBS = flags.DEFINE_list("xla_knob", [], "XLA_FLAGS to measure a cold "
                           "compile with, one run each.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, time
start = float(sys.argv[4])
marks = {}
def mark(name):
  marks[name] = time.time() - start
import jax
from discrim_jax import benchmarking, runtime
from discrim_jax.data.synthetic import SyntheticDataset
jax.config.update("jax_compilation_cache_dir", sys.argv[3])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
mark("imports")
model, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[5])
config = benchmarking.app_config(model, batch, "float32", True, size,
                                 num_devices=1)
program = runtime.build_from_config(config, dataset=SyntheticDataset(
    num_classes=1000, image_shape=(size, size, 3), num_examples=batch))
state = program.init_state(0)
images = benchmarking.app_batch(program)
jax.block_until_ready(state)
mark("build")
traced = program.train_step.trace(state, images)
mark("trace")
lowered = traced.lower()
mark("lower")
executable = lowered.compile()
mark("compile")
jax.block_until_ready(executable(state, images))
mark("first_step")
print(json.dumps(marks))
"""


def measure(model: str, batch: int, size: int, cache: str,
            xla_flags: str = "") -> dict:
  """The phases of one fresh process (see the module docstring)."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  result = subprocess.run(
      [sys.executable, "-c", _CHILD, model, str(batch), cache,
       repr(time.time()), str(size)],
      capture_output=True, text=True, env=env, check=False,
      cwd=REPO)  # `python -c` puts the working folder first on sys.path
  if result.returncode:
    raise RuntimeError(f"{model}: {result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def phases(marks: dict) -> dict:
  """Seconds each phase took (the marks are cumulative)."""
  out, last = {}, 0.0
  for name, t in marks.items():
    out[name] = t - last
    last = t
  out["total"] = last
  return out


def main(argv):
  del argv
  from discrim_jax import benchmarking  # pylint: disable=g-import-not-at-top
  record = {"cpu": benchmarking.cpu_model(), "cpus": benchmarking.cpus(),
            "batch_size": _BATCH.value, "image_size": _IMAGE.value,
            "models": {}}
  for model in _MODELS.value:
    with tempfile.TemporaryDirectory() as cache:
      cold = measure(model, _BATCH.value, _IMAGE.value, cache)
      warm = measure(model, _BATCH.value, _IMAGE.value, cache)
    runs = {"cold": phases(cold), "warm": phases(warm)}
    for knob in _KNOBS.value:
      with tempfile.TemporaryDirectory() as cache:
        runs[f"cold, XLA_FLAGS={knob}"] = phases(
            measure(model, _BATCH.value, _IMAGE.value, cache, knob))
    record["models"][model] = runs
    for kind, p in runs.items():
      print(f"{model} {kind}: " + ", ".join(f"{k} {v:.1f} s" for k, v in p.items()),
            flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  from discrim_jax.cli import parse_flags  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
