"""Representation metrics: kNN, linear probe and NC1 against references."""

import numpy as np
import pytest

from discrim_jax import representation as rep


def _clusters(n_per_class, num_classes, dim, spread, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * 3
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = centres[y] + spread * rng.normal(size=(len(y), dim))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm]


def np_knn(train_x, train_y, test_x, num_classes, k, t):
  def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  sim = unit(test_x) @ unit(train_x).T
  out = []
  for row in sim:
    top = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[train_y[j]] += np.exp(row[j] / t)
    out.append(np.argmax(votes))
  return np.array(out)


def test_knn_matches_numpy_and_batches_do_not_matter():
  train_x, train_y = _clusters(30, 5, 8, spread=3.0, seed=0)
  test_x, test_y = _clusters(10, 5, 8, spread=3.0, seed=1)
  expected = np.mean(np_knn(train_x, train_y, test_x, 5, 20, 0.07) == test_y)
  for batch in (7, 256):
    got = rep.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5,
                           batch_size=batch)
    assert got == pytest.approx(expected)
  assert 0.2 < expected < 1.0  # a test that could tell a wrong vote apart


def test_knn_on_separated_clusters_and_maps():
  train_x, train_y = _clusters(20, 4, 6, spread=0.01, seed=2)
  test_x, test_y = _clusters(5, 4, 6, spread=0.01, seed=2)
  # NHWC maps are pooled over the middle axes first.
  maps = np.repeat(train_x[:, None, None, :], 2, axis=1).repeat(2, axis=2)
  assert rep.knn_accuracy(maps, train_y, test_x, test_y, num_classes=4) == 1.0


def test_linear_probe_separable_vs_random_labels():
  x, y = _clusters(40, 3, 5, spread=0.3, seed=3)
  assert rep.linear_probe_accuracy(x[:90], y[:90], x[90:], y[90:],
                                   num_classes=3) == 1.0
  rng = np.random.default_rng(4)
  noise = rng.normal(size=(400, 5)).astype(np.float32)
  labels = rng.integers(0, 4, size=400)
  chance = rep.linear_probe_accuracy(noise[:300], labels[:300], noise[300:],
                                     labels[300:], num_classes=4)
  assert chance < 0.45  # near 1/4 on features that carry no label


def test_linear_probe_is_invariant_to_feature_scale():
  x, y = _clusters(30, 3, 4, spread=2.0, seed=5)
  a = rep.linear_probe_accuracy(x[:60], y[:60], x[60:], y[60:], num_classes=3)
  scaled = x * np.array([1e3, 1e-3, 1.0, 10.0], np.float32)
  b = rep.linear_probe_accuracy(scaled[:60], y[:60], scaled[60:], y[60:],
                                num_classes=3)
  # L-BFGS on rescaled features reaches another optimum to its tolerance,
  # which may move one of the 30 test predictions near the boundary: the
  # bound is one prediction, not a rounding figure.
  assert a == pytest.approx(b, abs=1 / 30)


def np_nc1(x, y, num_classes):
  x = x.astype(np.float64)
  means = np.stack([x[y == c].mean(0) for c in range(num_classes)])
  centred = x - means[y]
  s_w = centred.T @ centred / len(x)
  between = means - means.mean(0)
  s_b = between.T @ between / num_classes
  return np.trace(s_w @ np.linalg.pinv(s_b)) / num_classes


def test_nc1_matches_numpy_and_is_zero_when_collapsed():
  x, y = _clusters(25, 4, 6, spread=1.0, seed=6)
  # float32 covariances of 100 examples and a pseudo-inverse of a 6x6 matrix
  # of rank 3 (condition number ~10 here): relative error ~1e2 * 1e2 * 2**-24
  # ~ 1e-4 at worst; rel=1e-3 is ten times that.
  assert rep.nc1(x, y, num_classes=4) == pytest.approx(np_nc1(x, y, 4), rel=1e-3)
  collapsed, y2 = _clusters(25, 4, 6, spread=0.0, seed=6)
  # Every example equals its class mean: the within-class scatter is a sum of
  # squares of float32 differences of equal numbers (0) plus the rounding of
  # the means (~2**-24 relative to the feature scale ~1), squared: < 1e-12.
  assert rep.nc1(collapsed, y2, num_classes=4) == pytest.approx(0.0, abs=1e-6)
  # A class absent from the split is left out, not counted as a zero mean.
  assert rep.nc1(x, y, num_classes=6) == pytest.approx(np_nc1(x, y, 4), rel=1e-3)


def test_extract_pools_masks_and_stops_at_max_examples():
  rng = np.random.default_rng(3)
  batches = [{"x": rng.normal(size=(4, 2, 2, 3)).astype(np.float32),
              "label": np.arange(4) + 4 * i,
              "mask": np.array([1, 1, 1, 0 if i == 2 else 1], np.float32)}
             for i in range(3)]
  fn = lambda b: {"features": {"a": b["x"]}, "label": b["label"], "mask": b["mask"]}
  features, labels = rep.extract(fn, batches)
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
  # A float32 mean of 4 numbers in JAX's and NumPy's orders: within 4 ulps
  # of the largest term.
  x = batches[1]["x"][1]
  np.testing.assert_allclose(features["a"][5], x.mean((0, 1)), rtol=0,
                             atol=4 * 2.0**-24 * np.abs(x).max())
  features, labels = rep.extract(fn, iter(batches), max_examples=6)
  assert features["a"].shape == (6, 3) and list(labels) == [0, 1, 2, 3, 4, 5]


def test_the_probe_traces_nothing_again_for_a_split_of_the_same_shape():
  """The training features are the probe fit's arguments, not constants in
  its program: a second probe on other features of the same shapes (the
  next run's) traces, and so compiles, nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  traces = []

  def listen(event, duration, **kwargs):
    del duration
    if event.endswith("jaxpr_trace_duration"):
      traces.append(kwargs.get("fun_name"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  counts = []
  try:
    for seed in (0, 1):
      rng = np.random.default_rng(seed)
      labels = rng.integers(0, 3, 37)
      features = rng.normal(size=(37, 5)) + labels[:, None]
      rep.linear_probe_accuracy(features, labels, features[:11], labels[:11],
                                num_classes=3, steps=7)
      counts.append(len(traces))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert counts[1] == counts[0], traces[counts[0]:]
