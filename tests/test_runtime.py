"""Building a program from a spec: the steps every config compiles, the XLA
options and fusion barriers applied once, the devices of the mesh."""

import os
from pathlib import Path
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from discrim_jax import models
from discrim_jax import optim
from discrim_jax import runtime
from discrim_jax import run_spec
from discrim_jax.data.synthetic import SyntheticDataset
from discrim_jax.models import common
from experiments.configs import caltech101 as caltech101_config
from experiments.configs import cifar100 as cifar100_config

REPO = Path(__file__).resolve().parents[1]
# Worst-case relative rounding of a float32 sum of n ~ 5e4 terms: the first
# step's metrics sum up to 64 x 28 x 28 terms (BatchNorm statistics, the loss
# layer's class sums), each rounding by at most 2**-24 relative.
FLOAT32_FIRST_STEP_RTOL = 5e4 * 2.0**-24


def test_fusion_barrier_switch_is_applied_once_by_build(smoke_config):
  """config.xla_cpu_fusion_barriers reaches the traced step (a while loop per
  barrier on CPU) through runtime.build alone."""
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  loops = {}
  for barriers in (True, False):
    program = runtime.build(smoke_config(xla_cpu_fusion_barriers=barriers),
                          dataset=dataset)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         dataset.batch(64))
    text = program.train_step.lower(program.abstract_state, batch).as_text()
    loops[barriers] = text.count("stablehlo.while")
    # Named after the step (in profiles and compile logs), not the wrapper.
    assert text.startswith("module @jit_train_step"), text[:80]
  assert loops[False] == 0 and loops[True] > 0
  # The switch is the trace-time context in models.common, on by default.
  x = jax.numpy.ones(3)
  with common.fusion_barriers(False):
    assert common.fusion_barrier(x) is x
  assert common.fusion_barrier(x) is not x


def _ynn_fusions(hlo):
  """The op names of the fusions XLA:CPU handed to YNNPACK."""
  return [line.split("op_name=")[-1] for line in hlo.splitlines()
          if "kind=kCustom" in line and "__ynn_fusion" in line]


def test_ynn_fusion_reaches_the_compiled_step_and_keeps_the_numbers(fashion,
                                                                    smoke_config):
  assert run_spec.compiler_options(smoke_config(), "gpu") == {}
  assert run_spec.compiler_options(smoke_config(xla_cpu_ynn_fusion=""), "cpu") == {}
  runs = {}
  for kinds in ("dot,reduce", "dot", ""):
    config = smoke_config(xla_cpu_ynn_fusion=kinds)
    program = runtime.build(config, dataset=fashion)
    state = program.init_state(config.seed)
    batch = next(program.batches("train", train=True))
    hlo = program.train_step.lower(state, batch).compile().as_text()
    runs[kinds] = _ynn_fusions(hlo), jax.device_get(program.train_step(state, batch)[1])
  # BatchNorm's and the losses' reductions go to YNNPACK only when asked for,
  # and the convolutions don't (XLA's own kernels are faster on CPU).
  assert any("reduce_sum" in op for op in runs["dot,reduce"][0])
  assert not any("reduce_sum" in op for op in runs["dot"][0])
  assert not any("conv_general_dilated" in op
                 for kinds in ("dot,reduce", "dot") for op in runs[kinds][0])
  # One step's numbers with other reduction kernels: the same mathematics, so
  # they agree to the worst-case rounding of the step's float32 sums.
  for other in ("", "dot"):
    chex.assert_trees_all_close(runs["dot,reduce"][1], runs[other][1],
                                rtol=FLOAT32_FIRST_STEP_RTOL,
                                atol=FLOAT32_FIRST_STEP_RTOL)


@pytest.mark.parametrize("config_file,shape,num_classes", [
    ("cifar100", (32, 32, 3), 100), ("caltech101", (224, 224, 3), 102)])
@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_paper_config_builds_its_first_step(config_file, shape, num_classes,
                                                  model):
  """Traces and lowers the first train step of each paper config (no compile:
  full-size models would take minutes each on 2 cores)."""
  module = cifar100_config if config_file == "cifar100" else caltech101_config
  config = module.get_config(f"model={model},objective=gini_kl")
  config.unlock()
  config.num_devices = 1
  program = runtime.build(config, dataset=SyntheticDataset(
      num_classes=num_classes, image_shape=shape, num_examples=config.batch_size))
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *shape), np.float32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32),
           "mask": jax.ShapeDtypeStruct((config.batch_size,), np.float32)}
  lowered = program.train_step.lower(program.abstract_state, batch)
  _, metrics = lowered.out_info
  layer = config.loss.layers[0]
  assert {f"gini/{layer}", f"kl/{layer}", "ce", "loss"} <= set(metrics)


_WITHOUT_TENSORFLOW = r'''
import sys

class Block:  # as if TensorFlow, TFDS and CLU (which imports TF) were absent
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
      raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
from discrim_jax import data, runtime
from discrim_jax.data.synthetic import SyntheticDataset
from experiments.configs import fashion_mnist

config = fashion_mnist.get_config("smoke")
config.num_devices = 1
dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1), num_examples=64)
program = runtime.build(config, dataset=dataset)
batch = data.to_global_batch(dataset.batch(64), program.batch_sharding)
_, metrics = program.train_step(program.init_state(0), batch)
print("loss", float(metrics["loss"]))
try:
  data.Dataset("cifar100")
except ImportError as e:
  print("error:", e)
'''


def test_steps_run_without_tensorflow():
  """Models, losses and the compiled steps need JAX alone (e.g. on an
  accelerator image): TensorFlow and CLU are imported only to read data and
  to write a run's metrics; reading data without them says what to install."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
  assert np.isfinite(float(lines["loss"])), result.stdout
  assert "needs tensorflow and tensorflow-datasets" in lines["error:"]
  assert "pip install -e ." in lines["error:"]


def test_build_on_given_devices(smoke_config):
  config = smoke_config(num_devices=-1)
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  devices = jax.devices()[2:4]
  program = runtime.build(config, dataset=dataset, devices=devices)
  assert list(program.mesh.devices.flat) == devices
  config.num_devices = 1
  program = runtime.build(config, dataset=dataset, devices=devices)
  assert list(program.mesh.devices.flat) == devices[:1]


def test_a_second_build_of_the_same_steps_reuses_them(smoke_config):
  """Another seed, cadence or run of the same steps reuses their jitted
  functions (no new trace); a change the steps depend on does not."""
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  first = runtime.build(smoke_config(), dataset=dataset)
  again = runtime.build(smoke_config(seed=3, log_every_steps=1,
                                     keep_checkpoints=1), dataset=dataset)
  assert again.train_step is first.train_step
  assert again.init_state is first.init_state and again.spec.seed == 3
  other = runtime.build(smoke_config(**{"optimizer.lr": 0.05}), dataset=dataset)
  assert other.train_step is not first.train_step
  # The same spec on other data (another number of steps per epoch): new steps.
  bigger = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                            num_examples=128)
  assert runtime.build(smoke_config(), dataset=bigger).train_step is not (
      first.train_step)
  # The checks of a build still run (a layer the model lacks).
  with pytest.raises(runtime.ConfigError, match="stage9"):
    runtime.build(smoke_config(**{"loss.layers": ("stage9",)}), dataset=dataset)


def test_the_initialiser_compiles_at_llvm_level_1_to_the_same_state(smoke_config):
  """On CPU the state's initialiser compiles at LLVM's level 1 (it runs once
  a run, and its compile was most of a cold build): the state equals the one
  XLA's default level makes, bit for bit, the optimiser's and the centre
  loss's parameters included. The suite's JAX_DISABLE_MOST_OPTIMIZATIONS,
  under which the app leaves the initialiser's options alone, is lifted
  for the build and both compiles."""
  config = smoke_config(objective="center+gini_kl", batch_size=16,
                        eval_batch_size=16, num_devices=1)
  disabled = jax.config.read("jax_disable_most_optimizations")
  assert runtime.init_compiler_options("cpu") == (
      {} if disabled else {"xla_backend_optimization_level": 1})
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    assert runtime.init_compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert runtime.init_compiler_options("gpu") == {}
    # 9 classes: a program no other test builds, so none is reused.
    program = runtime.build(config, dataset=SyntheticDataset(
        num_classes=9, image_shape=(28, 28, 1), num_examples=32))
    mine = program.init_state(0)
    default = jax.jit(program.init_state.__wrapped__)(0)
  finally:
    jax.config.update("jax_disable_most_optimizations", disabled)

  def raw(state):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x).tobytes() for x in jax.tree.leaves(state)]
  assert optim.AUX in mine.params  # the centres, drawn at random too
  assert raw(mine) == raw(default)
