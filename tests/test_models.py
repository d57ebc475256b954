"""Model zoo tests: parameter counts (no compile), shapes, train/eval behaviour."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discrim_jax.models import MODELS, common, create_model

TINY = {"width_multiplier": 0.125}
TINY_CVT = dict(TINY, depths=(1, 1, 2))  # fewer blocks: the compile is the cost


def tiny(name):
  return TINY_CVT if name == "cvt13" else TINY


def abstract_variables(model, size):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False))


def num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name,num_classes,size,overrides,expected", [
    ("resnet18", 100, 32, {"stem": "cifar"}, 11_220_132),
    ("resnet18", 1000, 224, {"stem": "imagenet"}, 11_689_512),
    ("resnet50", 100, 32, {"stem": "cifar"}, 23_705_252),
    ("resnet50", 1000, 224, {"stem": "imagenet"}, 25_557_032),
    ("cvt13", 100, 32, {}, 19_650_980),
    ("cvt13", 1000, 224, {}, 19_997_480),
])
def test_parameter_counts_match_spec(name, num_classes, size, overrides, expected):
  model = create_model(name, num_classes=num_classes, **overrides)
  assert num_params(abstract_variables(model, size)) == expected


def test_resnet17_has_17_weighted_layers_and_is_lighter_than_resnet18():
  variables = abstract_variables(create_model("resnet17", num_classes=100), 32)
  kernels = [path for path, _ in
             jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if path[-1].key == "kernel"]
  names = ["/".join(k.key for k in path) for path in kernels]
  main_path = [n for n in names if "proj_conv" not in n]
  assert len(main_path) == 17, main_path
  n17 = num_params(variables)
  n18 = num_params(abstract_variables(create_model("resnet18", num_classes=100), 32))
  assert n17 < 0.7 * n18


@pytest.mark.parametrize("name,size,expected", [
    ("resnet18", 32, {"stem": (2, 32, 32, 64), "stage1": (2, 32, 32, 64),
                      "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256),
                      "stage4": (2, 4, 4, 512), "pre_logits": (2, 512)}),
    ("resnet50", 224, {"stem": (2, 56, 56, 64), "stage1": (2, 56, 56, 256),
                       "stage4": (2, 7, 7, 2048), "pre_logits": (2, 2048)}),
    ("resnet17", 32, {"stem": (2, 32, 32, 64), "stage4": (2, 4, 4, 512),
                      "pre_logits": (2, 512)}),
    ("cvt13", 32, {"stage1": (2, 8, 8, 64), "stage2": (2, 4, 4, 192),
                   "stage3": (2, 2, 2, 384), "pre_logits": (2, 384)}),
    ("cvt13", 224, {"stage1": (2, 56, 56, 64), "stage2": (2, 28, 28, 192),
                    "stage3": (2, 14, 14, 384), "pre_logits": (2, 384)}),
])
def test_output_and_feature_shapes(name, size, expected):
  stem = {"stem": "imagenet"} if name.startswith("resnet") and size == 224 else {}
  model = create_model(name, num_classes=7, **stem)
  variables = abstract_variables(model, size)
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables,
      jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert logits.shape == (2, 7)
  for key, shape in expected.items():
    assert features[key].shape == shape, key


def _init(model, x, seed=0):
  return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))


@pytest.mark.parametrize("name", ["resnet18", "cvt13"])
def test_train_and_eval_behaviour(name):
  overrides = dict(tiny(name), dropout=0.5)
  if name == "cvt13":
    overrides["drop_path_rates"] = (0.5, 0.5, 0.5)
  model = create_model(name, num_classes=5, **overrides)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  variables = _init(model, x)
  chex.assert_trees_all_equal(variables, _init(model, x))  # same key, same params

  @jax.jit
  def train_apply(variables, rng):
    return model.apply(variables, x, train=True, rngs={"dropout": rng},
                       mutable=["batch_stats"])

  @jax.jit
  def eval_apply(variables):
    return model.apply(variables, x, train=False)

  (logits_a, _), updates = train_apply(variables, jax.random.key(2))
  (logits_b, _), _ = train_apply(variables, jax.random.key(3))
  # Train mode updates the running statistics ...
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # ... and is stochastic through the 'dropout' rng (dropout / drop-path).
  assert not np.allclose(logits_a, logits_b)
  # Eval mode is deterministic and mutates nothing.
  e1, f1 = eval_apply(variables)
  e2, _ = eval_apply(variables)
  np.testing.assert_array_equal(e1, e2)
  assert not np.allclose(e1, logits_a)
  assert set(f1) >= {"pre_logits", "stage1", "stage2", "stage3"}


def test_eval_mode_needs_no_dropout_rng():
  model = create_model("resnet18", num_classes=3, **TINY)
  x = jnp.ones((2, 16, 16, 3))
  variables = _init(model, x)
  logits, _ = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert logits.shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet17", "cvt13"])
def test_bf16_compute_keeps_float32_params(name):
  model = create_model(name, num_classes=5, dtype="bfloat16", **tiny(name))
  x = jnp.ones((2, 32, 32, 3))
  variables = _init(model, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables["params"]))
  logits, features = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert logits.dtype == jnp.float32
  assert features["stage1"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(logits))


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown model 'resnet34'.*'cvt13'.*'resnet50'"):
    create_model("resnet34", num_classes=10)


def test_unknown_override_is_named():
  with pytest.raises(ValueError, match=r"no option\(s\) \['widht'\]"):
    create_model("resnet18", num_classes=10, widht=2)


def test_bad_stem_and_dtype():
  with pytest.raises(ValueError, match="unknown stem 'tiny'"):
    model = create_model("resnet18", num_classes=10, stem="tiny")
    abstract_variables(model, 32)
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    create_model("resnet18", num_classes=10, dtype="float8")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrong_input_rank(name):
  model = create_model(name, num_classes=10, **TINY)
  with pytest.raises(ValueError, match=r"rank 4, got shape \(32, 32, 3\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((32, 32, 3)),
                                      train=False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fusion_barrier_returns_its_input_bit_for_bit(dtype):
  bits = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
  values = jnp.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 3e-39],
                     dtype)
  sentinel = jax.lax.bitcast_convert_type(
      jnp.array(common._SENTINEL[jnp.dtype(dtype).itemsize], bits), dtype)
  barrier = jax.jit(common.fusion_barrier)
  # A usual first element (the loop runs 0 times) and the sentinel NaN (it
  # runs twice, negating): the same bits come back either way.
  for first in (jnp.array(7.0, dtype), sentinel):
    x = values.at[0].set(first).reshape(2, 4)
    y = barrier(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(jax.lax.bitcast_convert_type(y, bits),
                                  jax.lax.bitcast_convert_type(x, bits))
  x = jnp.arange(12, dtype=dtype).reshape(3, 4)
  np.testing.assert_array_equal(jax.vmap(common.fusion_barrier)(x), x)
  w = jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)
  grad = jax.grad(lambda v: (common.fusion_barrier(v) * w).sum())(
      x.astype(jnp.float32))
  np.testing.assert_array_equal(grad, w)
  # On CPU it is a loop that XLA keeps.
  assert " while(" in barrier.lower(x).compile().as_text()


def _fusions_feeding_convolutions(hlo):
  """Per convolution operand made by a fusion: does that fusion take a max?"""
  bodies = dict(re.findall(r"\n(%[\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  calls = dict(re.findall(r"(%[\w.-]+) = [^\n]* fusion\([^\n]*calls=(%[\w.-]+)",
                          hlo))
  found = []
  for operands in re.findall(r"= \S+ convolution\(([^)]*)\)", hlo):
    for name in re.findall(r"%[\w.-]+", operands):
      if name in calls:
        found.append("maximum(" in bodies.get(calls[name], ""))
  return found


def test_resnet_fusion_barriers_keep_weight_gradient_transposes_pure():
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  runs = {}
  model = create_model("resnet18", num_classes=10, **TINY)
  variables = model.init(jax.random.key(0), images, train=False)

  def loss(params):
    (logits, _), _ = model.apply(dict(variables, params=params), images,
                                 train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2)

  for barriers in (True, False):
    # The switch acts at trace time: each setting gets its own jitted function.
    step = jax.jit(common.with_fusion_barriers(jax.value_and_grad(loss), barriers))
    hlo = step.lower(variables["params"]).compile().as_text()
    runs[barriers] = (_fusions_feeding_convolutions(hlo),
                      step(variables["params"]))
  # Without barriers, XLA:CPU recomputes ReLU chains inside the fusions that
  # transpose the convolutions' inputs; with them, no such fusion takes a max.
  assert any(runs[False][0]), "expected XLA:CPU to fuse a ReLU into a conv operand"
  assert runs[True][0] and not any(runs[True][0])
  # The barrier passes values bit for bit, but the fusions around it change,
  # and with them the order of float32 sums: the gradients' sums run over
  # 4 x 16 x 16 = 1024 positions, whose worst-case relative rounding is
  # 1024 * 2**-24 ~ 6e-5.
  bound = 1024 * 2.0**-24
  chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=bound, atol=bound)
