"""Center, orthogonal projection and supervised contrastive losses: hand
cases, NumPy references, jit, gradients, edge cases and the global batch."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from discrim_jax import baseline_losses as bl


# ------------------------------------------------------- NumPy references


def _np_normalize(f):
  f = np.asarray(f, np.float64).reshape(f.shape[0], -1, f.shape[-1]).mean(1)
  norm = np.linalg.norm(f, axis=1, keepdims=True)
  return np.where(norm > 0, f / np.where(norm > 0, norm, 1), 0)


def np_center(f, y, c):
  f = np.asarray(f, np.float64).reshape(f.shape[0], -1, f.shape[-1]).mean(1)
  return np.mean([0.5 * np.sum((f[i] - c[y[i]]) ** 2) for i in range(len(y))])


def np_opl(f, y, gamma=0.5):
  z = _np_normalize(f)
  pos, neg = [], []
  for i in range(len(y)):
    for j in range(len(y)):
      if y[i] == y[j] and i != j:
        pos.append(z[i] @ z[j])
      elif y[i] != y[j]:
        neg.append(z[i] @ z[j])
  s = sum(pos) / (len(pos) + 1e-6)
  d = sum(neg) / (len(neg) + 1e-6)
  return (1 - s) + gamma * d


def np_supcon(f, y, t=0.1):
  z = _np_normalize(f)
  losses = []
  for i in range(len(y)):
    positives = [p for p in range(len(y)) if p != i and y[p] == y[i]]
    if not positives:
      continue
    denom = sum(np.exp(z[i] @ z[a] / t) for a in range(len(y)) if a != i)
    losses.append(-np.mean([np.log(np.exp(z[i] @ z[p] / t) / denom)
                            for p in positives]))
  return np.mean(losses) if losses else 0.0


# Tolerances in this module. Inputs are float32 for the loss and its float64
# NumPy reference alike, so the difference is the loss's float32 arithmetic:
# Gram entries are dot products of unit vectors (<= 6 terms), and the losses
# sum at most 32 x 32 of them (relative rounding <= ~1e3 * 2**-24 ~ 6e-5 in
# the worst case for naive sums, ~1e-6 for the blocked sums XLA emits);
# SupCon's logsumexp divides by t = 0.1, which scales absolute errors by 10
# but not relative ones. RTOL = 1e-5 covers the sums XLA emits with a margin
# of 10 on any x86-64 CPU; a loss that is near 0 gets an absolute bound of
# RTOL as well.
RTOL = 1e-5

# ------------------------------------------------------------ hand cases


def test_hand_values():
  f = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], np.float32)
  y = np.array([0, 0, 1])
  # Same class: z0.z1 = 1 (s = 1); different: z0.z2 = z1.z2 = 0 (d = 0).
  # 1 - 1/(1 + 1e-6) + 0: the reference's own 1e-6 guard leaves ~1e-6.
  assert float(bl.orthogonal_projection_loss(f, y)) == pytest.approx(0.0, abs=RTOL)
  # Centres at the class means: 1/2 (0.5^2 + 0.5^2 + 0) / 3.
  c = np.array([[1.5, 0.0], [0.0, 3.0]], np.float32)
  assert float(bl.center_loss(f, y, c)) == pytest.approx(0.25 / 3, rel=1e-6)
  # SupCon, t = 1: anchors 0 and 1 each have one positive (dot 1) and one
  # negative (dot 0): l = -log(e / (e + 1)) each.
  expected = -np.log(np.e / (np.e + 1))
  assert float(bl.supervised_contrastive_loss(f, y, temperature=1.0)) == (
      pytest.approx(expected, rel=1e-6))
  # Opposite classes pointing the same way: d = 1, so 1 - 1 + 0.5 * 1.
  f2 = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
  assert float(bl.orthogonal_projection_loss(f2, y)) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 5), (12, 3, 3, 5), (12, 4, 5)])
def test_random_inputs_match_numpy_and_jit(shape):
  rng = np.random.default_rng(shape[-1] + len(shape))
  f = rng.normal(size=shape).astype(np.float32)
  y = rng.integers(0, 4, size=shape[0]).astype(np.int32)
  c = rng.normal(size=(4, shape[-1])).astype(np.float32)
  cases = [(bl.center_loss, (f, y, c), np_center(f, y, c)),
           (bl.orthogonal_projection_loss, (f, y), np_opl(f, y)),
           (bl.supervised_contrastive_loss, (f, y), np_supcon(f, y))]
  for fn, args, expected in cases:
    np.testing.assert_allclose(fn(*args), expected, rtol=RTOL, atol=RTOL,
                               err_msg=fn.__name__)
    np.testing.assert_allclose(jax.jit(fn)(*args), expected, rtol=RTOL,
                               atol=RTOL, err_msg=fn.__name__)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  f = jnp.asarray(rng.normal(size=(8, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=8))
  c = jnp.asarray(rng.normal(size=(3, 4)))
  with jax.enable_x64(True):
    f, c = f.astype(jnp.float64), c.astype(jnp.float64)
    check_grads(lambda f, c: bl.center_loss(f, y, c), (f, c), order=1,
                modes=["rev"])
    check_grads(lambda f: bl.orthogonal_projection_loss(f, y), (f,), order=1,
                modes=["rev"])
    check_grads(lambda f: bl.supervised_contrastive_loss(f, y), (f,), order=1,
                modes=["rev"])


def test_permutation_invariance():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(10, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=10)
  perm = rng.permutation(10)
  for fn in (bl.orthogonal_projection_loss, bl.supervised_contrastive_loss):
    # The same float32 sums in another order (RTOL above).
    np.testing.assert_allclose(fn(f, y), fn(f[perm], y[perm]), rtol=RTOL,
                               atol=RTOL)


# ------------------------------------------------------------ edge cases


EDGE = {
    "one example of a class": (np.random.default_rng(0).normal(size=(5, 3)),
                               np.array([0, 0, 1, 1, 2])),
    "one class only": (np.random.default_rng(1).normal(size=(4, 3)), np.zeros(4, int)),
    "all classes distinct": (np.random.default_rng(2).normal(size=(4, 3)), np.arange(4)),
    "zero features": (np.zeros((4, 3)), np.array([0, 0, 1, 1])),
    "a single example": (np.ones((1, 3)), np.array([2])),
}


@pytest.mark.parametrize("case", sorted(EDGE))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_values_and_gradients(case, dtype):
  f, y = EDGE[case]
  f = jnp.asarray(f, dtype)
  c = jnp.zeros((5, 3))
  for name, fn in (("center", lambda f: bl.center_loss(f, y, c)),
                   ("opl", lambda f: bl.orthogonal_projection_loss(f, y)),
                   ("supcon", lambda f: bl.supervised_contrastive_loss(f, y))):
    value, grad = jax.jit(jax.value_and_grad(fn))(f)
    assert value.dtype == jnp.float32, name  # statistics in float32
    assert np.isfinite(float(value)), (name, case)
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), (name, case)


def test_edge_values():
  f, y = EDGE["all classes distinct"]
  assert float(bl.supervised_contrastive_loss(f, y)) == 0.0  # no anchor
  f, y = EDGE["a single example"]
  assert float(bl.supervised_contrastive_loss(f, y)) == 0.0
  # Zero features stay zero after normalising: s = d = 0, so OPL = 1.
  f, y = EDGE["zero features"]
  assert float(bl.orthogonal_projection_loss(f, y)) == pytest.approx(1.0)
  grad = jax.grad(lambda f: bl.orthogonal_projection_loss(f, y))(jnp.asarray(f))
  assert np.all(np.asarray(grad) == 0)


def test_bf16_matches_float32_of_the_rounded_input():
  rng = np.random.default_rng(9)
  f = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
  y = rng.integers(0, 4, size=16)
  for fn in (bl.orthogonal_projection_loss, bl.supervised_contrastive_loss):
    # Both compute in float32 from the same (bf16-exact) values: the same
    # program but for the cast, so a few ulps at most.
    np.testing.assert_allclose(fn(f, y), fn(f.astype(jnp.float32), y), rtol=1e-6)


def test_bad_input():
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got \[0, 5\]"):
    bl.center_loss(np.ones((2, 4)), np.array([0, 5]), np.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"centers must have shape \(C, 4\)"):
    bl.center_loss(np.ones((2, 4)), np.array([0, 1]), np.zeros((3, 5)))
  with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
    bl.orthogonal_projection_loss(np.ones((2, 4)), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="labels must be integers"):
    bl.supervised_contrastive_loss(np.ones((2, 4)), np.zeros(2, np.float32))
  bad = jax.jit(bl.center_loss)(jnp.ones((2, 4)), jnp.array([0, 7]), jnp.zeros((3, 4)))
  assert np.isnan(float(bad))


def test_sharded_batch_gives_the_global_value():
  devices = jax.devices()
  assert len(devices) == 8, "run with 8 fake CPU devices (make test)"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(11)
  f = rng.normal(size=(32, 2, 2, 6)).astype(np.float32)
  y = rng.integers(0, 5, size=32).astype(np.int32)
  c = rng.normal(size=(5, 6)).astype(np.float32)
  fs = jax.device_put(f, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  fns = {"center": lambda f, y: bl.center_loss(f, y, c),
         "opl": bl.orthogonal_projection_loss,
         "supcon": bl.supervised_contrastive_loss}
  refs = {"center": np_center(f, y, c), "opl": np_opl(f, y), "supcon": np_supcon(f, y)}
  for name, fn in fns.items():
    sharded = jax.jit(fn)(fs, ys)
    # The same sums split over 8 devices (RTOL above).
    chex.assert_trees_all_close(sharded, jax.jit(fn)(f, y), rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(sharded, refs[name], rtol=RTOL, err_msg=name)
