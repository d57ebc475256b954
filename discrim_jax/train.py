"""The training application: ``train_and_evaluate(config, workdir)``.

A run trains with the jitted step that :func:`discrim_jax.steps.build` makes
(batch sharded over a 1-D ``'data'`` mesh, state replicated), evaluates on the
validation split every ``config.eval_every_epochs``, checkpoints through
orbax (the latest ``config.keep_checkpoints`` plus the best by validation
accuracy) and finally evaluates the best-validation checkpoint on the test
split. Rerunning with the same workdir resumes exactly where the last
checkpoint left off. :func:`train_and_evaluate_seeds` trains several seeds
together with the same step under ``jax.vmap``.

Workdir contents: ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step and split), TensorBoard events, ``checkpoints/`` and, at the end,
``summary.json`` and ``feature_class_matrix.npz`` (the matrix P of each loss
layer over the test split, for the best-validation model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import copy
import dataclasses
import json
from pathlib import Path
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from discrim_jax import data as data_lib
from discrim_jax import steps as steps_lib
from discrim_jax import workdir as workdir_lib


@dataclasses.dataclass
class _Replica:
  """One seed's run: its config, workdir, checkpoints and metrics log."""
  config: ml_collections.ConfigDict
  workdir: Path
  manager: ocp.CheckpointManager | None = None
  log: workdir_lib.MetricsLog | None = None


@dataclasses.dataclass
class _Program:
  """How the loop drives its models: one (the plain jitted step) or several
  seeds stacked on a leading axis (the same step under ``jax.vmap``)."""
  trainer: steps_lib.Trainer
  seeds: list[int]
  state: Any

  @property
  def stacked(self) -> bool:
    return len(self.seeds) > 1

  def batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    if self.stacked:
      return self.trainer.replica_batches(self.seeds, start_step)
    return self.trainer.batches("train", train=True, start_step=start_step,
                                seed=self.seeds[0])

  def step(self, batch) -> dict[str, jax.Array]:
    step = (self.trainer.replica_train_step if self.stacked
            else self.trainer.train_step)
    self.state, metrics = step(self.state, batch)
    return metrics

  def split_metrics(self, history: list[dict[str, Any]], r: int
                    ) -> list[dict[str, float]]:
    """Replica ``r``'s values of fetched step metrics."""
    if self.stacked:
      return [{k: float(v[r]) for k, v in h.items()} for h in history]
    return [{k: float(v) for k, v in h.items()} for h in history]

  def evaluate(self, split: str, *, with_features: bool = False) -> list[Any]:
    """One result per replica (see ``Trainer.evaluate``)."""
    if self.stacked:
      return self.trainer.evaluate_replicas(self.state, split,
                                            with_features=with_features)
    return [self.trainer.evaluate(self.state, split, with_features=with_features)]

  def replica_state(self, r: int):
    return self.trainer.unstack(self.state, r) if self.stacked else self.state


def _program(trainer: steps_lib.Trainer, seeds: list[int], states) -> _Program:
  state = trainer.stack(*states) if len(seeds) > 1 else states[0]
  return _Program(trainer, seeds, state)


def _load_pretrained(trainer: steps_lib.Trainer, state):
  from discrim_jax import pretrained  # pylint: disable=g-import-not-at-top
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  loaded = pretrained.load_pretrained(trainer.config.init_from,
                                      trainer.config.model, variables)
  logging.info("Initialised from %s", trainer.config.init_from)
  new = state.replace(params=loaded["params"],
                      batch_stats=loaded.get("batch_stats", {}),
                      opt_state=state.tx.init(loaded["params"]))
  return jax.device_put(new, trainer.state_sharding)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: Callable[[int], None] | None = None,
                       dataset: data_lib.Dataset | None = None
                       ) -> dict[str, Any]:
  """Trains, evaluates, checkpoints; returns the summary (also summary.json).

  Args:
    config: an experiment config (see ``experiments/configs``).
    workdir: where checkpoints, metrics and the summary go; a workdir holding a
      checkpoint of the same config is resumed.
    step_callback: called with the step number after each train step (on the
      host, without waiting for the device).
    dataset: an already loaded data set (saves reading it again).
  """
  return train_and_evaluate_seeds(config, {config.seed: workdir},
                                  step_callback=step_callback,
                                  dataset=dataset)[config.seed]


def train_and_evaluate_seeds(config: ml_collections.ConfigDict,
                             workdirs: dict[int, str], *,
                             step_callback: Callable[[int], None] | None = None,
                             dataset: data_lib.Dataset | None = None
                             ) -> dict[int, dict[str, Any]]:
  """:func:`train_and_evaluate` for several seeds, ``{seed: workdir}``.

  One seed trains with the plain step. Several are stacked and trained by
  the same step under ``jax.vmap`` (one compile, N models); each keeps its own
  data order, workdir, checkpoints, metrics and summary, which equal those of
  training it alone up to float rounding (the batched convolutions round
  differently, and training amplifies rounding over many steps). Whether
  that is faster depends on the model and machine: ``experiments/bench.py``
  measures it. Returns ``{seed: summary}``.
  """
  seeds = list(workdirs)
  replicas = []
  for seed in seeds:
    seed_config = copy.deepcopy(config)
    with seed_config.unlocked():
      seed_config.seed = seed
    path = Path(workdirs[seed])
    workdir_lib.check_config(seed_config, path)
    replicas.append(_Replica(seed_config, path))
  trainer = steps_lib.build(config, dataset=dataset)
  for r in replicas:  # the run is built: its config is now worth recording
    r.workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(r.config, r.workdir)
  start = time.time()
  try:
    latest, states = [], []
    for r in replicas:
      r.manager, step, state = workdir_lib.restore_latest(
          config, r.workdir, trainer.abstract_state)
      latest.append(step)
      states.append(state)
    if len(set(latest)) > 1:
      raise RuntimeError(
          f"the seeds' workdirs hold checkpoints of different steps {latest}; "
          "train them one at a time (without --vmap_seeds) to resume")
    if latest[0] is not None:
      logging.info("Resumed from the checkpoints of step %d", latest[0])
    else:
      states = [trainer.init_state(seed) for seed in seeds]
      if config.init_from:
        states = [_load_pretrained(trainer, state) for state in states]
    step = latest[0] or 0
    for r in replicas:
      r.log = workdir_lib.MetricsLog(r.workdir, step)
    images_per_s = _train_loop(_program(trainer, seeds, states), step, replicas,
                               step_callback)
    best_states, best_steps = [], []
    for r in replicas:
      r.manager.wait_until_finished()  # the last save is asynchronous
      best_steps.append(r.manager.best_step())
      best_states.append(workdir_lib.restore(r.manager, best_steps[-1],
                                             trainer.abstract_state, r.workdir))
    tests = _program(trainer, seeds, best_states).evaluate("test",
                                                           with_features=True)
    summaries = {}
    for seed, r, best_step, (test, matrices) in zip(seeds, replicas, best_steps,
                                                     tests):
      r.log.write(best_step, "test", test)
      r.log.close()
      throughput = (images_per_s / len(seeds) if images_per_s is not None
                    else _earlier_throughput(r.workdir))
      summary = {
          "test_accuracy": test["accuracy"], "test_ce": test["ce"],
          "best_validation_step": best_step,
          "best_validation_accuracy": float(
              r.manager.metrics(best_step)["accuracy"]),
          "wall_time_s": time.time() - start,
          "train_images_per_s": throughput,
          "total_steps": trainer.total_steps, "dataset": config.dataset,
          "model": config.model, "objective": config.objective, "seed": seed,
          "num_devices": trainer.mesh.size, "trained_with_seeds": seeds}
      if jax.process_index() == 0:
        np.savez_compressed(r.workdir / "feature_class_matrix.npz", **matrices)
        (r.workdir / "summary.json").write_text(json.dumps(
            summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
      summaries[seed] = summary
    return summaries
  finally:
    for r in replicas:
      if r.manager is not None:
        r.manager.wait_until_finished()
        r.manager.close()


def _earlier_throughput(workdir: Path) -> float | None:
  """The images/s an earlier, finished run of this workdir measured (a rerun
  trains nothing and measures nothing), or None."""
  path = workdir / "summary.json"
  if path.exists():
    return json.loads(path.read_text()).get("train_images_per_s")
  return None


def _train_loop(program: _Program, step: int, replicas: list[_Replica],
                step_callback) -> float | None:
  """Trains to the end from ``step``; returns the images/s of all replicas
  (None when no whole log interval after the first was timed)."""
  trainer = program.trainer
  config = trainer.config
  total = trainer.total_steps
  eval_every = config.eval_every_epochs * trainer.steps_per_epoch
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(
      num_train_steps=total, writer=replicas[0].log.writer,
      every_steps=config.log_every_steps, every_secs=60)
  pending: list[dict[str, jax.Array]] = []
  pending_start = step
  timed_steps, timed_seconds, t_mark = 0, 0.0, None
  batches = program.batches(step)
  while step < total:
    pending.append(program.step(next(batches)))
    step += 1
    if step_callback is not None:
      step_callback(step)
    report(step)
    is_eval = step % eval_every == 0 or step == total
    is_log = step % config.log_every_steps == 0 or is_eval
    if is_log:
      history = jax.device_get(pending)
      for i, r in enumerate(replicas):
        mine = program.split_metrics(history, i)
        workdir_lib.check_finite(mine, pending_start + 1,
                                 r.manager.latest_step(), r.workdir)
        means = {k: float(np.mean([h[k] for h in mine])) for k in mine[-1]}
        means["learning_rate"] = mine[-1]["learning_rate"]  # the last step's
        r.log.write(step, "train", means)
      # Throughput over whole log intervals, excluding the first (compile).
      now = time.time()
      if t_mark is not None:
        timed_steps += len(pending)
        timed_seconds += now - t_mark
      pending, pending_start = [], step
    if is_eval:
      for i, (r, val) in enumerate(zip(replicas, program.evaluate("validation"))):
        r.log.write(step, "validation", val)
        r.manager.save(step, args=ocp.args.StandardSave(program.replica_state(i)),
                       metrics={"accuracy": val["accuracy"]})
        logging.info("step %d: seed %d validation accuracy %.4f", step,
                     r.config.seed, val["accuracy"])
    if is_log:
      t_mark = time.time()
  if timed_seconds == 0:
    return None
  return timed_steps * config.batch_size * len(replicas) / timed_seconds
