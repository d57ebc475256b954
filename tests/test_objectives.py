"""The baseline objectives in the app (center loss, OPL, SupCon) and the
representation metrics every run reports at its end."""

import json

import jax
import numpy as np
import pytest

from discrim_jax import baseline_losses
from discrim_jax import config_lib
from discrim_jax import representation
from discrim_jax import runtime
from discrim_jax import step_fns
from discrim_jax import optim
from discrim_jax import run_spec
from discrim_jax import evaluation
from discrim_jax import train
from discrim_jax.data.synthetic import SyntheticDataset

_DATA = dict(num_classes=10, image_shape=(8, 8, 1), num_examples=32)


def test_objective_names_and_terms():
  assert config_lib.objective_terms("ce") == ()
  assert config_lib.objective_terms("center+gini_kl") == ("gini", "kl", "center")
  assert config_lib.objective_name("gini_kl") == "CE+Gini+KL"
  assert config_lib.objective_name("gini_kl+supcon") == "CE+Gini+KL+SupCon"
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown objective 'opl\+entropy'.*joined by '\+'"):
    config_lib.objective_terms("opl+entropy")


@pytest.mark.parametrize("field,value,match", [
    ("baseline.center.weight", 0.0, r"baseline.center.weight must be > 0"),
    ("baseline.center.lr", -0.5, r"baseline.center.lr must be > 0"),
])
def test_baseline_config_errors(field, value, match, smoke_config):
  with pytest.raises(config_lib.ConfigError, match=match):
    run_spec.resolve(smoke_config(objective="center", **{field: value}), 1)


def test_missing_baseline_layer_fails_before_anything_is_built(smoke_config):
  config = smoke_config(objective="opl", batch_size=16,
                        **{"baseline.opl.layer": "stage7"})
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.baseline.opl.layer names \['stage7'\].*pre_logits"):
    runtime.build_from_config(config, dataset=SyntheticDataset(**_DATA))


def test_identity_holds_only_the_baselines_an_objective_uses(smoke_config):
  # A config.json written before the baselines existed resumes unchanged.
  current = smoke_config(objective="gini_kl")
  older = json.loads(current.to_json_best_effort())
  del older["baseline"], older["representation"]
  assert config_lib.identity(older) == config_lib.identity(current)
  center = config_lib.identity(smoke_config(objective="center"))
  assert center["baseline"] == {"center": {"weight": 0.003, "layer": "pre_logits",
                                           "lr": 0.5}}
  # Settings of a term the objective does not use are not part of it...
  assert config_lib.identity(smoke_config(
      objective="center", **{"baseline.opl.gamma": 2.0})) == center
  # ...those of a term it uses are.
  assert config_lib.identity(smoke_config(
      objective="center", **{"baseline.center.lr": 0.1})) != center


def _step_inputs(program, state):
  """The batch of the first step and the features the step computes."""
  batch = next(program.batches("train", train=True))
  (_, features), _ = program.model.apply(
      {"params": step_fns.model_params(state.params),
       "batch_stats": state.batch_stats}, batch["image"], train=True,
      rngs={"dropout": jax.random.fold_in(state.rng, 0)}, mutable=["batch_stats"])
  return batch, features


def test_center_loss_centres_move_by_sgd_at_their_own_rate(smoke_config):
  """One step moves the centres by ``-lr_c * dL_center/dc`` (the unweighted
  loss's gradient, no weight decay, no momentum), whatever the term's weight
  and the model's learning rate. float64, so the bound is rounding of a few
  float64 operations."""
  config = smoke_config(objective="center", batch_size=16, **{
      "loss.start_epoch": 0.0, "model_kwargs.dtype": "float64",
      "baseline.center.weight": 0.01, "baseline.center.lr": 0.3})
  with jax.enable_x64(True):
    program = runtime.build_from_config(config, dataset=SyntheticDataset(**_DATA))
    state = program.init_state(0)
    centers = np.asarray(state.params[optim.AUX]["centers"])
    assert centers.shape == (10, 64) and centers.dtype == np.float64
    batch, features = _step_inputs(program, state)
    loss, grad = jax.value_and_grad(baseline_losses.center_loss, argnums=2)(
        features["pre_logits"], batch["label"], centers)
    new_state, metrics = program.train_step(state, batch)
    # float64: the step applies scale(1/w), the SGD update and the weight
    # (w * grad / w) in a few float64 operations: ~1e-15 relative.
    np.testing.assert_allclose(new_state.params[optim.AUX]["centers"],
                               centers - 0.3 * np.asarray(grad), rtol=1e-12,
                               atol=1e-14)
    assert float(metrics["center"]) == pytest.approx(float(loss), rel=1e-12)
    assert np.abs(np.asarray(grad)).max() > 1e-3  # the check is not vacuous


def test_supcon_head_is_trained_and_inference_does_not_use_it(smoke_config):
  dataset = SyntheticDataset(**_DATA)
  config = smoke_config(objective="supcon", batch_size=16, eval_batch_size=16,
                        **{"loss.start_epoch": 0.0})
  program = runtime.build_from_config(config, dataset=dataset)
  state = program.init_state(0)
  head = jax.device_get(state.params[optim.AUX]["projection"])
  assert head["out"]["kernel"].shape == (64, 128)
  batch = next(program.batches("train", train=True))
  state, metrics = program.train_step(state, batch)
  assert float(metrics["supcon"]) > 0
  moved = jax.device_get(state.params[optim.AUX]["projection"])
  assert not np.allclose(moved["out"]["kernel"], head["out"]["kernel"])
  # The model's own parameters are exactly a CE model's, and a CE model
  # holding them evaluates exactly as the SupCon program does.
  ce = runtime.build_from_config(
      smoke_config(objective="ce", batch_size=16, eval_batch_size=16),
      dataset=dataset)
  ce_state = ce.init_state(0)
  mine = step_fns.model_params(state.params)
  assert jax.tree.structure(mine) == jax.tree.structure(ce_state.params)
  ce_state = ce_state.replace(params=mine, batch_stats=state.batch_stats)
  assert (jax.device_get(evaluation.evaluate(ce, ce_state, "test"))
          == jax.device_get(evaluation.evaluate(program, state, "test")))


def test_features_are_the_unaugmented_split_in_order(fashion, smoke_config):
  program = runtime.build_from_config(smoke_config(), dataset=fashion)
  state = program.init_state(0)
  metrics, features, labels = evaluation.features(program, state, "train", max_examples=100)
  assert metrics is None  # not the whole split
  assert set(features) == {"pre_logits", "stage4"}
  images, expected = fashion.arrays("train")
  np.testing.assert_array_equal(labels, expected[:100])
  _, direct = program.model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images[:100].astype(np.float32) / 255.0, train=False)
  # Two XLA programs (batch 100 here, the eval batch there) block their
  # reductions differently: a few float32 ulps per layer over ~20 layers.
  np.testing.assert_allclose(features["pre_logits"], direct["pre_logits"],
                             rtol=1e-4, atol=1e-6)
  # A ResNet's stage4 pools to its pre_logits.
  np.testing.assert_array_equal(features["stage4"], features["pre_logits"])


def test_run_reports_representation_metrics(fashion, tmp_path, smoke_config,
                                            read_metrics):
  config = smoke_config(objective="gini_kl+opl", num_epochs=1,
                        **{"representation.enabled": True})
  summary = train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  test = read_metrics(tmp_path)[-1]
  assert test["split"] == "test"
  for name in ("knn/pre_logits", "probe/pre_logits", "knn/stage4",
               "probe/stage4"):
    assert 0.0 <= summary[name] <= 1.0 and summary[name] == test[name], name
  assert summary["nc1/pre_logits"] > 0 and summary["gini/stage4"] > 0
  assert summary["representation_time_s"] > 0
  # The values are those of the best-validation checkpoint's features.
  program = runtime.build_from_config(config, dataset=fashion)
  from discrim_jax import checkpoints  # pylint: disable=g-import-not-at-top
  manager, step, state = checkpoints.restore_latest(
      config, tmp_path, program.abstract_state)
  manager.close()
  assert step == summary["best_validation_step"]
  _, train_f, train_y = evaluation.features(program, state, "train")
  (test, _), test_f, test_y = evaluation.features(program, state, "test")
  assert test["accuracy"] == summary["test_accuracy"]
  assert summary["knn/pre_logits"] == representation.knn_accuracy(
      train_f["pre_logits"], train_y, test_f["pre_logits"], test_y,
      num_classes=10)
