"""End-to-end tests of the training application on tiny models.

Tolerances of tests that compare two programs (1 vs 8 devices, vmapped vs
sequential seeds): the programs must compute the same mathematics and differ
only in the order of float reductions. That is shown in float64
(``jax.enable_x64``), where rounding is ~1e-16 and a bound of 1e-10 leaves
room for its growth over a few SGD steps but none for a real difference
(per-device BatchNorm or loss statistics change the numbers by 1e-2 or more).
In float32 the same comparison is kept, on the real data, for the first step
with a bound derived
from the reductions involved, not measured on one machine: the first step's
metrics are sums over up to n = 64 x 28 x 28 ~ 5e4 terms (BatchNorm
statistics, the loss layer's class sums) and parameter norms over ~1e5 terms,
whose worst-case relative rounding error is n * 2**-24 ~ 3e-3. Later float32
steps are not compared: near-constant BatchNorm channels amplify rounding
~30x per step at lr 0.1, so any bound there would be a measurement.
Resuming the same program on the same machine is exact (bit for bit).
"""

import json
import os
from pathlib import Path
import signal

from etils import epath
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from discrim_jax import checkpoints
from discrim_jax import config_lib
from discrim_jax import data
from discrim_jax import runtime
from discrim_jax import seed_groups
from discrim_jax import step_fns
from discrim_jax import train
from discrim_jax.data.synthetic import SyntheticDataset
from experiments.configs import cifar100 as cifar100_config

REPO = Path(__file__).resolve().parents[1]
# Worst-case relative rounding of a float32 sum of n ~ 5e4 terms (see above).
FLOAT32_FIRST_STEP_RTOL = 5e4 * 2.0**-24
FLOAT64_RTOL = 1e-10


def test_smoke_end_to_end_on_real_data(fashion, tmp_path, smoke_config,
                                       read_metrics):
  config = smoke_config()
  summary = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  records = read_metrics(tmp_path)
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [2, 4, 5, 6, 8, 10]
  for key in ("ce", "gini/stage4", "kl/stage4", "accuracy", "learning_rate",
              "grad_norm", "param_norm", "update_norm", "loss"):
    assert all(np.isfinite(r[key]) for r in train_records), key
  # The auxiliary terms join the loss from the start epoch (1) on.
  first, late = train_records[0], train_records[-1]
  # Before the start epoch the loss is ce + 0 * aux: ce exactly. After it, the
  # interval's mean of per-step float32 sums against the sum of the means:
  # a few float32 ulps of each term; rel=1e-4 is far above that.
  assert first["loss"] == pytest.approx(first["ce"])
  assert late["loss"] == pytest.approx(
      late["ce"] + 0.5 * late["gini/stage4"] + 0.5 * late["kl/stage4"], rel=1e-4)
  assert [r["step"] for r in records if r["split"] == "validation"] == [5, 10]
  test_records = [r for r in records if r["split"] == "test"]
  assert len(test_records) == 1 and test_records[0]["num_examples"] == 200
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["test_accuracy"] == pytest.approx(summary["test_accuracy"])
  assert saved["best_validation_step"] in (5, 10)
  assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["train_images_per_s"] > 0
  assert json.loads((tmp_path / "config.json").read_text())["objective"] == "gini_kl"
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]


def test_smoke_on_mock_cifar100(tmp_path, read_metrics):
  config = cifar100_config.get_config("model=resnet17,objective=gini")
  config.model_kwargs.width_multiplier = 0.125
  config.update(num_epochs=1, batch_size=32, eval_batch_size=40, log_every_steps=2)
  config.loss.start_epoch = 0
  with tfds.testing.mock_data(num_examples=100):
    ds = data.Dataset("cifar100", validation_size=36)
    for split in ("train", "validation", "test"):
      ds.arrays(split)
  summary = train.train_and_evaluate(config, str(tmp_path), dataset=ds)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if r["split"] == "train"] == [2]
  assert "kl/stage4" in records[0] and records[0]["loss"] > records[0]["ce"]
  assert summary["total_steps"] == 2 and summary["model"] == "resnet17"


class Interrupt(Exception):
  pass


def test_kill_and_resume_equals_uninterrupted_exactly(fashion, tmp_path, whole,
                                                      smoke_config, read_metrics):
  config = smoke_config()

  def die_at(step):
    if step == 9:  # mid-epoch 2, after the checkpoint of step 5 and the log of 8
      raise Interrupt()

  with pytest.raises(Interrupt):
    train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion,
                             step_callback=die_at)
  # The interrupted run logged steps 6 and 8 that the checkpoint does not hold.
  assert max(r["step"] for r in read_metrics(tmp_path / "cut")) == 8
  train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion)
  # The same program on the same machine from the same state: bit for bit.
  assert read_metrics(tmp_path / "cut") == whole


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigterm_at_a_random_step_then_resume_equals_uninterrupted(
    fashion, tmp_path, whole, smoke_config, read_metrics, seed):
  """SIGTERM: the step in flight finishes, a checkpoint of it is saved (with
  the log interval's metrics so far), the run stops with Preempted; rerunning
  ends with exactly the uninterrupted run's records."""
  config = smoke_config()
  kill_at = int(np.random.default_rng(seed).integers(1, 10))  # of 10 steps

  def sigterm(step):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Preempted, match=rf"SIGTERM at step {kill_at} of 10"):
    train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion,
                             step_callback=sigterm)
  assert str(kill_at) in [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed
  train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion)
  assert read_metrics(tmp_path / "cut") == whole


def test_checkpoint_every_steps_resumes_mid_interval_exactly(
    fashion, tmp_path, smoke_config, read_metrics):
  config = smoke_config(checkpoint_every_steps=3, log_every_steps=4)
  train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=fashion)

  def die_at(step):
    if step == 8:
      raise Interrupt()

  with pytest.raises(Interrupt):
    train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion,
                             step_callback=die_at)
  # Checkpoints at 3, 5 (evaluation) and 6; 6 cut the interval 6..8.
  steps = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir())
  assert steps[-1] == 6
  train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion)
  assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "whole")
  summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
  assert summary["best_validation_step"] in (5, 10)  # never an unscored one


def _metrics_close(a, b, rtol, what):
  """Two runs' metrics.jsonl records: same steps and splits, values to rtol."""
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for x, y in zip(a, b):
    for key in set(x) - {"step", "split"}:
      np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=rtol,
                                 err_msg=f"{what}: step {x['step']} {x['split']} {key}")


def _first_step(records):
  return [r for r in records if r["split"] == "train"][:1]


# float64 runs are small: XLA:CPU's float64 convolutions are ~80x slower than
# its float32 ones. Random 8x8 images and labels suffice to compare two
# programs' mathematics; 2 epochs of 2 steps at the recipe's lr 0.1, with the
# Gini/KL terms on from the start.
_X64_DATA = dict(num_classes=10, image_shape=(8, 8, 1), num_examples=32)
_X64_CONFIG = {"num_epochs": 2, "batch_size": 16, "eval_batch_size": 16,
               "log_every_steps": 1, "model_kwargs.dtype": "float64",
               "loss.start_epoch": 0.0}


def test_eight_devices_equal_one_device_float64(tmp_path, smoke_config,
                                                read_metrics):
  """train_and_evaluate itself on a mesh of 8 devices and of 1: BatchNorm, the
  Gini/KL losses and the gradients must use the global batch."""
  assert jax.device_count() == 8, (
      "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)")
  dataset = SyntheticDataset(**_X64_DATA)
  runs = {}
  with jax.enable_x64(True):
    for n in (8, 1):
      summary = train.train_and_evaluate(
          smoke_config(num_devices=n, **_X64_CONFIG), str(tmp_path / f"d{n}"),
          dataset=dataset)
      assert summary["num_devices"] == n
      runs[n] = read_metrics(tmp_path / f"d{n}")
  assert len(runs[1]) == 4 + 2 + 1 and isinstance(runs[1][0]["ce"], float)
  _metrics_close(runs[8], runs[1], FLOAT64_RTOL, "8 vs 1 devices, float64")


def test_eight_devices_equal_one_device_float32(fashion, tmp_path, smoke_config,
                                                read_metrics):
  runs = {}
  for n in (8, 1):
    config = smoke_config(num_devices=n, num_epochs=1, log_every_steps=1)
    train.train_and_evaluate(config, str(tmp_path / f"d{n}"), dataset=fashion)
    runs[n] = read_metrics(tmp_path / f"d{n}")
  _metrics_close(_first_step(runs[8]), _first_step(runs[1]),
                 FLOAT32_FIRST_STEP_RTOL, "8 vs 1 devices, float32 step 1")


def _seeds_together_and_alone(config, dataset, tmp_path, read_metrics):
  together = train.train_and_evaluate_seeds(
      config, {0: str(tmp_path / "v0"), 1: str(tmp_path / "v1")}, dataset=dataset)
  assert [together[s]["trained_with_seeds"] for s in (0, 1)] == [[0, 1]] * 2
  out = {}
  for seed in (0, 1):
    alone = config.copy_and_resolve_references()
    alone.seed = seed
    train.train_and_evaluate(alone, str(tmp_path / f"s{seed}"), dataset=dataset)
    out[seed] = (read_metrics(tmp_path / f"v{seed}"),
                 read_metrics(tmp_path / f"s{seed}"))
  # The seeds are different runs.
  assert out[0][0][0]["ce"] != out[1][0][0]["ce"]
  return out


def test_vmapped_seeds_equal_sequential_seeds_float64(tmp_path, smoke_config,
                                                      read_metrics):
  """Seeds trained together (the step under jax.vmap) give each seed the run
  it gets alone (the plain step)."""
  with jax.enable_x64(True):
    runs = _seeds_together_and_alone(smoke_config(**_X64_CONFIG),
                                     SyntheticDataset(**_X64_DATA), tmp_path,
                                     read_metrics)
  for seed, (together, alone) in runs.items():
    _metrics_close(together, alone, FLOAT64_RTOL, f"seed {seed}, float64")


def test_vmapped_seeds_equal_sequential_seeds_float32(fashion, tmp_path,
                                                      smoke_config, read_metrics):
  """Also: seeds trained together each write their own workdir's outputs."""
  runs = _seeds_together_and_alone(smoke_config(num_epochs=1, log_every_steps=1),
                                   fashion, tmp_path, read_metrics)
  for seed, (together, alone) in runs.items():
    _metrics_close(_first_step(together), _first_step(alone),
                   FLOAT32_FIRST_STEP_RTOL, f"seed {seed}, float32 step 1")
    workdir = tmp_path / f"v{seed}"
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["seed"] == seed and saved["trained_with_seeds"] == [0, 1]
    assert json.loads((workdir / "config.json").read_text())["seed"] == seed
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["5"]


def test_a_run_trains_with_the_plain_step(fashion, tmp_path, smoke_config,
                                          monkeypatch):
  """A single-seed run calls the plain jitted step, never the vmapped one."""
  calls = {"train_step": 0}
  build = runtime.build

  def counting_build(*args, **kwargs):
    program = build(*args, **kwargs)
    for name in calls:
      fn = getattr(program, name)

      def counted(*a, _fn=fn, _name=name, **k):
        calls[_name] += 1
        return _fn(*a, **k)
      setattr(program, name, counted)
    return program

  def no_vmap(*args, **kwargs):
    raise AssertionError("a single-seed run built the vmapped steps")

  monkeypatch.setattr(runtime, "build", counting_build)
  monkeypatch.setattr(seed_groups, "VmappedSeeds", no_vmap)
  train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path), dataset=fashion)
  assert calls == {"train_step": 5}


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(fashion, tmp_path,
                                                               smoke_config):
  # Epoch 1 trains normally; then the learning rate jumps to 1e30.
  config = smoke_config()
  config.schedule.name = "step"
  config.schedule.boundaries_epochs = (1,)
  config.schedule.decay = 1e32
  with pytest.raises(FloatingPointError,
                     match=r"non-finite \S+ = (nan|inf) at step [6-9].*step 5\) is kept"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["5"]
  assert not (tmp_path / "summary.json").exists()


def test_non_finite_gradient_with_finite_loss_stops_the_run(
    fashion, tmp_path, smoke_config, monkeypatch):
  """A gradient that overflows while the loss stays finite stops the run like
  a non-finite loss term: named, with step, before any later checkpoint."""
  plain = step_fns.train_step

  def overflowing(state, batch, **kwargs):
    new_state, metrics = plain(state, batch, **kwargs)
    metrics["grad_norm"] = jax.numpy.where(state.step >= 6, jax.numpy.inf,
                                           metrics["grad_norm"])
    return new_state, metrics

  monkeypatch.setattr(step_fns, "train_step", overflowing)
  with pytest.raises(FloatingPointError,
                     match=r"non-finite grad_norm = inf at step 7;.*step 5\) is kept"):
    train.train_and_evaluate(smoke_config(), str(tmp_path), dataset=fashion)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["5"]


def test_rerun_of_a_finished_run_keeps_its_throughput_in_strict_json(
    fashion, tmp_path, smoke_config):
  config = smoke_config(num_epochs=1, log_every_steps=1)
  first = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  again = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  strict = json.loads((tmp_path / "summary.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
  assert first["train_images_per_s"] > 0
  assert strict["train_images_per_s"] == again["train_images_per_s"] == (
      first["train_images_per_s"])
  assert strict["test_accuracy"] == first["test_accuracy"]


def _validation_accuracies(monkeypatch, by_seed):
  """Each seed's validation accuracies, in order of evaluation, stand in for
  the measured ones: they decide which checkpoint is the best."""
  calls = {}

  def patch(cls):
    evaluate = cls.evaluate

    def scored(self, split, **kwargs):
      results = evaluate(self, split, **kwargs)
      if split == "validation":
        for seed, result in zip(self.seeds, results):
          calls[seed] = calls.get(seed, -1) + 1
          result["accuracy"] = by_seed[seed][calls[seed]]
      return results
    monkeypatch.setattr(cls, "evaluate", scored)
  patch(seed_groups.OneSeed)
  patch(seed_groups.VmappedSeeds)


def test_the_test_split_is_scored_with_the_best_checkpoint(
    fashion, tmp_path, monkeypatch, smoke_config):
  """The test record and feature-class matrices are those of the best
  validation checkpoint's state, read back from its files, whether that is
  an earlier step's (restored) or the last step's (the state the loop ended
  with, tested without reading it back): for one seed, and for seeds
  trained together whose best steps differ. Equal exactly: the same states
  evaluated by the same program."""
  config = smoke_config()  # validation at steps 5 and 10
  program = runtime.build_from_config(config, dataset=fashion)
  cases = [({0: (0.9, 0.1)}, {0: 5}), ({0: (0.1, 0.9)}, {0: 10}),
           ({0: (0.9, 0.1), 1: (0.1, 0.9)}, {0: 5, 1: 10})]
  for case, (accuracies, best) in enumerate(cases):
    with monkeypatch.context() as m:
      _validation_accuracies(m, accuracies)
      workdirs = {seed: str(tmp_path / f"{case}_{seed}") for seed in accuracies}
      summaries = train.train_and_evaluate_seeds(
          config, workdirs, dataset=fashion)
    states = []
    for seed, workdir in workdirs.items():
      assert summaries[seed]["best_validation_step"] == best[seed], (case, seed)
      manager = checkpoints.checkpoint_manager(config.keep_checkpoints,
                                               epath.Path(workdir))
      states.append(checkpoints.restore(
          manager, best[seed], program.abstract_state, epath.Path(workdir)))
      manager.close()
    # What the run scores its seeds with: the plain eval step for one, the
    # vmapped one for several (which sums in another order).
    expected = seed_groups.drive(program, list(workdirs), states).evaluate(
        "test", with_features=True)
    for (seed, workdir), (test, matrices) in zip(workdirs.items(), expected):
      summary = summaries[seed]
      assert (summary["test_accuracy"], summary["test_ce"]) == (
          test["accuracy"], test["ce"]), (case, seed)
      saved = np.load(Path(workdir) / "feature_class_matrix.npz")
      for layer, matrix in matrices.items():
        np.testing.assert_array_equal(saved[layer], matrix)


def test_failed_build_leaves_no_config_and_the_fixed_command_trains(
    fashion, tmp_path, smoke_config):
  """A loss layer the model lacks fails before anything is written, so the
  corrected command trains in the same workdir."""
  bad = smoke_config(num_epochs=1)
  bad.loss.layers = ("stage9",)
  with pytest.raises(config_lib.ConfigError,
                     match=r"names \['stage9'\].*available: .*'stage4'.*--config.loss.layers"):
    train.train_and_evaluate(bad, str(tmp_path), dataset=fashion)
  assert not (tmp_path / "config.json").exists()
  summary = train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path),
                                     dataset=fashion)
  assert summary["total_steps"] == 5


def test_resume_with_a_new_log_interval_is_accepted(fashion, tmp_path, smoke_config,
                                                    read_metrics):
  train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path), dataset=fashion)
  summary = train.train_and_evaluate(smoke_config(num_epochs=1, log_every_steps=5),
                                     str(tmp_path), dataset=fashion)
  assert summary["best_validation_step"] == 5
  assert [r["split"] for r in read_metrics(tmp_path)][-1] == "test"
