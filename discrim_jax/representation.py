"""How good learned features are, beyond accuracy (SPEC section 7).

Functions of feature arrays ``(N, ..., F)`` (pooled to ``(N, F)`` over the
middle axes) and integer labels, computed with JAX in batches so that large
splits fit on any device:

* :func:`knn_accuracy`: each test example classified by a vote of its k
  nearest training examples by cosine similarity, weighted by
  ``exp(sim / temperature)`` (Wu et al. 2018; k = 20, temperature 0.07);
* :func:`linear_probe_accuracy`: multinomial logistic regression on frozen,
  standardised training features (full-batch L-BFGS, small L2), scored on
  the test features;
* :func:`nc1`: within-class variability collapse (Papyan et al. 2020),
  ``trace(S_W pinv(S_B)) / C``; lower is more collapsed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from discrim_jax.baseline_losses import normalize, pool


def extract(fn, batches, *, max_examples: int = 0
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features of many batches, pooled and gathered on the host for the
  metrics below.

  Args:
    fn: ``batch -> {"features": {layer: (B, ..., F)}, "label": (B,),
      "mask": (B,) (optional: 0 marks padding)}``, e.g. a jitted function of
      a model's apply (``discrim_jax.features.capture`` gives the layers).
    batches: an iterable of batches for ``fn``.
    max_examples: stop after this many real examples (0: all).

  Returns:
    ``({layer: (N, F) float32 array}, labels (N,))`` of the real examples,
    in order (features pooled over their middle axes).
  """
  parts, count = [], 0
  for batch in batches:
    out = jax.device_get(fn(batch))
    labels = np.asarray(out["label"])
    keep = (np.asarray(out["mask"]) > 0 if "mask" in out
            else np.ones(len(labels), bool))
    parts.append(({k: np.asarray(pool(v))[keep] for k, v in out["features"].items()},
                  labels[keep]))
    count += int(keep.sum())
    if max_examples and count >= max_examples:
      break
  if not parts:
    raise ValueError("extract: no batches")
  features = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
  labels = np.concatenate([p[1] for p in parts])
  if max_examples:
    features = {k: v[:max_examples] for k, v in features.items()}
    labels = labels[:max_examples]
  return features, labels

__all__ = ["knn_accuracy", "linear_probe_accuracy", "nc1", "evaluate"]


def _pooled(features) -> jax.Array:
  return pool(jnp.asarray(features))


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_predict(queries, bank, bank_labels, *, k, num_classes, temperature):
  sim = jnp.einsum("qf,nf->qn", queries, bank,
                   precision=jax.lax.Precision.HIGHEST)
  top, index = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(bank_labels[index], num_classes) * jnp.exp(
      top / temperature)[..., None]
  return jnp.argmax(jnp.sum(votes, axis=1), axis=-1)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256) -> float:
  """Weighted k-nearest-neighbour accuracy on cosine similarity.

  The test split is processed ``batch_size`` examples at a time against all
  training features: memory is ``batch_size x N_train`` similarities.
  """
  bank = normalize(_pooled(train_features))
  queries = normalize(_pooled(test_features))
  bank_labels = jnp.asarray(train_labels)
  k = min(k, bank.shape[0])
  correct = 0
  test_labels = np.asarray(test_labels)
  for start in range(0, queries.shape[0], batch_size):
    predicted = _knn_predict(queries[start:start + batch_size], bank,
                             bank_labels, k=k, num_classes=num_classes,
                             temperature=temperature)
    correct += int(np.sum(np.asarray(predicted)
                          == test_labels[start:start + batch_size]))
  return correct / len(test_labels)


def linear_probe_accuracy(train_features, train_labels, test_features,
                          test_labels, *, num_classes: int, l2: float = 1e-4,
                          steps: int = 200) -> float:
  """Accuracy of a multinomial logistic regression trained on the frozen,
  standardised training features (full-batch L-BFGS for ``steps``
  iterations, L2 penalty ``l2`` on the weights)."""
  x = _pooled(train_features)
  mean, std = jnp.mean(x, axis=0), jnp.std(x, axis=0)
  std = jnp.where(std > 0, std, 1.0)
  x = (x - mean) / std
  x_test = (_pooled(test_features) - mean) / std
  params = _fit_probe(x, jnp.asarray(train_labels), num_classes=num_classes,
                      l2=l2, steps=steps)
  predicted = jnp.argmax(x_test @ params["w"] + params["b"], axis=-1)
  return float(jnp.mean(predicted == jnp.asarray(test_labels)))


# The features are arguments, not constants closed over: one compiled
# program serves every run with the same shapes (a closure compiled anew
# each call, with the whole training set inside the program).
@functools.partial(jax.jit, static_argnames=("num_classes", "l2", "steps"))
def _fit_probe(x, y, *, num_classes: int, l2: float, steps: int):
  params = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
            "b": jnp.zeros((num_classes,), x.dtype)}

  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value,
                                   grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None
  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None,
                                length=steps)
  return params


def nc1(features, labels, *, num_classes: int) -> float:
  """``trace(S_W pinv(S_B)) / C`` over the classes present.

  ``S_W`` is the average over examples of the outer product of each feature
  vector's deviation from its class mean; ``S_B`` the average over classes of
  the class mean's deviation from the global mean (of the class means).
  """
  f = _pooled(features)  # float32 at least
  onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=f.dtype)
  counts = jnp.sum(onehot, axis=0)
  present = counts > 0
  means = (onehot.T @ f) / jnp.where(present, counts, 1.0)[:, None]
  centred = f - onehot @ means
  s_w = centred.T @ centred / f.shape[0]
  c = jnp.sum(present)
  global_mean = jnp.sum(jnp.where(present[:, None], means, 0.0), axis=0) / c
  between = jnp.where(present[:, None], means - global_mean, 0.0)
  s_b = between.T @ between / c
  return float(jnp.trace(s_w @ jnp.linalg.pinv(s_b, hermitian=True)) / c)


def evaluate(train_features: dict[str, np.ndarray], train_labels,
             test_features: dict[str, np.ndarray], test_labels, *,
             num_classes: int) -> dict[str, float]:
  """All three metrics for each layer: ``{"knn/LAYER", "probe/LAYER",
  "nc1/LAYER"}`` (NC1 on the test features). A layer whose pooled features
  equal an earlier one's (a ResNet's stage4 pools to its pre_logits) gets
  that layer's values without computing them again."""
  out: dict[str, float] = {}
  done: list[str] = []
  for layer in train_features:
    same = next((d for d in done
                 if np.array_equal(train_features[d], train_features[layer])
                 and np.array_equal(test_features[d], test_features[layer])),
                None)
    if same is not None:
      for metric in ("knn", "probe", "nc1"):
        out[f"{metric}/{layer}"] = out[f"{metric}/{same}"]
      continue
    args = (train_features[layer], train_labels, test_features[layer],
            test_labels)
    out[f"knn/{layer}"] = knn_accuracy(*args, num_classes=num_classes)
    out[f"probe/{layer}"] = linear_probe_accuracy(*args, num_classes=num_classes)
    out[f"nc1/{layer}"] = nc1(test_features[layer], test_labels,
                              num_classes=num_classes)
    done.append(layer)
  return out
