"""Evaluating a :class:`~discrim_jax.runtime.Program`'s state: accuracy and
cross-entropy over a split, the feature-class matrix P of each loss layer,
and the representation metrics (kNN, linear probe, NC1) of the test split.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

import functools
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from discrim_jax import losses
from discrim_jax import representation


def split_totals(program, state, split: str, step=None) -> dict[str, Any]:
  """The eval step's sums over a split's batches (``step``: the program's
  eval step, or a transform of it such as the vmapped one)."""
  step = program.eval_step if step is None else step
  totals = None
  for batch in program.batches(split, train=False):
    out = jax.device_get(step(state, batch))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  return totals


def results(program, totals, with_features: bool):
  """Accuracy and cross-entropy from the sums; with ``with_features`` also
  ``(metrics, {layer: P})`` and each layer's Gini impurity in the metrics."""
  count = float(totals["count"])
  metrics = {"accuracy": float(totals["correct"]) / count,
             "ce": float(totals["ce"]) / count, "num_examples": count}
  if not with_features:
    return metrics
  matrices = {}
  for layer in program.spec.objective.layers:
    p = losses.distribution_from_sums(totals[f"class_sums/{layer}"],
                                      totals[f"class_counts/{layer}"])
    matrices[layer] = np.asarray(p)
    metrics[f"gini/{layer}"] = float(losses.gini_from_distribution(p))
  return metrics, matrices


def evaluate(program, state, split: str, *, with_features: bool = False):
  """Accuracy and cross-entropy over a split; with ``with_features`` also
  ``(metrics, {layer: P})`` with P the feature-class matrix of the split."""
  return results(program, split_totals(program, state, split), with_features)


def features(program, state, split: str, *, max_examples: int = 0
             ) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
  """``(metrics, {layer: (N, F) pooled features}, labels)`` of a split's
  un-augmented examples, gathered on every host, for the spec's
  representation layers; ``metrics`` are :func:`evaluate`'s with
  ``with_features`` (from the same pass). With ``max_examples`` > 0 only
  the first examples are read, and ``metrics`` is None."""
  sums = []

  def step(batch):  # the split's eval sums come from the same pass
    totals, out = program.features_step(state, batch)
    sums.append(totals)
    return out
  pooled, labels = representation.extract(
      step, program.batches(split, train=False), max_examples=max_examples)
  metrics = None
  if not max_examples:
    totals = functools.reduce(  # batch after batch, as evaluate() sums
        lambda a, b: jax.tree.map(np.add, a, b), jax.device_get(sums))
    metrics = results(program, totals, True)
  return metrics, pooled, labels


def final_test(program, state):
  """``evaluate(program, state, "test", with_features=True)`` plus kNN and
  linear-probe accuracy and NC1 (``discrim_jax.representation``) in the
  metrics, with the seconds they took beyond the test pass itself
  (``representation_time_s``)."""
  start = time.time()
  (test, matrices), test_features, test_labels = features(program, state, "test")
  test_time = time.time() - start
  _, train_features, train_labels = features(
      program, state, "train",
      max_examples=program.spec.representation["max_train_examples"])
  test.update(representation.evaluate(
      train_features, train_labels, test_features, test_labels,
      num_classes=program.num_classes))
  test["representation_time_s"] = time.time() - start - test_time
  logging.info("test split and representation metrics: %s", test)
  return test, matrices
