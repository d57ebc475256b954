"""The optimiser and learning-rate schedule of a run (SGD with PyTorch-style
L2, or AdamW with the weight-decay mask), from its :class:`RunSpec`."""

from __future__ import annotations

from flax import traverse_util
import optax

from discrim_jax import baseline_losses

# The key in ``TrainState.params`` of the parameters that only training uses:
# the class centres of the center loss and SupCon's projection head. Present
# only for objectives that have them; the model's own parameters (all that
# evaluation, export and pretrained import see) are the other keys.
AUX = "aux"


def create_schedule(spec, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step. Warm-up replaces the first steps of the
  schedule; the step schedule's boundaries stay at their epochs."""
  s, lr = spec.schedule, spec.optimizer["lr"]
  total = spec.num_epochs * steps_per_epoch
  warmup = int(s["warmup_epochs"] * steps_per_epoch)
  if s["name"] == "step":
    # join_schedules counts the second schedule's steps from the warm-up's end.
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warmup: s["decay"]
             for e in s["boundaries_epochs"]})
  elif s["name"] == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    main = optax.constant_schedule(lr)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def weight_decay_mask(params):
  """True for the parameters AdamW decays: convolution and dense kernels.

  As the official CvT (``WITHOUT_WD_LIST`` bn/bias/ln and its
  ``no_weight_decay`` set): biases, BatchNorm/LayerNorm scales and the class
  token are not decayed.
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: path[-1] == "kernel" for path in flat})


def create_optimizer(spec, schedule) -> optax.GradientTransformation:
  """The model's optimiser; with the center loss, its class centres get their
  own: SGD at ``config.baseline.center.lr`` on the unweighted loss's
  gradient (the reference divides the centres' gradient by the weight)."""
  o = spec.optimizer
  if o["name"] == "sgd":
    # PyTorch-style L2 on every parameter, as the reference recipe: decay
    # added to the gradient before momentum.
    tx = optax.chain(optax.add_decayed_weights(o["weight_decay"]),
                     optax.sgd(schedule, momentum=o["momentum"] or None,
                               nesterov=o["nesterov"]))
  else:
    tx = optax.adamw(schedule, b1=o["b1"], b2=o["b2"],
                     weight_decay=o["weight_decay"], mask=weight_decay_mask)
  center = spec.objective.baselines.get("center")
  if center is None:
    return tx
  return baseline_losses.center_sgd(
      tx, weight=center["weight"], lr=center["lr"],
      is_centers=lambda path: path[:2] == (AUX, "centers"))
