"""The training application: ``train_and_evaluate(config, workdir)``.

A run trains with the jitted step of the :class:`discrim_jax.runtime.Program`
built from its resolved config (``discrim_jax.run_spec``)
(batch sharded over a 1-D ``'data'`` mesh, state replicated), evaluates on the
validation split every ``config.eval_every_epochs``, checkpoints through
orbax (the latest ``config.keep_checkpoints`` plus the best by validation
accuracy) and finally evaluates the best-validation checkpoint on the test
split. Rerunning with the same workdir resumes exactly where the last
checkpoint left off. :func:`train_and_evaluate_seeds` trains several seeds
together with the same step under ``jax.vmap`` (``discrim_jax.seed_groups``).

Workdir contents: ``config.json``, ``classes.json`` (the class names, label
order), ``metrics.jsonl`` (one JSON object per
logged step and split), TensorBoard events, ``checkpoints/`` and, at the end,
``summary.json`` and ``feature_class_matrix.npz`` (the matrix P of each loss
layer over the test split, for the best-validation model).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Callable
import contextlib
import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from discrim_jax import checkpoints
from discrim_jax import data as data_lib
from discrim_jax import evaluation
from discrim_jax import progress as progress_lib
from discrim_jax import run_spec as run_spec_lib
from discrim_jax import runtime
from discrim_jax import seed_groups
from discrim_jax import stopping
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import ConfigError
from discrim_jax.stopping import Preempted  # pylint: disable=unused-import


@dataclasses.dataclass
class _Replica:
  """One seed's run: its spec, workdir, checkpoints and metrics log."""
  spec: run_spec_lib.RunSpec
  workdir: epath.Path
  manager: ocp.CheckpointManager | None = None
  log: workdir_lib.MetricsLog | None = None


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
  with stopping.StopRequests() as requests:  # from start-up to the last write
    spec = run_spec_lib.resolve(config, jax.device_count(),
                                jax.devices()[0].platform)
    replicas = [_Replica(spec.with_seed(seed), epath.Path(workdirs[seed]))
                for seed in seeds]
    for r in replicas:  # before the data is read or anything compiled
      workdir_lib.check_config(r.spec.config, r.workdir)
    if spec.data_options["train_subset_seed"] is not None and len(seeds) > 1:
      raise ConfigError(
          "config.resample_subset gives each seed its own training images; "
          "train the seeds one at a time (drop --vmap_seeds)")
    # One seed: its own spec (the seed may choose its training subset).
    program = runtime.build(replicas[0].spec if len(seeds) == 1 else spec,
                            dataset=dataset)
    start = time.time()
    try:
      step, states = _restore_or_init(program, replicas)
      requests.raise_if_stopped("before training started")
      _start_records(program, replicas, step)
      trained = seed_groups.drive(program, seeds, states)
      images_per_s = _train_loop(trained, step, replicas, step_callback,
                                 requests)
      for r in replicas:
        r.manager.wait_until_finished()  # the last save is asynchronous
        workdir_lib.save_throughput(
            r.workdir, None if images_per_s is None else images_per_s / len(seeds))
      requests.raise_if_stopped("after the last step, before the test")
      best_steps, tests = _test_best(program, replicas, trained)
      requests.raise_if_stopped("during the test, before its records")
      return {r.spec.seed: _write_summary(program, r, best_step, test, start,
                                          seeds)
              for r, best_step, test in zip(replicas, best_steps, tests)}
    finally:
      for r in replicas:
        if r.log is not None:
          r.log.close()  # flushes the writers; a no-op when closed already
        if r.manager is not None:
          r.manager.wait_until_finished()
          r.manager.close()


def _start_records(program: runtime.Program, replicas: list[_Replica],
                   step: int) -> None:
  """Built, with its weights: each run's record starts (config.json,
  classes.json, the metrics log)."""
  for r in replicas:
    workdir_lib.write_config(r.spec.config, r.workdir)
    workdir_lib.write_classes(getattr(program.dataset, "class_names", None),
                              r.workdir)
    r.log = workdir_lib.MetricsLog(r.workdir, step)


def _restore_or_init(program: runtime.Program, replicas: list[_Replica]):
  """``(step, states)``: the replicas' latest checkpoints, or fresh states
  (from ``init_from`` where the config names one)."""
  latest, states = [], []
  for r in replicas:
    r.manager, step, state = checkpoints.restore_latest(
        program.spec.keep_checkpoints, r.workdir, program.abstract_state)
    latest.append(step)
    states.append(state)
  if len(set(latest)) > 1:
    raise RuntimeError(
        f"the seeds' workdirs hold checkpoints of different steps {latest}; "
        "train them one at a time (without --vmap_seeds) to resume")
  if latest[0] is not None:
    logging.info("Resumed from the checkpoints of step %d", latest[0])
    return latest[0], states
  states = [program.init_state(r.spec.seed) for r in replicas]
  if program.spec.init_from:
    from discrim_jax import pretrained  # pylint: disable=g-import-not-at-top
    states = [pretrained.into_state(program.spec.init_from, program.spec.model,
                                     state, program.state_sharding)
              for state in states]
  return 0, states


def _test_best(program: runtime.Program, replicas: list[_Replica], trained):
  """``(best steps, [(test metrics, feature-class matrices)])`` of each
  replica's best-validation checkpoint. A best checkpoint of the last step
  holds the state ``trained`` ended with, saved just before: that state is
  tested as it is, without reading it back (a restore took 0.17-0.25 s for
  the smoke model on a 2-core AMD EPYC, more for larger ones)."""
  best_steps = [r.manager.best_step() for r in replicas]
  last = [step == program.total_steps for step in best_steps]
  representation = program.spec.representation["enabled"]
  if all(last) and not representation:
    return best_steps, trained.evaluate("test", with_features=True)
  best_states = [
      trained.state_of(i) if is_last else checkpoints.restore(
          r.manager, step, program.abstract_state, r.workdir)
      for i, (r, step, is_last) in enumerate(zip(replicas, best_steps, last))]
  if representation:
    return best_steps, [evaluation.final_test(program, s) for s in best_states]
  return best_steps, seed_groups.drive(
      program, trained.seeds, best_states).evaluate("test", with_features=True)


def _write_summary(program: runtime.Program, r: _Replica, best_step: int,
                   test_and_matrices, start: float, seeds: list[int]
                   ) -> dict[str, Any]:
  """The test record, ``summary.json`` and the feature-class matrices."""
  test, matrices = test_and_matrices
  spec = program.spec
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
      "total_steps": program.total_steps, "dataset": spec.dataset,
      "model": spec.model, "objective": spec.objective.name,
      "seed": r.spec.seed, "num_devices": program.mesh.size,
      "trained_with_seeds": seeds}
  if jax.process_index() == 0:
    with (r.workdir / "feature_class_matrix.npz").open("wb") as f:
      np.savez_compressed(f, **matrices)
    workdir_lib.write_summary(r.workdir, summary)
  return summary


@dataclasses.dataclass
class _Interval:
  """The loop's host-side record of the current log interval: the steps'
  metrics not fetched yet, each replica's fetched ones (``carried``, which
  a checkpoint between log steps saves and a resume restores), and the
  throughput timing over whole intervals after the first (compile)."""
  carried: list[list[dict[str, float]]]
  first_step: int
  pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  timed_steps: int = 0
  timed_seconds: float = 0.0
  mark: float | None = None

  def fetch(self, seeds, replicas: list[_Replica]) -> None:
    """The pending metrics to the host, checked finite."""
    history = jax.device_get(self.pending)
    for i, r in enumerate(replicas):
      self.carried[i] += seeds.host_metrics(history, i)
      workdir_lib.check_finite(self.carried[i], self.first_step,
                               r.manager.latest_step(), r.workdir)
    if self.mark is not None:
      self.timed_steps += len(self.pending)
    self.pending = []

  def log(self, step: int, replicas: list[_Replica]) -> dict[str, float]:
    """Each replica's interval means as its train record; starts the next
    interval. Returns the last replica's means."""
    for r, mine in zip(replicas, self.carried):
      means = {k: float(np.mean([h[k] for h in mine])) for k in mine[-1]}
      means["learning_rate"] = mine[-1]["learning_rate"]  # the last step's
      r.log.write(step, "train", means)
    if self.mark is not None:
      self.timed_seconds += time.time() - self.mark
    self.carried, self.first_step = [[] for _ in replicas], step + 1
    return means

  def images_per_s(self, batch_size: int) -> float | None:
    """Per replica; None when no whole interval after the first was timed."""
    if not self.timed_seconds:
      return None
    return self.timed_steps * batch_size / self.timed_seconds


def _train_loop(seeds, step: int, replicas: list[_Replica], step_callback,
                requests: stopping.StopRequests) -> float | None:
  """Trains to the end from ``step``; returns the images/s of all replicas
  (None when no whole log interval after the first was timed).

  Checkpoints: at each evaluation, every ``config.checkpoint_every_steps``
  (0: evaluations only) and when asked to stop (:class:`Preempted`). A
  checkpoint between log steps carries the log interval's per-step metrics
  (``workdir.save_interval``), so that a resumed run logs what an
  uninterrupted one does.
  """
  program = seeds.program
  spec, total = program.spec, program.total_steps
  eval_every = spec.eval_every_epochs * program.steps_per_epoch
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(
      num_train_steps=total, writer=replicas[0].log.writer,
      every_steps=spec.log_every_steps, every_secs=60)
  loaded = [checkpoints.load_interval(r.workdir, step) for r in replicas]
  interval = _Interval([history for _, history in loaded], loaded[0][0])
  batches = seeds.batches(step)
  progress = _progress(program, seeds.seeds, step)
  with contextlib.closing(progress):
    while step < total:
      interval.pending.append(seeds.step(next(batches)))
      step += 1
      if step_callback is not None:
        step_callback(step)
      report(step)
      stop = requests.stop(replicas[0].manager, step)
      is_eval = step % eval_every == 0 or step == total
      is_log = step % spec.log_every_steps == 0 or is_eval
      every = spec.checkpoint_every_steps
      is_save = is_eval or bool(every and step % every == 0) or stop is not None
      if is_log or is_save:
        interval.fetch(seeds, replicas)
      if is_log:
        means = interval.log(step, replicas)
        progress.update(step, loss=means["loss"], accuracy=means["accuracy"])
      _evaluate_and_save(seeds, step, replicas, interval, progress,
                         is_eval=is_eval, is_log=is_log, is_save=is_save)
      if is_log:
        interval.mark = time.time()
      else:
        progress.update(step)
      if stop is not None:
        _preempted(stop, step, total, replicas,
                   interval.images_per_s(spec.batch_size))
  rate = interval.images_per_s(spec.batch_size)
  return None if rate is None else rate * len(replicas)


def _progress(program: runtime.Program, seeds: list[int], step: int):
  spec = program.spec
  return progress_lib.Progress(
      program.total_steps, step, batch_size=spec.batch_size * len(seeds),
      desc=f"{spec.objective.name} seed{'s' if len(seeds) > 1 else ''} "
           + ",".join(map(str, seeds)),
      enabled=jax.process_index() == 0)


def _evaluate_and_save(seeds, step: int, replicas: list[_Replica],
                       interval: _Interval, progress, *, is_eval: bool,
                       is_log: bool, is_save: bool) -> None:
  """The validation record and the checkpoint of each replica at ``step``
  (a checkpoint without a validation score is never the best)."""
  results = seeds.evaluate("validation") if is_eval else None
  spec = seeds.program.spec
  for i, r in enumerate(replicas):
    if is_eval:
      r.log.write(step, "validation", results[i])
      progress.note(f"{spec.objective.name} seed {r.spec.seed}: step "
                    f"{step}/{seeds.program.total_steps}, validation accuracy "
                    f"{results[i]['accuracy']:.4f}")
    if is_save:
      if not is_log:
        checkpoints.save_interval(r.workdir, r.manager, step,
                                  interval.first_step, interval.carried[i])
      accuracy = results[i]["accuracy"] if is_eval else -1.0
      r.manager.save(step, args=ocp.args.StandardSave(seeds.state_of(i)),
                     metrics={"accuracy": accuracy})


def _preempted(stop: str, step: int, total: int, replicas: list[_Replica],
               rate: float | None) -> None:
  """Waits for the last checkpoint, records the throughput, raises Preempted."""
  for r in replicas:
    r.manager.wait_until_finished()
    workdir_lib.save_throughput(r.workdir, rate)
  raise Preempted(
      f"stopped by {stop} at step {step} of {total}; its checkpoint is saved in {replicas[0].workdir / 'checkpoints'}: "
      "rerun the same command to resume")
