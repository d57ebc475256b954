"""The optimiser and schedule."""

import jax
import numpy as np
import optax
import pytest

from discrim_jax import config_lib
from discrim_jax import optim
from discrim_jax import run_spec
from discrim_jax import train


def test_schedule_warmup_keeps_step_boundaries_and_lr_is_logged(
    fashion, tmp_path, smoke_config, read_metrics):
  config = smoke_config()
  config.schedule.name = "step"
  config.schedule.boundaries_epochs = (1,)
  config.schedule.decay = 0.5
  config.schedule.warmup_epochs = 0.4  # 2 steps of 5
  schedule = optim.create_schedule(run_spec.resolve(config, 1), steps_per_epoch=5)
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
  assert optim.weight_decay_mask(params) == {
      "embed": {"kernel": True, "bias": False}, "norm": {"scale": False},
      "cls_token": False}
  config = config_lib.base_config()
  config_lib.model_defaults(config, "cvt13", image_size=32)
  tx = optim.create_optimizer(run_spec.resolve(config, 1), optax.constant_schedule(1e-3))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # A zero gradient moves only the decayed parameters (AdamW's decoupled decay).
  assert np.all(updates["embed"]["kernel"] < 0)
  for leaf in (updates["embed"]["bias"], updates["norm"]["scale"], updates["cls_token"]):
    assert np.all(leaf == 0)
