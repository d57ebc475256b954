"""Tests for discrim_jax.losses against hand-computed values and a NumPy reference."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from discrim_jax import losses


def reference_terms(x, y, num_classes):
  """Independent float64 NumPy implementation of SPEC section 1, loop by loop."""
  x = np.abs(np.asarray(x, np.float64))
  a = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)  # (B, F)
  b, f = a.shape
  n = np.array([np.sum(y == c) for c in range(num_classes)], np.float64)
  m = np.zeros((f, num_classes))
  for c in range(num_classes):
    if n[c] > 0:
      m[:, c] = a[y == c].sum(axis=0) / n[c]
  p = np.zeros_like(m)
  for i in range(f):
    if m[i].sum() > 0:
      p[i] = m[i] / m[i].sum()
  gini = np.mean(1 - (p ** 2).sum(axis=1))
  q = p.sum(axis=0) / p.sum()
  pi = n / b
  kl = sum(pi[c] * np.log(pi[c] / q[c]) for c in range(num_classes) if n[c] > 0)
  return p, gini, kl


# ----------------------------------------------------------- hand-computed cases


# Tolerances in this module. The inputs are rounded to float32 before both
# the loss and its float64 NumPy reference see them, so the only difference
# is the loss's float32 arithmetic: sums of at most n = 32 examples x 16
# positions (relative rounding <= n * 2**-24 ~ 3e-5 in the worst case, and
# ~1e-6 for the pairwise/blocked sums XLA emits), then a division per entry
# and one log. RTOL = 1e-5 bounds values that are O(1) and well conditioned
# (P, Gini); KL is a sum of terms pi*log(pi/q) that cancel towards 0, so it
# is compared with rtol 1e-4 and an absolute 1e-6 (pi <= 1 times the log's
# relative error ~1e-6). Hand cases built from a few exact operations are
# compared with a few float32 ulps of 1 (1e-6), or exactly.
RTOL = 1e-5


def test_one_class_per_feature_gives_zero_gini():
  # Feature c fires only on samples of class c.
  x = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0],
                 [4.0, 0.0, 0.0]])
  y = jnp.array([0, 1, 2, 0])
  # Each P entry is m / m (exactly 1) or 0 / m (exactly 0): exact in float32.
  np.testing.assert_array_equal(losses.gini_loss(x, y, 3), 0.0)
  np.testing.assert_array_equal(losses.class_feature_distribution(x, y, 3), np.eye(3))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_feature_equally_active_on_k_classes(k):
  # One feature with the same mean strength on k classes (a 10-class problem).
  y = jnp.arange(k)
  x = jnp.full((k, 1), 0.7)
  # P = 1/k per class (k equal float32 numbers divided by their sum: within
  # a few ulps), so 1 - k (1/k)^2 is within a few ulps of 1.
  np.testing.assert_allclose(losses.gini_loss(x, y, 10), 1 - 1 / k, rtol=1e-6)


def test_mean_over_middle_axes_and_abs():
  # Class 0 sample: |x| mean over the 2x2 map is 1; class 1: 3 -> P = [1/4, 3/4].
  x0 = jnp.array([[1.0], [-1.0], [2.0], [0.0]]).reshape(2, 2, 1)
  x1 = jnp.full((2, 2, 1), -3.0)
  x = jnp.stack([x0, x1])
  p = losses.class_feature_distribution(x, jnp.array([0, 1]), 2)
  # Means of |x| that are exact in float32 (1 and 3), then 1/4 and 3/4:
  # exact; the 1e-6 only allows a few ulps of a blocked mean.
  np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-6)
  np.testing.assert_allclose(
      losses.gini_loss(x, jnp.array([0, 1]), 2), 1 - (1 / 16 + 9 / 16), rtol=1e-6)


def test_kl_zero_when_q_matches_class_distribution():
  # Classes 0,0,1 -> pi = [2/3, 1/3]; features 0 and 1 fire for class 0, feature
  # 2 for class 1 -> q = [2/3, 1/3].
  x = jnp.array([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
  y = jnp.array([0, 0, 1])
  # q is a ratio of sums of P entries 1 and 0: |log(pi / q)| is a few ulps.
  np.testing.assert_allclose(losses.kl_loss(x, y, 2), 0.0, atol=1e-6)


def test_kl_hand_value():
  # Both features fire for class 0 only; classes 0 and 1 equally frequent:
  # q = [1, 0] (floored at 1e-10), pi = [1/2, 1/2].
  x = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  y = jnp.array([0, 1])
  expected = 0.5 * np.log(0.5 / 1.0) + 0.5 * np.log(0.5 / 1e-10)
  # Two float32 logs of exact operands (the floor 1e-10 is rounded to float32,
  # relative 3e-8): a few ulps of the result.
  np.testing.assert_allclose(losses.kl_loss(x, y, 2), expected, rtol=RTOL)


# -------------------------------------------------------- reference comparison


@pytest.mark.parametrize("shape", [(16, 8), (12, 4, 4, 6), (10, 5, 7)])
def test_random_inputs_match_numpy_reference(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  y = rng.integers(0, 5, size=shape[0])
  y[:3] = 7  # make sure some classes (here 5, 6, 8, 9) are absent, 7 present
  p_ref, gini_ref, kl_ref = reference_terms(x, y, 10)
  # atol for P entries of absent classes (exactly 0) and near-0 ones.
  np.testing.assert_allclose(losses.class_feature_distribution(x, y, 10), p_ref,
                             rtol=RTOL, atol=1e-7)
  gini, kl = jax.jit(losses.gini_and_kl, static_argnums=2)(x, y, 10)
  np.testing.assert_allclose(gini, gini_ref, rtol=RTOL)
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-4, atol=1e-6)
  # Eager against jit: the same operations, which XLA may fuse and order
  # differently: the reference's bounds apply.
  np.testing.assert_allclose(losses.gini_loss(x, y, 10), gini, rtol=RTOL)
  np.testing.assert_allclose(losses.kl_loss(x, y, 10), kl, rtol=1e-4, atol=1e-6)


def test_jit_and_eager_agree():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3, 3, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=8))
  for fn in (losses.gini_loss, losses.kl_loss, losses.class_feature_distribution):
    # Same operations, possibly another summation order (see RTOL); atol for
    # P entries that are 0.
    chex.assert_trees_all_close(fn(x, y, 3), jax.jit(fn, static_argnums=2)(x, y, 3),
                                rtol=RTOL, atol=1e-7)


def test_permutation_invariance():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  y = rng.integers(0, 4, size=20)
  perm = rng.permutation(20)
  a = losses.gini_and_kl(x, y, 4)
  b = losses.gini_and_kl(x[perm], y[perm], 4)
  # A permutation reorders the float32 sums over 20 examples (RTOL above).
  chex.assert_trees_all_close(a, b, rtol=RTOL, atol=1e-6)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  # Keep activations away from 0, where |x| has a kink.
  x = jnp.asarray(rng.uniform(0.5, 2.0, size=(6, 2, 2, 3)) *
                  rng.choice([-1, 1], size=(6, 2, 2, 3)), jnp.float32)
  y = jnp.array([0, 1, 2, 0, 1, 1])
  # Central differences in float32 with step 1e-3: truncation ~eps**2 ~ 1e-6
  # and cancellation 2**-24 / 1e-3 ~ 6e-5 relative to the loss; 1e-2 is
  # check_grads' own float32 default.
  check_grads(lambda x: losses.gini_loss(x, y, 4), (x,), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
  check_grads(lambda x: losses.kl_loss(x, y, 4), (x,), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)


# ------------------------------------------------------------------ edge cases


def _edge_cases():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, 4, 4, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=8)
  dead = x.copy()
  dead[..., 2] = 0.0
  relu = np.maximum(x, 0)
  return {
      "absent_classes": (x, y, 10),
      "dead_feature": (dead, y, 3),
      "single_class_batch": (x, np.full(8, 2), 3),
      "batch_of_one": (x[:1], y[:1], 3),
      "negative_activations": (-np.abs(x), y, 3),
      "all_zero": (np.zeros_like(x), y, 3),
      "relu_maps": (relu, y, 3),
      "bf16": (x.astype(jnp.bfloat16), y, 3),
  }


@pytest.mark.parametrize("case", list(_edge_cases()))
def test_values_and_gradients_finite(case):
  x, y, c = _edge_cases()[case]
  x = jnp.asarray(x)

  def total(x):
    g, k = losses.gini_and_kl(x, y, c)
    return g + k

  value, grad = jax.jit(jax.value_and_grad(total))(x)
  assert np.isfinite(value), (case, value)
  assert grad.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(grad, np.float32))), case


def test_dead_feature_counts_as_impurity_one_without_gradient():
  x = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]], np.float32)
  y = np.array([0, 1, 0])
  # Feature 0: class 0 only -> impurity 0; feature 1 dead -> impurity 1.
  # 1 - (1^2 + 0^2) and 1 - 0: exact, then a mean of two: exact.
  np.testing.assert_array_equal(losses.gini_loss(x, y, 2), 0.5)
  grad = jax.grad(lambda x: losses.gini_loss(x, y, 2))(jnp.asarray(x))
  np.testing.assert_array_equal(grad[:, 1], 0.0)


def test_single_class_batch_values():
  x = jnp.abs(jax.random.normal(jax.random.key(0), (5, 3))) + 0.1
  y = jnp.zeros(5, jnp.int32)
  # One class: P entries are m / m = 1 exactly, pi = q = 1.
  np.testing.assert_array_equal(losses.gini_loss(x, y, 4), 0.0)
  np.testing.assert_array_equal(losses.kl_loss(x, y, 4), 0.0)


def test_bf16_statistics_in_float32():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 16)).astype(np.float32)
  y = rng.integers(0, 4, size=32)
  x16 = jnp.asarray(x, jnp.bfloat16)
  _, gini_ref, kl_ref = reference_terms(np.asarray(x16, np.float32), y, 4)
  gini, kl = losses.gini_and_kl(x16, y, 4)
  assert gini.dtype == jnp.float32 and kl.dtype == jnp.float32
  # The reference sees the same bf16-rounded inputs: float32 rounding only.
  np.testing.assert_allclose(gini, gini_ref, rtol=RTOL)
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------- jit behaviour


def test_no_recompilation_across_steps():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, y):
    return losses.gini_and_kl(x, y, 5)

  rng = np.random.default_rng(6)
  for _ in range(4):
    step(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
         jnp.asarray(rng.integers(0, 5, size=8), jnp.int32))


def test_out_of_range_labels_under_jit_give_nan():
  x = jnp.ones((4, 3))
  for bad in ([0, 1, 5, 2], [0, -1, 1, 2]):
    gini, kl = jax.jit(losses.gini_and_kl, static_argnums=2)(x, jnp.array(bad), 5)
    assert np.isnan(gini) and np.isnan(kl), bad
    p = jax.jit(losses.class_feature_distribution, static_argnums=2)(
        x, jnp.array(bad), 5)
    assert np.all(np.isnan(p))


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_equals_single_device(axis_type):
  devices = jax.devices()
  assert len(devices) == 8, (
      f"expected 8 fake CPU devices, got {len(devices)}: run the tests with "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test sets it)")
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  rng = np.random.default_rng(7)
  x = rng.normal(size=(32, 4, 4, 6)).astype(np.float32)
  y = rng.integers(0, 10, size=32).astype(np.int32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  assert len(xs.sharding.device_set) == 8
  fn = jax.jit(lambda x, y: losses.gini_and_kl(x, y, 10))
  sharded = fn(xs, ys)
  single = fn(jax.device_put(x, devices[0]), jax.device_put(y, devices[0]))
  # The same sums over 32 examples, split over 8 devices: RTOL above.
  chex.assert_trees_all_close(sharded, single, rtol=RTOL, atol=1e-7)
  # And it is the global-batch value, not that of one device's slice.
  _, gini_ref, kl_ref = reference_terms(x, y, 10)
  np.testing.assert_allclose(sharded[0], gini_ref, rtol=RTOL)
  np.testing.assert_allclose(sharded[1], kl_ref, rtol=1e-4, atol=1e-6)
  _, gini_slice, _ = reference_terms(x[:4], y[:4], 10)
  assert abs(gini_slice - gini_ref) > 1e-3


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("features,labels,num_classes,match", [
    (np.ones(4), np.zeros(4, int), 3, r"rank >= 2.*\(4,\)"),
    (np.ones((4, 2)), np.zeros((4, 1), int), 3, r"labels must have shape \(B,\).*\(4, 1\)"),
    (np.ones((4, 2)), np.zeros(5, int), 3, r"batch sizes differ.*\(4, 2\).*\(5,\)"),
    (np.ones((4, 2)), np.zeros(4, int), 1, r"num_classes must be >= 2, got 1"),
    (np.ones((4, 2)), np.array([0, 1, 3, 0]), 3, r"\[0, 3\).*\[0, 3\]"),
    (np.ones((4, 2)), np.array([0, -2, 1, 0]), 3, r"\[-2, 1\]"),
    (np.ones((4, 2)), np.zeros(4, np.float32), 3, r"labels must be integers"),
])
def test_bad_input_raises_value_error(features, labels, num_classes, match):
  with pytest.raises(ValueError, match=match):
    losses.gini_loss(features, labels, num_classes)


# ------------------------------------------------------- the combined objective


def test_discriminability_loss_weights_and_terms():
  rng = np.random.default_rng(8)
  feats = {
      "stage3": rng.normal(size=(8, 4, 4, 6)).astype(np.float32),
      "stage4": rng.normal(size=(8, 2, 2, 5)).astype(np.float32),
      "pre_logits": rng.normal(size=(8, 5)).astype(np.float32),
  }
  y = rng.integers(0, 3, size=8)
  total, terms = losses.discriminability_loss(
      feats, y, 3, gini_weights={"stage3": 0.5, "stage4": 0.2},
      kl_weights={"stage4": 0.7})
  g3, k3 = reference_terms(feats["stage3"], y, 3)[1:]
  g4, k4 = reference_terms(feats["stage4"], y, 3)[1:]
  assert sorted(terms) == ["gini/stage3", "gini/stage4", "kl/stage3", "kl/stage4"]
  np.testing.assert_allclose(terms["kl/stage3"], k3, rtol=1e-4, atol=1e-6)  # KL's bound
  # A weighted sum of three O(1) terms, each within rtol 1e-4 (KL) or RTOL.
  np.testing.assert_allclose(total, (0.5 * g3 + 0.2 * g4 + 0.7 * k4) / 2,
                             rtol=1e-4, atol=1e-6)


def test_discriminability_loss_unknown_layer():
  with pytest.raises(ValueError, match=r"\['stage9'\].*available: \['stage4'\]"):
    losses.discriminability_loss({"stage4": np.ones((2, 3))}, np.array([0, 1]), 2,
                                 gini_weights={"stage9": 1.0}, kl_weights={})


def test_api_mistakes_are_one_line_errors():
  x, y = np.ones((2, 3), np.float32), np.array([0, 1])
  with pytest.raises(ValueError, match=r"name no layer.*available: \['stage4'\]"):
    losses.discriminability_loss({"stage4": x}, y, 2, gini_weights={},
                                 kl_weights={})
  with pytest.raises(TypeError, match=r"features must map layer names.*shape \(2, 3\)"):
    losses.discriminability_loss(jnp.asarray(x), y, 2, gini_weights={"a": 1.0},
                                 kl_weights={})
  with pytest.raises(TypeError, match=r"gini_weights must map layer names.*got 0.5"):
    losses.discriminability_loss({"a": x}, y, 2, gini_weights=0.5, kl_weights={})
  with pytest.raises(TypeError, match=r"num_classes must be a static integer.*2.0"):
    losses.gini_loss(x, y, 2.0)
  with pytest.raises(TypeError, match="features must be an array, got a mapping"):
    losses.gini_loss({"a": x}, y, 2)
  # NumPy integers are integers.
  assert float(losses.gini_loss(x, y, np.int64(2))) == float(losses.gini_loss(x, y, 2))
