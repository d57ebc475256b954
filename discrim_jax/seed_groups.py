"""The seeds a training loop drives: :class:`OneSeed` (the plain jitted
program) or :class:`VmappedSeeds` (``--vmap_seeds``: several seeds' states
stacked on a leading axis and trained by the same step under ``jax.vmap``,
one compile for N models). Both answer the loop the same questions, so the
loop has no branch on how many seeds it trains.
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from discrim_jax import data as data_lib
from discrim_jax import evaluation


class OneSeed:
  """One model: the program's own steps."""

  def __init__(self, program, seeds: list[int], states: list[Any]):
    (self.seed,), (self.state,) = seeds, states
    self.program, self.seeds = program, list(seeds)

  def batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    return self.program.batches("train", train=True, start_step=start_step,
                                seed=self.seed)

  def step(self, batch) -> dict[str, jax.Array]:
    self.state, metrics = self.program.train_step(self.state, batch)
    return metrics

  def host_metrics(self, history: list[dict[str, Any]], r: int
                   ) -> list[dict[str, float]]:
    """Seed ``r``'s values of fetched step metrics."""
    del r
    return [{k: float(v) for k, v in h.items()} for h in history]

  def evaluate(self, split: str, *, with_features: bool = False) -> list[Any]:
    """One result per seed (see ``evaluation.evaluate``)."""
    return [evaluation.evaluate(self.program, self.state, split,
                                with_features=with_features)]

  def state_of(self, r: int):
    del r
    return self.state


class VmappedSeeds:
  """Several models: the program's step functions under ``jax.vmap``."""

  def __init__(self, program, seeds: list[int], states: list[Any]):
    self.program, self.seeds = program, list(seeds)
    replicated = NamedSharding(program.mesh, P())
    self._batch_sharding = NamedSharding(program.mesh, P(None, "data"))
    self.train_step = program.jit(
        jax.vmap(program.train_fn),
        in_shardings=(replicated, self._batch_sharding),
        out_shardings=(replicated, replicated), donate_argnums=0)
    self.eval_step = program.jit(
        jax.vmap(program.eval_fn, in_axes=(0, None)),
        in_shardings=(replicated, program.batch_sharding),
        out_shardings=replicated)
    self._unstack = jax.jit(lambda states, r: jax.tree.map(lambda x: x[r], states),
                            out_shardings=program.state_sharding)
    self.state = jax.jit(
        lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
        out_shardings=replicated)(*states)

  def batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    its = [self.program.local_batches("train", train=True,
                                      start_step=start_step, seed=s)
           for s in self.seeds]
    for parts in zip(*its):
      stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
      yield data_lib.to_global_batch(stacked, self._batch_sharding)

  def step(self, batch) -> dict[str, jax.Array]:
    self.state, metrics = self.train_step(self.state, batch)
    return metrics

  def host_metrics(self, history, r):
    return [{k: float(v[r]) for k, v in h.items()} for h in history]

  def evaluate(self, split: str, *, with_features: bool = False) -> list[Any]:
    totals = evaluation.split_totals(self.program, self.state, split, self.eval_step)
    return [evaluation.results(self.program,
                               jax.tree.map(lambda x: x[r], totals),  # pylint: disable=cell-var-from-loop
                               with_features)
            for r in range(len(self.seeds))]

  def state_of(self, r: int):
    return self._unstack(self.state, r)


def drive(program, seeds: list[int], states: list[Any]
          ) -> OneSeed | VmappedSeeds:
  """The driver of ``seeds`` starting from ``states`` (one per seed)."""
  return (OneSeed if len(seeds) == 1 else VmappedSeeds)(program, seeds, states)
