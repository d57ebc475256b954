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
from discrim_jax import runtime
from discrim_jax import run_spec
from discrim_jax import step_fns
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
    program = runtime.build_from_config(
        smoke_config(xla_cpu_fusion_barriers=barriers), dataset=dataset)
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
    program = runtime.build_from_config(config, dataset=fashion)
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
  program = runtime.build_from_config(config, dataset=SyntheticDataset(
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
program = runtime.build_from_config(config, dataset=dataset)
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
  program = runtime.build_from_config(config, dataset=dataset, devices=devices)
  assert list(program.mesh.devices.flat) == devices
  config.num_devices = 1
  program = runtime.build_from_config(config, dataset=dataset, devices=devices)
  assert list(program.mesh.devices.flat) == devices[:1]


def test_a_second_build_of_the_same_steps_reuses_them(smoke_config):
  """Another seed, cadence or run of the same steps reuses their jitted
  functions (no new trace); a change the steps depend on does not."""
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  first = runtime.build_from_config(smoke_config(), dataset=dataset)
  again = runtime.build_from_config(
      smoke_config(seed=3, log_every_steps=1, keep_checkpoints=1),
      dataset=dataset)
  assert again.train_step is first.train_step
  assert again.init_state is first.init_state and again.spec.seed == 3
  other = runtime.build_from_config(smoke_config(**{"optimizer.lr": 0.05}),
                                    dataset=dataset)
  assert other.train_step is not first.train_step
  # The same spec on other data (another number of steps per epoch): new steps.
  bigger = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                            num_examples=128)
  assert runtime.build_from_config(
      smoke_config(), dataset=bigger).train_step is not first.train_step
  # The checks of a build still run (a layer the model lacks).
  with pytest.raises(runtime.ConfigError, match="stage9"):
    runtime.build_from_config(smoke_config(**{"loss.layers": ("stage9",)}),
                              dataset=dataset)
  # build itself reads a resolved spec only; a raw config is named as such.
  with pytest.raises(TypeError,
                     match="RunSpec, got ConfigDict.*build_from_config"):
    runtime.build(smoke_config(), dataset=dataset)


def test_a_build_traces_the_model_init_once_for_the_state_and_once_per_model(
    smoke_config):
  """A build takes the state's shapes from the jitted initialiser's own trace,
  which its first call reuses (the model's init was traced a second time for
  the shapes, 0.3-0.5 s at 224 px); the features' shapes of a model are
  traced once for the builds that differ only in what the steps do (another
  learning rate, another objective)."""
  traces = []

  def listen(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traces.append(kwargs.get("fun_name"))

  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    # Learning rates no other test builds: new steps, not cached ones.
    program = runtime.build_from_config(
        smoke_config(**{"optimizer.lr": 0.0123}), dataset=dataset)
    state = program.init_state(0)
    assert traces.count("init_state") == 1, traces
    traces.clear()
    for objective in ("gini_kl", "ce"):
      runtime.build_from_config(smoke_config(
          objective=objective, **{"optimizer.lr": 0.0124}), dataset=dataset)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  # The same model: nothing traced but each build's initialiser.
  assert traces == ["init_state", "init_state"], traces
  chex.assert_trees_all_equal_shapes_and_dtypes(
      state, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                          program.abstract_state))
  assert all(a.sharding == s for a, s in zip(
      jax.tree.leaves(state), jax.tree.leaves(program.state_sharding)))


def test_a_batch_larger_than_the_training_split_fails_before_compiling(
    smoke_config, monkeypatch):
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=48)

  def compiled(*args, **kwargs):
    raise AssertionError("the steps were built before the batch was checked")

  monkeypatch.setattr(step_fns, "feature_shapes", compiled)
  with pytest.raises(runtime.ConfigError,
                     match=r"batch_size=64 exceeds the 48 training examples"
                           r".*use at most 48 \(--config.batch_size=...\)"):
    runtime.build_from_config(smoke_config(), dataset=dataset)


def test_the_initialisers_draw_the_same_bits_at_llvm_level_1():
  """On CPU the state's initialiser compiles at LLVM's level 1 (it runs once
  a run, and its compile was most of a cold build): every kind of draw the
  models and the centre loss make (ResNet's fan-out normal, CvT's truncated
  normal, Dense layers' LeCun normal, the centres' normal, each from a key
  of its own) gives the same bits as at XLA's default level.
  (Checked on the whole state of 9 configs when this was introduced; here
  the kernels those states are made of, which compile in a second where
  a model's whole initialiser takes ten.) The suite's
  JAX_DISABLE_MOST_OPTIMIZATIONS, under which the app leaves the
  initialiser's options alone, is lifted for both compiles."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  kinds = [nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
           nn.initializers.truncated_normal(stddev=0.02),
           nn.initializers.lecun_normal(),
           lambda key, shape: jax.random.normal(key, shape)]

  def draws(seed):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), 4)
    return [init(k, (3, 3, 16, 32)) for init, k in zip(kinds, keys)]

  disabled = jax.config.read("jax_disable_most_optimizations")
  assert runtime.init_compiler_options("cpu") == (
      {} if disabled else {"xla_backend_optimization_level": 1})
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    options = runtime.init_compiler_options("cpu")
    assert options == {"xla_backend_optimization_level": 1}
    assert runtime.init_compiler_options("gpu") == {}
    lowered = jax.jit(draws).lower(0)
    level_1 = lowered.compile(compiler_options=options)(0)
    default = lowered.compile()(0)
  finally:
    jax.config.update("jax_disable_most_optimizations", disabled)
  assert len(level_1) == 4
  # Sensitive: at level 0 about 5% of these draws differ in their last bits.
  for a, b in zip(level_1, default):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                  np.asarray(b).view(np.uint32))
