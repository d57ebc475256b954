"""End-to-end tests of the training application on tiny models."""

import json
import os
from pathlib import Path
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from discrim_jax import config_lib
from discrim_jax import data
from discrim_jax import train
from discrim_jax.config_lib import parse_arg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from discrim_jax.data.synthetic import SyntheticDataset  # noqa: E402
from experiments.configs import caltech101 as caltech101_config  # noqa: E402
from experiments.configs import cifar100 as cifar100_config  # noqa: E402
from experiments.configs import fashion_mnist as fashion_config  # noqa: E402


def smoke_config(**overrides):
  config = fashion_config.get_config("smoke")
  config.eval_subset = 200
  config.eval_batch_size = 200
  config.train_subset = 320  # 5 steps of 64 per epoch
  config.log_every_steps = 2
  config.num_devices = 1  # the 8-device path has its own test; saves compiles
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture(scope="module")
def fashion(fashion_data_dir):
  ds = data.Dataset("fashion_mnist", data_dir=fashion_data_dir,
                    max_examples={"train": 320, "validation": 200, "test": 200})
  for split in ("train", "validation", "test"):
    ds.arrays(split)
  return ds


def read_metrics(workdir):
  return [json.loads(line) for line in
          (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_smoke_end_to_end_on_real_data(fashion, tmp_path):
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


def test_smoke_on_mock_cifar100(tmp_path):
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


def test_kill_and_resume_equals_uninterrupted(fashion, tmp_path):
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
  whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
  assert [(r["step"], r["split"]) for r in whole] == [
      (r["step"], r["split"]) for r in resumed]
  for a, b in zip(whole, resumed):
    for key in a:
      if key not in ("step", "split"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=str(a))


def test_vmapped_seeds_equal_sequential_seeds(fashion):
  # lr 0.01: at 0.1 this tiny net amplifies float rounding ~30x per step.
  trainer = train.build(smoke_config(**{"optimizer.lr": 0.01}), dataset=fashion)
  states = trainer.stack(trainer.init_state(0), trainer.init_state(1))
  batches = trainer.replica_batches([0, 1], 0)
  together = []
  for _ in range(3):
    states, metrics = trainer.replica_train_step(states, next(batches))
    together.append(jax.device_get(metrics))
  for r, seed in enumerate((0, 1)):
    state = trainer.init_state(seed)
    batches = trainer.batches("train", train=True, seed=seed)
    for step in range(3):
      state, metrics = trainer.train_step(state, next(batches))
      mine = jax.tree.map(lambda x: x[r], together[step])  # pylint: disable=cell-var-from-loop
      # Step 1 agrees to float rounding; later steps let the rounding grow,
      # the gradient norm fastest (near-constant BatchNorm channels).
      metrics = jax.device_get(metrics)
      for key, value in metrics.items():
        tol = 1e-4 if step == 0 else (5e-2 if key.endswith("_norm") else 1e-3)
        np.testing.assert_allclose(value, mine[key], rtol=tol, atol=1e-6,
                                   err_msg=f"seed {seed} step {step + 1} {key}")
  assert not np.isclose(together[0]["ce"][0], together[0]["ce"][1])


def test_vmapped_seeds_write_each_seeds_outputs(fashion, tmp_path):
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


def _run_steps(config, dataset, num_steps):
  """The trainer, the parameters after each step, and each step's metrics."""
  trainer = train.build(config, dataset=dataset)
  state = trainer.init_state(config.seed)
  params, metrics = [], []
  batches = trainer.batches("train", train=True)
  for _ in range(num_steps):
    state, m = trainer.train_step(state, next(batches))
    params.append(jax.device_get(state.params))
    metrics.append(m)
  return trainer, params, jax.device_get(metrics)


def test_eight_devices_equal_one_device(fashion):
  assert jax.device_count() == 8, (
      "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)")
  t8, params8, metrics8 = _run_steps(smoke_config(num_devices=-1), fashion, 3)
  t1, params1, metrics1 = _run_steps(smoke_config(num_devices=1), fashion, 3)
  assert t8.mesh.size == 8 and t1.mesh.size == 1
  # The first step differs only by the order of float reductions. Per-device
  # (not global) BatchNorm or loss statistics, or gradients not summed over
  # the devices, would differ by far more (each device holds 8 of 64).
  chex.assert_trees_all_close(metrics8[0], metrics1[0], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(params8[0], params1[0], rtol=1e-4, atol=1e-5)
  # Later steps let that rounding grow (~30x a step at lr 0.1: the tiny net's
  # near-constant BatchNorm channels, whose fast variance E[x^2] - E[x]^2
  # amplifies it), so after 3 steps only the metrics are compared, loosely.
  chex.assert_trees_all_close(metrics8, metrics1, rtol=5e-3, atol=1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(fashion, tmp_path):
  # Epoch 1 trains normally; then the learning rate jumps to 1e30.
  config = smoke_config()
  config.schedule.name = "step"
  config.schedule.boundaries_epochs = (1,)
  config.schedule.decay = 1e32
  with pytest.raises(FloatingPointError,
                     match=r"non-finite \S+ = nan at step [6-9].*step 5\) is kept"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["5"]
  assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("field,value,match", [
    ("model", "resnet34", r"unknown model 'resnet34'.*--config.model"),
    ("objective", "entropy", r"unknown objective 'entropy'.*gini_kl"),
    ("dataset", "imagenet", r"unknown data set 'imagenet'"),
    ("batch_size", 60, r"batch_size=60 is not divisible by the 8 devices"),
    ("num_devices", 16, r"num_devices=16 but only 8 devices"),
    ("optimizer.lr", -1.0, r"lr must be > 0"),
    ("xla_cpu_ynn_fusion", "dot,conv",
     r"xla_cpu_ynn_fusion='dot,conv' names \['conv'\].*'' for XLA's default"),
])
def test_config_errors(field, value, match):
  with pytest.raises(train.ConfigError, match=match):
    train.validate_config(smoke_config(**{"num_devices": -1, field: value}))


def test_loss_layer_missing_from_model_is_named(fashion, tmp_path):
  config = smoke_config()
  config.loss.layers = ("stage7",)
  with pytest.raises(ValueError, match=r"\['stage7'\].*available"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)


def test_workdir_with_other_config_is_refused(fashion, tmp_path):
  train.check_workdir_config(smoke_config(), tmp_path)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(train.ConfigError,
                     match=r"different config \(objective: 'gini_kl' -> 'ce'\).*new --workdir"):
    train.check_workdir_config(smoke_config(objective="ce"), tmp_path)
  assert (tmp_path / "config.json").read_text() == before


def test_workdir_resumes_with_other_speed_only_fields(tmp_path):
  train.check_workdir_config(smoke_config(), tmp_path)
  train.check_workdir_config(
      smoke_config(xla_cpu_ynn_fusion="", xla_cpu_fusion_barriers=False), tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["xla_cpu_ynn_fusion"] == "dot,reduce"
  assert saved["xla_cpu_fusion_barriers"] is True
  # A workdir written before the field existed resumes too.
  del saved["xla_cpu_fusion_barriers"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_workdir_config(smoke_config(), tmp_path)


def test_fusion_barriers_reach_resnets_only():
  for barriers in (True, False):
    model = train.create_model(smoke_config(xla_cpu_fusion_barriers=barriers), 10)
    assert model.fusion_barriers is barriers
  config = smoke_config(xla_cpu_fusion_barriers=True)
  config_lib.model_defaults(config, "cvt13", image_size=32)
  assert not hasattr(train.create_model(config, 10), "fusion_barriers")


def _ynn_fusions(hlo):
  """The op names of the fusions XLA:CPU handed to YNNPACK."""
  return [line.split("op_name=")[-1] for line in hlo.splitlines()
          if "kind=kCustom" in line and "__ynn_fusion" in line]


def test_ynn_fusion_reaches_the_compiled_step_and_keeps_the_numbers(fashion):
  assert train.compiler_options(smoke_config(), "gpu") == {}
  assert train.compiler_options(smoke_config(xla_cpu_ynn_fusion=""), "cpu") == {}
  runs = {}
  for kinds in ("dot,reduce", "dot", ""):
    config = smoke_config(xla_cpu_ynn_fusion=kinds)
    trainer = train.build(config, dataset=fashion)
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
  # The default's numbers are XLA's default's (same reduction kernels) ...
  chex.assert_trees_all_close(runs["dot,reduce"][1], runs[""][1],
                              rtol=1e-5, atol=1e-6)
  # ... and XLA's own reduction order moves grad_norm by ~1e-3 relative: the
  # tiny net has near-constant BatchNorm channels whose fast variance
  # (E[x^2] - E[x]^2) amplifies rounding.
  chex.assert_trees_all_close(runs["dot,reduce"][1], runs["dot"][1],
                              rtol=5e-3, atol=1e-5)


def test_corrupt_checkpoint_gives_clear_error_and_is_kept(fashion, tmp_path):
  config = smoke_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  for path in (tmp_path / "checkpoints" / "5").rglob("*"):
    if path.is_file() and "manifest" in path.name:
      path.write_bytes(b"corrupt")
  with pytest.raises(RuntimeError, match=r"cannot restore the checkpoint of step 5.*move"):
    train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  assert (tmp_path / "checkpoints" / "5").exists()


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


def test_cli_unknown_field_is_rejected(tmp_path):
  result = _cli("--config=experiments/configs/fashion_mnist.py:smoke",
                f"--workdir={tmp_path}", "--config.modle=resnet18")
  assert result.returncode != 0
  assert "modle" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("config_file,shape,num_classes", [
    ("cifar100", (32, 32, 3), 100), ("caltech101", (224, 224, 3), 102)])
@pytest.mark.parametrize("model", ["resnet17", "resnet18", "resnet50", "cvt13"])
def test_every_paper_config_builds_its_first_step(config_file, shape, num_classes,
                                                  model):
  """Traces and lowers the first train step of each paper config (no compile:
  full-size models would take minutes each on 2 cores)."""
  module = cifar100_config if config_file == "cifar100" else caltech101_config
  config = module.get_config(f"model={model},objective=gini_kl")
  config.unlock()
  config.num_devices = 1
  trainer = train.build(config, dataset=SyntheticDataset(
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
from discrim_jax import data, train
from discrim_jax.data.synthetic import SyntheticDataset
from experiments.configs import fashion_mnist

config = fashion_mnist.get_config("smoke")
config.num_devices = 1
dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1), num_examples=64)
trainer = train.build(config, dataset=dataset)
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


def test_build_on_given_devices():
  config = smoke_config(num_devices=-1)
  dataset = SyntheticDataset(num_classes=10, image_shape=(28, 28, 1),
                             num_examples=64)
  devices = jax.devices()[2:4]
  trainer = train.build(config, dataset=dataset, devices=devices)
  assert list(trainer.mesh.devices.flat) == devices
  config.num_devices = 1
  trainer = train.build(config, dataset=dataset, devices=devices)
  assert list(trainer.mesh.devices.flat) == devices[:1]
