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
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from discrim_jax import config_lib
from discrim_jax import data
from discrim_jax import models
from discrim_jax import steps
from discrim_jax import train
from discrim_jax import workdir as workdir_lib
from discrim_jax.config_lib import parse_arg
from discrim_jax.data.synthetic import SyntheticDataset
from discrim_jax.models import common
from experiments.configs import caltech101 as caltech101_config
from experiments.configs import fashion_mnist as fashion_mnist_config
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


def test_kill_and_resume_equals_uninterrupted_exactly(fashion, tmp_path,
                                                      smoke_config, read_metrics):
  config = smoke_config()
  train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=fashion)

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
  assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "cut")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigterm_at_a_random_step_then_resume_equals_uninterrupted(
    fashion, tmp_path, smoke_config, read_metrics, seed):
  """SIGTERM: the step in flight finishes, a checkpoint of it is saved (with
  the log interval's metrics so far), the run stops with Preempted; rerunning
  ends with exactly the uninterrupted run's records."""
  config = smoke_config()
  kill_at = int(np.random.default_rng(seed).integers(1, 10))  # of 10 steps
  train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=fashion)

  def sigterm(step):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Preempted, match=rf"SIGTERM at step {kill_at} of 10"):
    train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion,
                             step_callback=sigterm)
  assert str(kill_at) in [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed
  train.train_and_evaluate(config, str(tmp_path / "cut"), dataset=fashion)
  assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "whole")


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


def test_cli_sigterm_saves_and_exits_75_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "experiments" / "train.py"),
       "--config=experiments/configs/fashion_mnist.py:smoke",
       f"--workdir={workdir}", "--config.num_epochs=50",
       "--config.log_every_steps=1", "--config.num_devices=1"],
      cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, "the run did not start"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 75, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("preempted:")]
  assert len(lines) == 1 and "rerun the same command to resume" in lines[0]
  assert "Traceback" not in stderr
  step = int(lines[0].split(" at step ")[1].split()[0])
  assert str(step) in [p.name for p in (workdir / "checkpoints").iterdir()]
  # The console has the progress lines; absl's INFO records go to log.txt.
  absl_info = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.M)
  assert not absl_info.search(stderr), stderr[-2000:]
  assert absl_info.search((workdir / "log.txt").read_text())
  assert re.search(r"^gini_kl seed 0: step \d+/500", stderr, re.M), stderr[-2000:]


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
  runs = _seeds_together_and_alone(smoke_config(num_epochs=1, log_every_steps=1),
                                   fashion, tmp_path, read_metrics)
  for seed, (together, alone) in runs.items():
    _metrics_close(_first_step(together), _first_step(alone),
                   FLOAT32_FIRST_STEP_RTOL, f"seed {seed}, float32 step 1")


def test_a_run_trains_with_the_plain_step(fashion, tmp_path, smoke_config,
                                          monkeypatch):
  """A single-seed run calls the plain jitted step, never the vmapped one."""
  calls = {"train_step": 0, "replica_train_step": 0}
  build = steps.build

  def counting_build(*args, **kwargs):
    trainer = build(*args, **kwargs)
    for name in calls:
      fn = getattr(trainer, name)

      def counted(*a, _fn=fn, _name=name, **k):
        calls[_name] += 1
        return _fn(*a, **k)
      setattr(trainer, name, counted)
    return trainer

  monkeypatch.setattr(steps, "build", counting_build)
  train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path), dataset=fashion)
  assert calls == {"train_step": 5, "replica_train_step": 0}


def test_vmapped_seeds_write_each_seeds_outputs(fashion, tmp_path, smoke_config,
                                                read_metrics):
  summaries = train.train_and_evaluate_seeds(
      smoke_config(num_epochs=1), {0: str(tmp_path / "s0"), 3: str(tmp_path / "s3")},
      dataset=fashion)
  assert sorted(summaries) == [0, 3]
  for seed in (0, 3):
    saved = json.loads((tmp_path / f"s{seed}" / "summary.json").read_text())
    assert saved["seed"] == seed and saved["trained_with_seeds"] == [0, 3]
    assert json.loads((tmp_path / f"s{seed}" / "config.json").read_text())["seed"] == seed
    assert [p.name for p in (tmp_path / f"s{seed}" / "checkpoints").iterdir()] == ["5"]
  assert read_metrics(tmp_path / "s0")[0]["ce"] != read_metrics(tmp_path / "s3")[0]["ce"]


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
  plain = steps.train_step

  def overflowing(state, batch, **kwargs):
    new_state, metrics = plain(state, batch, **kwargs)
    metrics["grad_norm"] = jax.numpy.where(state.step >= 6, jax.numpy.inf,
                                           metrics["grad_norm"])
    return new_state, metrics

  monkeypatch.setattr(steps, "train_step", overflowing)
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


@pytest.mark.parametrize("field,value,match", [
    ("model", "resnet34", r"unknown model 'resnet34'.*--config.model"),
    ("objective", "entropy", r"unknown objective 'entropy'.*gini_kl"),
    ("dataset", "", r"config.dataset is empty.*folder:/path"),
    ("batch_size", 60, r"batch_size=60 is not divisible by the 8 devices"),
    ("num_devices", 16, r"num_devices=16 but only 8 devices"),
    ("optimizer.lr", -1.0, r"lr must be > 0"),
    ("xla_cpu_ynn_fusion", "dot,conv",
     r"xla_cpu_ynn_fusion='dot,conv' names \['conv'\].*'' for XLA's default"),
])
def test_config_errors(field, value, match, smoke_config):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate_config(smoke_config(**{"num_devices": -1, field: value}), 8)


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


def test_workdir_with_other_config_is_refused(tmp_path, smoke_config):
  workdir_lib.write_config(smoke_config(), tmp_path)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(config_lib.ConfigError,
                     match=r"different config \(objective: 'gini_kl' -> 'ce'\).*new --workdir"):
    workdir_lib.check_config(smoke_config(objective="ce"), tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"optimizer.lr: 0.1 -> 0.2"):
    workdir_lib.check_config(smoke_config(**{"optimizer.lr": 0.2}), tmp_path)
  assert (tmp_path / "config.json").read_text() == before


def test_workdir_resumes_when_only_non_identity_fields_change(tmp_path, smoke_config):
  workdir_lib.write_config(smoke_config(), tmp_path)
  changed = smoke_config(xla_cpu_ynn_fusion="", xla_cpu_fusion_barriers=False,
                         log_every_steps=7, eval_every_epochs=2,
                         keep_checkpoints=5, data_dir="/elsewhere",
                         num_devices=-1)
  assert set(config_lib.IDENTITY_FIELDS).isdisjoint(
      {"xla_cpu_ynn_fusion", "xla_cpu_fusion_barriers", "log_every_steps",
       "eval_every_epochs", "keep_checkpoints", "data_dir", "num_devices"})
  workdir_lib.check_config(changed, tmp_path)
  workdir_lib.write_config(changed, tmp_path)  # keeps the run's first record
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["log_every_steps"] == 2 and saved["xla_cpu_fusion_barriers"] is True
  # A workdir written before a non-identity field existed resumes too.
  del saved["xla_cpu_fusion_barriers"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_config(smoke_config(), tmp_path)


def test_resume_with_a_new_log_interval_is_accepted(fashion, tmp_path, smoke_config,
                                                    read_metrics):
  train.train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path), dataset=fashion)
  summary = train.train_and_evaluate(smoke_config(num_epochs=1, log_every_steps=5),
                                     str(tmp_path), dataset=fashion)
  assert summary["best_validation_step"] == 5
  assert [r["split"] for r in read_metrics(tmp_path)][-1] == "test"


def test_fusion_barrier_switch_is_applied_once_by_build(smoke_config):
  """config.xla_cpu_fusion_barriers reaches the traced step (a while loop per
  barrier on CPU) through steps.build alone."""
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  loops = {}
  for barriers in (True, False):
    trainer = steps.build(smoke_config(xla_cpu_fusion_barriers=barriers),
                          dataset=dataset)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         dataset.batch(64))
    text = trainer.train_step.lower(trainer.abstract_state, batch).as_text()
    loops[barriers] = text.count("stablehlo.while")
  assert loops[False] == 0 and loops[True] > 0
  # The switch is the trace-time context in models.common, on by default.
  x = jax.numpy.ones(3)
  with common.fusion_barriers(False):
    assert common.fusion_barrier(x) is x
  assert common.fusion_barrier(x) is not x


def test_schedule_warmup_keeps_step_boundaries_and_lr_is_logged(
    fashion, tmp_path, smoke_config, read_metrics):
  config = smoke_config()
  config.schedule.name = "step"
  config.schedule.boundaries_epochs = (1,)
  config.schedule.decay = 0.5
  config.schedule.warmup_epochs = 0.4  # 2 steps of 5
  schedule = steps.create_schedule(config, steps_per_epoch=5)
  assert [float(schedule(s)) for s in range(7)] == pytest.approx(
      [0.0, 0.05, 0.1, 0.1, 0.1, 0.05, 0.05])
  config.log_every_steps = 1
  train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  logged = [r["learning_rate"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  # Step s (1-based) trains with schedule(s - 1).
  assert logged == pytest.approx([float(schedule(s)) for s in range(10)])


def test_adamw_decays_kernels_only():
  params = {"embed": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
            "norm": {"scale": np.ones(2)}, "cls_token": np.ones((1, 1, 2))}
  assert steps.weight_decay_mask(params) == {
      "embed": {"kernel": True, "bias": False}, "norm": {"scale": False},
      "cls_token": False}
  config = config_lib.base_config()
  config_lib.model_defaults(config, "cvt13", image_size=32)
  tx = steps.create_optimizer(config, optax.constant_schedule(1e-3))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # A zero gradient moves only the decayed parameters (AdamW's decoupled decay).
  assert np.all(updates["embed"]["kernel"] < 0)
  for leaf in (updates["embed"]["bias"], updates["norm"]["scale"], updates["cls_token"]):
    assert np.all(leaf == 0)


def _ynn_fusions(hlo):
  """The op names of the fusions XLA:CPU handed to YNNPACK."""
  return [line.split("op_name=")[-1] for line in hlo.splitlines()
          if "kind=kCustom" in line and "__ynn_fusion" in line]


def test_ynn_fusion_reaches_the_compiled_step_and_keeps_the_numbers(fashion,
                                                                    smoke_config):
  assert config_lib.compiler_options(smoke_config(), "gpu") == {}
  assert config_lib.compiler_options(smoke_config(xla_cpu_ynn_fusion=""), "cpu") == {}
  runs = {}
  for kinds in ("dot,reduce", "dot", ""):
    config = smoke_config(xla_cpu_ynn_fusion=kinds)
    trainer = steps.build(config, dataset=fashion)
    state = trainer.init_state(config.seed)
    batch = next(trainer.batches("train", train=True))
    hlo = trainer.train_step.lower(state, batch).compile().as_text()
    runs[kinds] = _ynn_fusions(hlo), jax.device_get(trainer.train_step(state, batch)[1])
  # BatchNorm's and the losses' reductions go to YNNPACK only when asked for,
  # and the convolutions don't (XLA's own kernels are faster on CPU).
  assert any("reduce_sum" in op for op in runs["dot,reduce"][0])
  assert not any("reduce_sum" in op for op in runs["dot"][0])
  assert not any("conv_general_dilated" in op
                 for kinds in ("dot,reduce", "dot") for op in runs[kinds][0])
  # One step's numbers with other reduction kernels: the same mathematics, so
  # they agree to the worst-case rounding of the step's float32 sums.
  for other in ("", "dot"):
    chex.assert_trees_all_close(runs["dot,reduce"][1], runs[other][1],
                                rtol=FLOAT32_FIRST_STEP_RTOL,
                                atol=FLOAT32_FIRST_STEP_RTOL)


def _corrupt(step_dir: Path, kind: str) -> list[Path]:
  """Overwrites the files of one kind in a checkpoint folder; returns them.
  ``kind``: part of the file name, or ``data`` for the array chunks."""
  hit = [p for p in step_dir.rglob("*") if p.is_file() and (
      p.parent.name == "d" if kind == "data" else kind in p.name)]
  for path in hit:
    path.write_bytes(b"corrupt")
  return hit


def test_unreadable_latest_checkpoint_is_moved_aside_and_an_older_one_used(
    fashion, tmp_path, smoke_config, read_metrics):
  config = smoke_config()
  train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=fashion)

  def die_at(step):
    if step == 9:
      raise Interrupt()

  work = tmp_path / "cut"
  with pytest.raises(Interrupt):
    train.train_and_evaluate(config, str(work), dataset=fashion, step_callback=die_at)
  # A newer checkpoint (a copy of step 5's as step 7) whose files are corrupt.
  shutil.copytree(work / "checkpoints" / "5", work / "checkpoints" / "7")
  assert _corrupt(work / "checkpoints" / "7", "manifest")
  train.train_and_evaluate(config, str(work), dataset=fashion)
  aside = list((work / "unreadable_checkpoints").iterdir())
  assert [p.name.split(".")[0] for p in aside] == ["7"]
  assert read_metrics(work) == read_metrics(tmp_path / "whole")


@pytest.mark.parametrize("kind", ["manifest", "_METADATA", "data"])
def test_no_readable_checkpoint_stops_with_one_line_and_keeps_files(
    fashion, tmp_path, smoke_config, kind):
  config = smoke_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert _corrupt(tmp_path / "checkpoints" / "5", kind), kind
  with pytest.raises(RuntimeError,
                     match=r"no readable checkpoint .*step 5 \(moved to .*nothing was deleted"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  (moved,) = (tmp_path / "unreadable_checkpoints").iterdir()
  assert any(p.is_file() for p in moved.rglob("*"))
  # Rerunning does not start again over the earlier run's records.
  records = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(RuntimeError, match=r"unreadable ones were moved to .*new --workdir"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert (tmp_path / "metrics.jsonl").read_text() == records


def test_checkpoint_with_corrupt_step_metadata_still_resumes(
    fashion, tmp_path, smoke_config):
  """orbax's per-step _CHECKPOINT_METADATA (timestamps) is not needed to
  restore: such a checkpoint is used, not moved aside."""
  config = smoke_config(num_epochs=1)
  first = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert _corrupt(tmp_path / "checkpoints" / "5", "_CHECKPOINT_METADATA")
  again = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert again["test_accuracy"] == first["test_accuracy"]
  assert not (tmp_path / "unreadable_checkpoints").exists()


def test_config_arguments():
  args = parse_arg("model=cvt13,smoke", model="resnet18", smoke=False)
  assert args.model == "cvt13" and args.smoke is True
  with pytest.raises(ValueError, match="unknown config argument 'modle'"):
    parse_arg("modle=x", model="resnet18")


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(REPO / "experiments" / "train.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_value_is_one_line_error(tmp_path):
  result = _cli("--config=experiments/configs/fashion_mnist.py:smoke",
                f"--workdir={tmp_path}", "--config.model=resnet99")
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors and "unknown model 'resnet99'" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_cli_unreadable_checkpoint_is_one_line_without_tracebacks(tmp_path):
  args = ("--config=experiments/configs/fashion_mnist.py:smoke",
          f"--workdir={tmp_path}", "--config.num_epochs=1", "--config.num_devices=1")
  # The run itself in this process (the CLI's part is the failing reruns).
  config = config_lib.with_fields(
      fashion_mnist_config.get_config("smoke"), num_epochs=1, num_devices=1)
  train.train_and_evaluate(config, str(tmp_path))
  (tmp_path / "summary.json").unlink()
  assert _corrupt(tmp_path / "checkpoints" / "10", "manifest")
  for expected in ("step 10 \\(moved to", "unreadable ones were moved to"):
    result = _cli(*args)
    assert result.returncode == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_cli_unknown_field_is_rejected(tmp_path):
  result = _cli("--config=experiments/configs/fashion_mnist.py:smoke",
                f"--workdir={tmp_path}", "--config.modle=resnet18")
  assert result.returncode != 0
  assert "modle" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("config_file,shape,num_classes", [
    ("cifar100", (32, 32, 3), 100), ("caltech101", (224, 224, 3), 102)])
@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_paper_config_builds_its_first_step(config_file, shape, num_classes,
                                                  model):
  """Traces and lowers the first train step of each paper config (no compile:
  full-size models would take minutes each on 2 cores)."""
  module = cifar100_config if config_file == "cifar100" else caltech101_config
  config = module.get_config(f"model={model},objective=gini_kl")
  config.unlock()
  config.num_devices = 1
  trainer = steps.build(config, dataset=SyntheticDataset(
      num_classes=num_classes, image_shape=shape, num_examples=config.batch_size))
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *shape), np.float32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32),
           "mask": jax.ShapeDtypeStruct((config.batch_size,), np.float32)}
  lowered = trainer.train_step.lower(trainer.abstract_state, batch)
  _, metrics = lowered.out_info
  layer = config.loss.layers[0]
  assert {f"gini/{layer}", f"kl/{layer}", "ce", "loss"} <= set(metrics)


_WITHOUT_TENSORFLOW = r'''
import sys

class Block:  # as if TensorFlow, TFDS and CLU (which imports TF) were absent
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
      raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
from discrim_jax import data, steps
from discrim_jax.data.synthetic import SyntheticDataset
from experiments.configs import fashion_mnist

config = fashion_mnist.get_config("smoke")
config.num_devices = 1
dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1), num_examples=64)
trainer = steps.build(config, dataset=dataset)
batch = data.to_global_batch(dataset.batch(64), trainer.batch_sharding)
_, metrics = trainer.train_step(trainer.init_state(0), batch)
print("loss", float(metrics["loss"]))
try:
  data.Dataset("cifar100")
except ImportError as e:
  print("error:", e)
'''


def test_steps_run_without_tensorflow():
  """Models, losses and the compiled steps need JAX alone (e.g. on an
  accelerator image): TensorFlow and CLU are imported only to read data and
  to write a run's metrics; reading data without them says what to install."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
  assert np.isfinite(float(lines["loss"])), result.stdout
  assert "needs tensorflow and tensorflow-datasets" in lines["error:"]
  assert "pip install -e ." in lines["error:"]


def test_build_on_given_devices(smoke_config):
  config = smoke_config(num_devices=-1)
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  devices = jax.devices()[2:4]
  trainer = steps.build(config, dataset=dataset, devices=devices)
  assert list(trainer.mesh.devices.flat) == devices
  config.num_devices = 1
  trainer = steps.build(config, dataset=dataset, devices=devices)
  assert list(trainer.mesh.devices.flat) == devices[:1]
