"""The training application: ``train_and_evaluate(config, workdir)``.

A run trains with the jitted step that :func:`discrim_jax.steps.build` makes
(batch sharded over a 1-D ``'data'`` mesh, state replicated), evaluates on the
validation split every ``config.eval_every_epochs``, checkpoints through
orbax (the latest ``config.keep_checkpoints`` plus the best by validation
accuracy) and finally evaluates the best-validation checkpoint on the test
split. Rerunning with the same workdir resumes exactly where the last
checkpoint left off. :func:`train_and_evaluate_seeds` trains several seeds
together with the same step under ``jax.vmap``.

Workdir contents: ``config.json``, ``classes.json`` (the class names, label
order), ``metrics.jsonl`` (one JSON object per
logged step and split), TensorBoard events, ``checkpoints/`` and, at the end,
``summary.json`` and ``feature_class_matrix.npz`` (the matrix P of each loss
layer over the test split, for the best-validation model).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Callable, Iterator
import contextlib
import copy
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from discrim_jax import data as data_lib
from discrim_jax import progress as progress_lib
from discrim_jax import representation
from discrim_jax import steps as steps_lib
from discrim_jax import workdir as workdir_lib


@dataclasses.dataclass
class _Replica:
  """One seed's run: its config, workdir, checkpoints and metrics log."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
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
  variables = jax.device_get({"params": steps_lib.model_params(state.params),
                              "batch_stats": state.batch_stats})
  loaded = pretrained.load_pretrained(trainer.config.init_from,
                                      trainer.config.model, variables)
  logging.info("Initialised from %s", trainer.config.init_from)
  params = dict(loaded["params"])
  if steps_lib.AUX in state.params:  # centres / projection head: as initialised
    params[steps_lib.AUX] = state.params[steps_lib.AUX]
  new = state.replace(params=params,
                      batch_stats=loaded.get("batch_stats", {}),
                      opt_state=state.tx.init(params))
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
  with contextlib.ExitStack() as stack:
    for path in workdirs.values():  # before anything in them is read
      stack.enter_context(workdir_lib.locked(path))
    return _train_seeds(config, workdirs, step_callback, dataset)


def _train_seeds(config, workdirs, step_callback, dataset):
  seeds = list(workdirs)
  with _StopRequests() as requests:  # from start-up to the last write
    replicas = [_Replica(_seed_config(config, seed), epath.Path(workdirs[seed]))
                for seed in seeds]
    for r in replicas:
      workdir_lib.check_config(r.config, r.workdir)
    trainer = steps_lib.build(config, dataset=dataset)
    start = time.time()
    try:
      step, states = _restore_or_init(trainer, replicas)
      requests.raise_if_stopped("before training started")
      for r in replicas:  # built, with its weights: the run's record starts
        workdir_lib.write_config(r.config, r.workdir)
        workdir_lib.write_classes(getattr(trainer.dataset, "class_names", None),
                                  r.workdir)
        r.log = workdir_lib.MetricsLog(r.workdir, step)
      images_per_s = _train_loop(_program(trainer, seeds, states), step,
                                 replicas, step_callback, requests)
      for r in replicas:
        r.manager.wait_until_finished()  # the last save is asynchronous
        workdir_lib.save_throughput(
            r.workdir, None if images_per_s is None else images_per_s / len(seeds))
      requests.raise_if_stopped("after the last step, before the test")
      best_steps, tests = _test_best(trainer, replicas)
      requests.raise_if_stopped("during the test, before its records")
      return {r.config.seed: _write_summary(trainer, r, best_step, test, start,
                                            seeds)
              for r, best_step, test in zip(replicas, best_steps, tests)}
    finally:
      for r in replicas:
        if r.log is not None:
          r.log.close()  # flushes the writers; a no-op when closed already
        if r.manager is not None:
          r.manager.wait_until_finished()
          r.manager.close()


def _seed_config(config, seed: int):
  seed_config = copy.deepcopy(config)
  with seed_config.unlocked():
    seed_config.seed = seed
  return seed_config


def _restore_or_init(trainer: steps_lib.Trainer, replicas: list[_Replica]):
  """``(step, states)``: the replicas' latest checkpoints, or fresh states
  (from ``init_from`` where the config names one)."""
  config = trainer.config
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
    return latest[0], states
  states = [trainer.init_state(r.config.seed) for r in replicas]
  if config.init_from:
    states = [_load_pretrained(trainer, state) for state in states]
  return 0, states


def _test_best(trainer: steps_lib.Trainer, replicas: list[_Replica]):
  """``(best steps, [(test metrics, feature-class matrices)])`` of each
  replica's best-validation checkpoint."""
  best_steps, best_states = [], []
  for r in replicas:
    best_steps.append(r.manager.best_step())
    best_states.append(workdir_lib.restore(r.manager, best_steps[-1],
                                           trainer.abstract_state, r.workdir))
  if trainer.config.representation.enabled:
    return best_steps, [_test_with_representation(trainer, s) for s in best_states]
  seeds = [r.config.seed for r in replicas]
  return best_steps, _program(trainer, seeds, best_states).evaluate(
      "test", with_features=True)


def _write_summary(trainer: steps_lib.Trainer, r: _Replica, best_step: int,
                   test_and_matrices, start: float, seeds: list[int]
                   ) -> dict[str, Any]:
  """The test record, ``summary.json`` and the feature-class matrices."""
  test, matrices = test_and_matrices
  config = trainer.config
  r.log.write(best_step, "test", test)
  r.log.close()
  summary = {
      "test_accuracy": test["accuracy"], "test_ce": test["ce"],
      # Representation metrics, test-set Gini and what they cost.
      **{k: v for k, v in test.items() if k.split("/")[0] in (
          "knn", "probe", "nc1", "gini", "representation_time_s")},
      "best_validation_step": best_step,
      "best_validation_accuracy": float(r.manager.metrics(best_step)["accuracy"]),
      "wall_time_s": time.time() - start,
      "train_images_per_s": workdir_lib.load_throughput(r.workdir),
      "total_steps": trainer.total_steps, "dataset": config.dataset,
      "model": config.model, "objective": config.objective,
      "seed": r.config.seed, "num_devices": trainer.mesh.size,
      "trained_with_seeds": seeds}
  if jax.process_index() == 0:
    with (r.workdir / "feature_class_matrix.npz").open("wb") as f:
      np.savez_compressed(f, **matrices)
    (r.workdir / "summary.json").write_text(json.dumps(
        summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
  return summary


def _test_with_representation(trainer: steps_lib.Trainer, state):
  """``Trainer.evaluate(state, "test", with_features=True)`` plus kNN and
  linear-probe accuracy and NC1 (``discrim_jax.representation``) in the
  metrics, with the seconds they took beyond the test pass itself
  (``representation_time_s``)."""
  start = time.time()
  (test, matrices), test_features, test_labels = trainer.features(state, "test")
  test_time = time.time() - start
  _, train_features, train_labels = trainer.features(
      state, "train",
      max_examples=trainer.config.representation.max_train_examples)
  test.update(representation.evaluate(
      train_features, train_labels, test_features, test_labels,
      num_classes=trainer.dataset.num_classes))
  test["representation_time_s"] = time.time() - start - test_time
  logging.info("test split and representation metrics: %s", test)
  return test, matrices


class Preempted(Exception):
  """A run stopped by SIGTERM/SIGINT (or a multi-host preemption notice) after
  saving a checkpoint of its last step; rerunning the command resumes it."""

  exit_code = 75  # EX_TEMPFAIL: try again


class _StopRequests:
  """SIGTERM and SIGINT set a flag that the loop reads after each step (one
  process); several processes agree on the step through orbax/JAX's
  preemption sync point instead, which JAX's own SIGTERM handler drives."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal is not None:  # the second: at once, one line, no traceback
      print(f"stopped at once by a second {name}; the last saved checkpoint "
            "is kept: rerun the same command to resume", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal = signum
    logging.warning("received %s: stopping at the next safe point (a second "
                    "one stops at once)", name)

  def raise_if_stopped(self, where: str) -> None:
    """Preempted when a stop was asked for: at a point where everything
    needed to resume is saved."""
    if self.signal is not None:
      raise Preempted(f"stopped by {signal.Signals(self.signal).name} {where}; "
                      "rerun the same command to resume")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def stop(self, manager, step: int) -> str | None:
    """Why the run must stop after ``step``, or None."""
    if self.signal is not None:
      return signal.Signals(self.signal).name
    if jax.process_count() > 1 and manager.reached_preemption(step):
      return "a preemption notice"
    return None


def _train_loop(program: _Program, step: int, replicas: list[_Replica],
                step_callback, requests: _StopRequests) -> float | None:
  """Trains to the end from ``step``; returns the images/s of all replicas
  (None when no whole log interval after the first was timed).

  Checkpoints: at each evaluation, every ``config.checkpoint_every_steps``
  (0: evaluations only) and when asked to stop (:class:`Preempted`). A
  checkpoint between log steps carries the log interval's per-step metrics
  (``workdir.save_interval``), so that a resumed run logs what an
  uninterrupted one does.
  """
  trainer = program.trainer
  config = trainer.config
  total = trainer.total_steps
  eval_every = config.eval_every_epochs * trainer.steps_per_epoch
  every = config.get("checkpoint_every_steps", 0)
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(
      num_train_steps=total, writer=replicas[0].log.writer,
      every_steps=config.log_every_steps, every_secs=60)
  pending: list[dict[str, jax.Array]] = []
  # Host copies of this log interval's per-step metrics, per replica: those
  # fetched at a checkpoint, or restored with it.
  loaded = [workdir_lib.load_interval(r.workdir, step) for r in replicas]
  first_step = loaded[0][0]
  carried = [history for _, history in loaded]
  timed_steps, timed_seconds, t_mark = 0, 0.0, None
  batches = program.batches(step)
  progress = progress_lib.Progress(
      total, step, batch_size=config.batch_size * len(replicas),
      desc=f"{config.objective} seed{'s' if program.stacked else ''} "
           + ",".join(map(str, program.seeds)),
      enabled=jax.process_index() == 0)
  with contextlib.closing(progress):
    while step < total:
      pending.append(program.step(next(batches)))
      step += 1
      if step_callback is not None:
        step_callback(step)
      report(step)
      stop = requests.stop(replicas[0].manager, step)
      is_eval = step % eval_every == 0 or step == total
      is_log = step % config.log_every_steps == 0 or is_eval
      is_save = is_eval or bool(every and step % every == 0) or stop is not None
      if is_log or is_save:
        history = jax.device_get(pending)
        for i, r in enumerate(replicas):
          carried[i] += program.split_metrics(history, i)
          workdir_lib.check_finite(carried[i], first_step,
                                   r.manager.latest_step(), r.workdir)
        if t_mark is not None:
          timed_steps += len(pending)
        pending = []
      if is_log:
        for r, mine in zip(replicas, carried):
          means = {k: float(np.mean([h[k] for h in mine])) for k in mine[-1]}
          means["learning_rate"] = mine[-1]["learning_rate"]  # the last step's
          r.log.write(step, "train", means)
        progress.update(step, loss=means["loss"], accuracy=means["accuracy"])
        # Throughput over whole log intervals, excluding the first (compile).
        if t_mark is not None:
          timed_seconds += time.time() - t_mark
        carried, first_step = [[] for _ in replicas], step + 1
      if is_eval:
        results = program.evaluate("validation")
      for i, r in enumerate(replicas):
        if is_eval:
          r.log.write(step, "validation", results[i])
          progress.note(f"{config.objective} seed {r.config.seed}: step "
                        f"{step}/{total}, validation accuracy "
                        f"{results[i]['accuracy']:.4f}")
        if is_save:
          if not is_log:
            workdir_lib.save_interval(r.workdir, r.manager, step, first_step,
                                      carried[i])
          # A checkpoint without a validation score is never the best.
          accuracy = results[i]["accuracy"] if is_eval else -1.0
          r.manager.save(step, args=ocp.args.StandardSave(program.replica_state(i)),
                         metrics={"accuracy": accuracy})
      if is_log:
        t_mark = time.time()
      else:
        progress.update(step)
      if stop is not None:
        rate = (timed_steps * config.batch_size / timed_seconds
                if timed_seconds else None)  # per replica
        for r in replicas:
          r.manager.wait_until_finished()
          workdir_lib.save_throughput(r.workdir, rate)
        raise Preempted(
            f"stopped by {stop} at step {step} of {total}; its checkpoint is "
            f"saved in {replicas[0].workdir / 'checkpoints'}: rerun the same "
            "command to resume")
  if timed_seconds == 0:
    return None
  return timed_steps * config.batch_size * len(replicas) / timed_seconds
