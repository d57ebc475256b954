"""A run's program, built once from its :class:`~discrim_jax.run_spec.RunSpec`:
the data set, the model, a 1-D ``'data'`` mesh, the shardings (batch sharded,
state replicated, so that BatchNorm and the Gini/KL losses see the global
batch) and the jitted steps of ``discrim_jax.step_fns``.

:func:`build` gives a :class:`Program` of one model (of a raw config:
:func:`build_from_config`): what a run of one seed trains with, what the
benchmark times and what the tests check.
``discrim_jax.seed_groups`` wraps it to train several seeds under
``jax.vmap``.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Callable, Iterator
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from discrim_jax import data as data_lib
from discrim_jax import models
from discrim_jax import optim
from discrim_jax import run_spec as run_spec_lib
from discrim_jax import step_fns
from discrim_jax.config_lib import ConfigError
from discrim_jax.models import common


@dataclasses.dataclass
class Steps:
  """What :func:`build` jits, the same for every build of one key of
  ``_steps_key``: the mesh, the shardings and the jitted steps.
  ``train_fn``/``eval_fn`` are the steps before ``jax.jit`` (bound to the
  spec), for wrappers that transform them."""
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: NamedSharding
  abstract_state: Any
  train_fn: Callable[..., Any]
  eval_fn: Callable[..., Any]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  features_step: Callable[..., Any]
  init_state: Callable[[int], step_fns.TrainState]


@dataclasses.dataclass
class Program(Steps):
  """Everything built from a spec that the loop, the evaluation, the
  benchmark and the tests need: a run's :class:`Steps` and what else it has."""
  spec: run_spec_lib.RunSpec
  dataset: data_lib.Dataset
  model: Any
  steps_per_epoch: int
  total_steps: int

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  def jit(self, fn, **kwargs):
    """``jax.jit`` with the spec's XLA options."""
    return _jit(self.spec, fn, **kwargs)

  def local_batches(self, split: str, *, train: bool, start_step: int = 0,
                    seed: int | None = None):
    """This process's rows of each batch of a split, as NumPy arrays."""
    s = self.spec
    return data_lib.make_iterator(
        self.dataset, split, s.batch_size if train else s.eval_batch_size,
        train=train, seed=s.seed if seed is None else seed,
        start_step=start_step, normalize=s.normalize)

  def batches(self, split: str, *, train: bool, start_step: int = 0,
              seed: int | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global batches of a split for one seed (default: the spec's)."""
    for batch in self.local_batches(split, train=train, start_step=start_step,
                                    seed=seed):
      yield data_lib.to_global_batch(batch, self.batch_sharding)


def load_dataset(spec: run_spec_lib.RunSpec) -> data_lib.Dataset:
  """The data set a spec names: a :class:`discrim_jax.data.Dataset` read
  lazily into memory, or streamed (``config.data_in_memory=False``)."""
  try:
    if spec.data_in_memory:
      return data_lib.Dataset(spec.dataset, **spec.data_options)
    from discrim_jax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.StreamingDataset(spec.dataset, **spec.data_options)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def load_dataset_of(config) -> data_lib.Dataset:
  """:func:`load_dataset` of a config, resolved for the visible devices."""
  return load_dataset(run_spec_lib.resolve(config, jax.device_count()))


def create_model(spec, num_classes: int):
  try:
    return models.create_model(spec.model, num_classes=num_classes,
                               **spec.model_kwargs)
  except ValueError as e:
    raise ConfigError(f"{e} (--config.model_kwargs...)") from None


def build_from_config(config, *, dataset: data_lib.Dataset | None = None,
                      devices: list[jax.Device] | None = None) -> Program:
  """:func:`build` of ``config`` resolved for ``devices`` (default:
  ``jax.devices()``): ``run_spec.resolve`` then ``build``, in one call."""
  devices = list(jax.devices() if devices is None else devices)
  return build(run_spec_lib.resolve(config, len(devices), devices[0].platform),
               dataset=dataset, devices=devices)


def build(spec: run_spec_lib.RunSpec, *,
          dataset: data_lib.Dataset | None = None,
          devices: list[jax.Device] | None = None) -> Program:
  """The :class:`Program` of a resolved spec (``run_spec.resolve``; a raw
  config goes through :func:`build_from_config`).

  ``devices``: those of the mesh (default: ``jax.devices()``); the first
  ``spec.num_devices`` of them.
  """
  if not isinstance(spec, run_spec_lib.RunSpec):
    raise TypeError(f"runtime.build takes a RunSpec, got {type(spec).__name__}:"
                    " resolve it first, or call runtime.build_from_config")
  devices = list(jax.devices() if devices is None else devices)
  dataset = load_dataset(spec) if dataset is None else dataset
  spec.check_batch(dataset.num_examples("train"))  # before anything compiles
  model = create_model(spec, dataset.num_classes)
  image_shape = (1,) + tuple(dataset.image_shape)
  steps_per_epoch = data_lib.steps_per_epoch(dataset, spec.batch_size)
  devices = tuple(devices[:spec.num_devices])
  key = _steps_key(spec, dataset.num_classes, image_shape, steps_per_epoch,
                   devices)
  steps = _STEPS.pop(key, None)  # its layers were checked when first built
  if steps is None:
    steps = _compile_steps(spec, model, dataset.num_classes, image_shape,
                           steps_per_epoch, devices)
  _STEPS[key] = steps  # the most recently used last
  while len(_STEPS) > _MAX_CACHED_STEPS:
    _STEPS.pop(next(iter(_STEPS)))
  return Program(
      spec=spec, dataset=dataset, model=model, steps_per_epoch=steps_per_epoch,
      total_steps=spec.num_epochs * steps_per_epoch,
      **{f.name: getattr(steps, f.name) for f in dataclasses.fields(Steps)})


# Jitted steps of recent builds in this process, by what they are built from:
# a second build of the same run (another seed, a resumed run, the next run of
# a harness) reuses them instead of tracing and lowering them again (~3 s for
# the smallest model on a CPU). A few, since each holds its executables.
_STEPS: dict[str, Steps] = {}
_MAX_CACHED_STEPS = 8
# Fields of a RunSpec that the steps do not depend on: the seed enters
# init_state as its argument, the data only through the key's other parts.
_NOT_IN_STEPS = ("config", "seed", "data_options", "data_in_memory",
                 "normalize", "log_every_steps", "eval_every_epochs",
                 "keep_checkpoints", "checkpoint_every_steps")


def _steps_key(spec, num_classes, image_shape, steps_per_epoch, devices):
  fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
            if f.name not in _NOT_IN_STEPS}
  # The step functions themselves are part of the key (a test may patch one),
  # and so is x64, which changes what a trace gives.
  return repr((sorted(fields.items()), num_classes, image_shape,
               steps_per_epoch, devices, jax.config.jax_enable_x64,
               step_fns.train_step,
               step_fns.eval_step, step_fns.features_step, step_fns.init_fn))


def _compile_steps(spec, model, num_classes, image_shape, steps_per_epoch,
                   devices) -> Steps:
  shapes = step_fns.feature_shapes(model, image_shape)
  spec.check_layers(shapes, model.__class__.__name__)
  mesh = jax.make_mesh((spec.num_devices,), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  schedule = optim.create_schedule(spec, steps_per_epoch)
  tx = optim.create_optimizer(spec, schedule)
  init_state = step_fns.init_fn(
      model, tx, image_shape, jnp.dtype(model.dtype), step_fns.aux_init_fn(
          spec.objective.baselines, shapes, num_classes))
  replicated = NamedSharding(mesh, P())
  init_state = jax.jit(init_state, out_shardings=replicated,
                       compiler_options=init_compiler_options(
                           devices[0].platform))
  # The state's shapes from the jitted initialiser's own trace, which its
  # first call reuses: the model's init is traced once there, not twice
  # (0.3-0.5 s each for ResNet-50 and CvT-13 at 224 px on a CPU).
  shapes_of_state = init_state.eval_shape(0)
  state_sharding = jax.tree.map(lambda _: replicated, shapes_of_state)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes_of_state, state_sharding)
  fns = _bound_steps(spec, model, num_classes, schedule, steps_per_epoch)
  batch_sharding = NamedSharding(mesh, P("data"))
  jit = functools.partial(_jit, spec,
                          in_shardings=(state_sharding, batch_sharding))
  return Steps(
      mesh=mesh, state_sharding=state_sharding,
      batch_sharding=batch_sharding, abstract_state=abstract_state,
      train_fn=fns["train"], eval_fn=fns["eval"],
      train_step=jit(fns["train"], out_shardings=(state_sharding, replicated),
                     donate_argnums=0),
      eval_step=jit(fns["eval"], out_shardings=replicated),
      features_step=jit(fns["features"], out_shardings=replicated),
      init_state=init_state)


def _jit(spec, fn, **kwargs):
  return jax.jit(fn, compiler_options=spec.compiler_options, **kwargs)


def init_compiler_options(platform: str) -> dict[str, Any]:
  """XLA options for the state's initialiser. On CPU, LLVM at level 1: the
  initialiser (a random draw per parameter, each its own kernel) runs once
  a run, and its compile was most of a cold build; at level 1 a cold build
  of ResNet-50 or CvT-13 at 224 px is 1-2 s shorter
  (experiments/results/startup/), while the state it makes is the default
  level's bit for bit (checked on the whole state of 9 configs; the draws it
  is made of, in tests/test_runtime.py; at level 0, 4% of ResNet-50's
  initial weights differ by up to 4 ulps, so level 0 is not used). None
  where JAX already turns most optimisations off
  (JAX_DISABLE_MOST_OPTIMIZATIONS, as the tests do), which an explicit level
  would undo."""
  if platform != "cpu" or jax.config.read("jax_disable_most_optimizations"):
    return {}
  return {"xla_backend_optimization_level": 1}


def _bound_steps(spec, model, num_classes, schedule, steps_per_epoch):
  """The step functions of ``step_fns`` with the spec's values bound, behind
  the CPU fusion barriers' switch (``models.common``), applied here once."""
  o = spec.objective
  bound = {
      "train": functools.partial(
          step_fns.train_step, model=model, num_classes=num_classes,
          gini_weights=o.gini_weights, kl_weights=o.kl_weights,
          aux_start_step=int(o.start_epoch * steps_per_epoch),
          schedule=schedule, baselines=o.baselines),
      "eval": functools.partial(step_fns.eval_step, model=model,
                                num_classes=num_classes, layers=o.layers),
      "features": functools.partial(
          step_fns.features_step, model=model, num_classes=num_classes,
          loss_layers=o.layers, layers=spec.representation_layers)}
  return {k: common.with_fusion_barriers(f, spec.fusion_barriers)
          for k, f in bound.items()}
