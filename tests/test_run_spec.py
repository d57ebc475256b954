"""Resolving a config: every bad value is one ConfigError naming the field."""

import dataclasses

import pytest

from discrim_jax import config_lib
from discrim_jax import run_spec
from discrim_jax.config_lib import parse_arg


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
    run_spec.resolve(smoke_config(**{"num_devices": -1, field: value}), 8)


def test_config_arguments():
  args = parse_arg("model=cvt13,smoke", model="resnet18", smoke=False)
  assert args.model == "cvt13" and args.smoke is True
  with pytest.raises(ValueError, match="unknown config argument 'modle'"):
    parse_arg("modle=x", model="resnet18")


def test_a_spec_is_the_config_resolved_once(smoke_config):
  spec = run_spec.resolve(smoke_config(objective="gini_kl+center"), 1)
  o = spec.objective
  assert o.terms == ("gini", "kl", "center")
  assert o.gini_weights == {"stage4": 0.5} and o.kl_weights == {"stage4": 0.5}
  assert set(o.baselines) == {"center"} and o.baselines["center"]["layer"] == "pre_logits"
  assert spec.representation_layers == ("pre_logits", "stage4")
  ce = run_spec.resolve(smoke_config(objective="ce"), 1).objective
  # Terms that are off keep weight 0 (computed and logged, not trained on).
  assert ce.gini_weights == {"stage4": 0.0} and ce.baselines == {}
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.batch_size = 1  # pytype: disable=not-writable
  other = spec.with_seed(7)
  assert other.seed == 7 and other.config.seed == 7 and spec.config.seed == 0
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.baseline.center.layer names \['x'\].*--config"):
    run_spec.resolve(smoke_config(**{"objective": "center",
                                     "baseline.center.layer": "x"}), 1
                     ).check_layers({"stage4": None, "pre_logits": None}, "M")
