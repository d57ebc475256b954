"""The losses under every way users split a batch over devices: ``jax.jit``
on meshes with Explicit or Auto axes, and ``axis_name`` inside
``jax.shard_map`` and ``jax.pmap`` (4 fake devices, class counts that differ
per device, a class absent on three of them).

Tolerances: each sharded value sums the same float32 terms as the
one-device value, in another order. A float32 sum of n terms carries a
relative rounding error of at most about n * 2**-24 (6e-8 per term); the
batch here has 16 examples, so the sums differ by at most ~1e-6 relative,
and the few well-conditioned operations after them (divisions, one log)
keep that order. ``RTOL = 1e-5`` is ten times that bound on any x86-64 CPU.
Gradients are compared with an absolute bound of ``RTOL`` times the largest
gradient entry, since an entry that nearly cancels has no useful relative
error.
"""

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from discrim_jax import baseline_losses as bl
from discrim_jax import losses

RTOL = 1e-5
DEVICES = 4
NUM_CLASSES = 5
# Per device (4 examples each): class 3 only on device 2; device 1 one class.
LABELS = np.array([0, 0, 1, 2, 0, 0, 0, 0, 1, 3, 3, 1, 2, 2, 2, 0], np.int32)


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3, 6)).astype(np.float32)
  w = rng.normal(size=(6, 6)).astype(np.float32)
  centers = rng.normal(size=(NUM_CLASSES, 6)).astype(np.float32)
  return x, w, centers


def _losses(axis_name):
  """name -> loss(features, labels) over the batch along ``axis_name``."""
  centers = _inputs()[2]
  return {
      "gini": functools.partial(losses.gini_loss, num_classes=NUM_CLASSES,
                                axis_name=axis_name),
      "kl": functools.partial(losses.kl_loss, num_classes=NUM_CLASSES,
                              axis_name=axis_name),
      "gini_kl": lambda f, y: losses.discriminability_loss(
          {"a": f}, y, NUM_CLASSES, gini_weights={"a": 0.5},
          kl_weights={"a": 2.0}, axis_name=axis_name)[0],
      "opl": functools.partial(bl.orthogonal_projection_loss,
                               axis_name=axis_name),
      "supcon": functools.partial(bl.supervised_contrastive_loss,
                                  axis_name=axis_name),
      # Per example: averaged over devices like cross-entropy.
      "center": (lambda f, y: bl.center_loss(f, y, centers)) if axis_name is None
                else (lambda f, y: jax.lax.pmean(bl.center_loss(f, y, centers),
                                                 axis_name)),
  }


def _model_loss(loss):
  """A loss of the parameters ``w`` of a tiny model: features = relu(x @ w)."""
  return lambda w, x, y: loss(jax.nn.relu(x @ w), y)


def _one_device(name):
  x, w, _ = _inputs()
  return jax.value_and_grad(_model_loss(_losses(None)[name]))(w, x, LABELS)


def _check(name, value, grad):
  want_value, want_grad = _one_device(name)
  np.testing.assert_allclose(value, want_value, rtol=RTOL, err_msg=name)
  np.testing.assert_allclose(grad, want_grad,
                             atol=RTOL * np.abs(want_grad).max(), err_msg=name)


def _mesh(axis_type):
  assert len(jax.devices()) >= DEVICES, "run with fake CPU devices (make test)"
  return jax.make_mesh((DEVICES,), ("batch",), devices=jax.devices()[:DEVICES],
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", sorted(_losses(None)))
def test_shard_map_with_axis_name_equals_one_device(name, axis_type):
  mesh = _mesh(axis_type)
  x, w, _ = _inputs()
  loss = _model_loss(_losses("batch")[name])
  fn = jax.jit(jax.shard_map(jax.value_and_grad(loss), mesh=mesh,
                             in_specs=(P(), P("batch"), P("batch")),
                             out_specs=(P(), P())))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  value, grad = fn(put(w, P()), put(x, P("batch")), put(LABELS, P("batch")))
  _check(name, value, grad)


@pytest.mark.parametrize("name", ["gini", "kl", "opl", "supcon"])
def test_shard_map_without_axis_name_is_per_device(name):
  # What the axis_name fixes: each device's own statistics, averaged.
  mesh = _mesh("Explicit")
  x, w, _ = _inputs()
  loss = _model_loss(_losses(None)[name])
  fn = jax.jit(jax.shard_map(lambda *a: jax.lax.pmean(loss(*a), "batch"),
                             mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                             out_specs=P()))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  value = fn(put(w, P()), put(x, P("batch")), put(LABELS, P("batch")))
  assert abs(float(value) - float(_one_device(name)[0])) > 1e-3


@pytest.mark.parametrize("name", sorted(_losses(None)))
def test_pmap_with_axis_name_and_averaged_gradients(name):
  # pmap's idiom: per-device value_and_grad, then pmean of the gradients.
  x, w, _ = _inputs()
  loss = _model_loss(_losses("batch")[name])

  def step(w, x, y):
    value, grad = jax.value_and_grad(loss)(w, x, y)
    return value, jax.lax.pmean(grad, "batch")

  fn = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0),
                devices=jax.devices()[:DEVICES])
  value, grad = fn(w, x.reshape(DEVICES, -1, *x.shape[1:]),
                   LABELS.reshape(DEVICES, -1))
  for d in range(DEVICES):
    _check(name, value[d], grad[d])


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", sorted(_losses(None)))
def test_jit_on_a_sharded_batch_equals_one_device(name, axis_type):
  mesh = _mesh(axis_type)
  x, w, _ = _inputs()
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  fn = jax.jit(jax.value_and_grad(_model_loss(_losses(None)[name])))
  with jax.set_mesh(mesh):
    value, grad = fn(put(w, P()), put(x, P("batch")), put(LABELS, P("batch")))
  _check(name, value, grad)
