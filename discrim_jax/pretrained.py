"""Import pretrained PyTorch checkpoints into our Flax variables.

Supported sources (a local file; nothing is downloaded):

* torchvision ResNet-18/50 state dicts (``.pth``), for ``resnet18`` /
  ``resnet50`` built with ``stem="imagenet"``;
* Microsoft's CvT-13 checkpoint in its original ``.pth`` form
  (``stage0.patch_embed.proj.weight`` ...) or the Hugging Face
  ``transformers`` form (``cvt.encoder.stages.0...``, ``.safetensors`` or
  ``.bin``), for ``cvt13``.

Every parameter and BatchNorm statistic of the model must be found in the
checkpoint with the same shape, and every checkpoint tensor must be used;
otherwise a ``ValueError`` names the keys. The classifier head is taken from
the checkpoint only when its number of classes matches; otherwise it keeps
its fresh initialisation (fine-tuning on another data set).
"""

from __future__ import annotations

from discrim_jax import _app

_app.require(__name__)

from collections.abc import Iterator, Mapping
import re
import warnings
from pathlib import Path
from typing import Any

from flax import traverse_util
import numpy as np

StateDict = Mapping[str, np.ndarray]
# (our collection, our path, checkpoint key, kind) with kind one of
# conv / dense / copy (layouts differ: PyTorch OIHW and (out, in)).
_Entry = tuple[str, tuple[str, ...], str, str]

_BN = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))
_IGNORED = re.compile(r"(num_batches_tracked|attention_mask)$")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a ``.pth``/``.bin`` (PyTorch) or ``.safetensors`` file as NumPy."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint file at {path}")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own types for bad files
      raise ValueError(f"{path} is not a readable safetensors file "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                       ) from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch: pip install "
                      "'discrim_jax[pretrained]'") from None
  try:
    # weights_only: the file's pickle may build tensors and plain
    # containers, never run code. What it refuses is not a weights file
    # we read, whatever PyTorch's own message suggests.
    with warnings.catch_warnings():  # pickle-protocol notes, not for users
      warnings.simplefilter("ignore")
      state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ...
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    if "weights_only" in first or "Weights only load failed" in str(e):
      first = "not a plain state dict of tensors"
    raise ValueError(
        f"{path} is not a PyTorch weights file this reads ({type(e).__name__}: "
        f"{first}); pass a state dict saved with torch.save(model.state_dict())"
        " or a .safetensors file") from None
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items()
          if hasattr(v, "detach")}


def _bn(ours: tuple[str, ...], theirs: str) -> Iterator[_Entry]:
  for a, b in _BN:
    yield "params", ours + (a,), f"{theirs}.{b}", "copy"
  for a, b in _BN_STATS:
    yield "batch_stats", ours + (a,), f"{theirs}.{b}", "copy"


def _dense(ours: tuple[str, ...], theirs: str, bias: bool = True) -> Iterator[_Entry]:
  yield "params", ours + ("kernel",), f"{theirs}.weight", "dense"
  if bias:
    yield "params", ours + ("bias",), f"{theirs}.bias", "copy"


def _ln(ours: tuple[str, ...], theirs: str) -> Iterator[_Entry]:
  yield "params", ours + ("scale",), f"{theirs}.weight", "copy"
  yield "params", ours + ("bias",), f"{theirs}.bias", "copy"


def resnet_entries(params: Mapping[str, Any]) -> Iterator[_Entry]:
  """torchvision names for our ResNet modules."""
  yield "params", ("stem_conv", "kernel"), "conv1.weight", "conv"
  yield from _bn(("stem_bn",), "bn1")
  for name in sorted(params):
    m = re.fullmatch(r"stage(\d)_block(\d+)", name)
    if not m:
      continue
    theirs = f"layer{m[1]}.{int(m[2]) - 1}"
    for sub in sorted(params[name]):
      if sub.startswith("conv"):
        yield "params", (name, sub, "kernel"), f"{theirs}.{sub}.weight", "conv"
      elif sub.startswith("bn"):
        yield from _bn((name, sub), f"{theirs}.{sub}")
    if "proj_conv" in params[name]:
      yield "params", (name, "proj_conv", "kernel"), f"{theirs}.downsample.0.weight", "conv"
      yield from _bn((name, "proj_bn"), f"{theirs}.downsample.1")
  yield from _dense(("head",), "fc")


def cvt_entries(params: Mapping[str, Any]) -> Iterator[_Entry]:
  """Microsoft CvT names for our CvT modules."""
  for name in sorted(params):
    m = re.fullmatch(r"stage(\d)_(embed_conv|embed_norm|block(\d+))", name)
    if not m:
      continue
    s = f"stage{int(m[1]) - 1}"
    if m[2] == "embed_conv":
      yield "params", (name, "kernel"), f"{s}.patch_embed.proj.weight", "conv"
      yield "params", (name, "bias"), f"{s}.patch_embed.proj.bias", "copy"
    elif m[2] == "embed_norm":
      yield from _ln((name,), f"{s}.patch_embed.norm")
    else:
      b = f"{s}.blocks.{int(m[3]) - 1}"
      yield from _ln((name, "norm1"), f"{b}.norm1")
      yield from _ln((name, "norm2"), f"{b}.norm2")
      for t in "qkv":
        yield ("params", (name, "attn", f"conv_proj_{t}", "conv", "kernel"),
               f"{b}.attn.conv_proj_{t}.conv.weight", "conv")
        yield from _bn((name, "attn", f"conv_proj_{t}", "bn"), f"{b}.attn.conv_proj_{t}.bn")
        yield from _dense((name, "attn", f"proj_{t}"), f"{b}.attn.proj_{t}")
      yield from _dense((name, "attn", "proj"), f"{b}.attn.proj")
      yield from _dense((name, "mlp_fc1"), f"{b}.mlp.fc1")
      yield from _dense((name, "mlp_fc2"), f"{b}.mlp.fc2")
  last = max(int(n[5]) for n in params if re.fullmatch(r"stage\d_embed_conv", n))
  yield "params", ("cls_token",), f"stage{last - 1}.cls_token", "copy"
  yield from _ln(("norm",), "norm")
  yield from _dense(("head",), "head")


# Hugging Face transformers' CvT names -> Microsoft's, applied in order.
_HF_TO_MS = [
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.",
     r"stage\1.patch_embed.proj."),
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.",
     r"stage\1.patch_embed.norm."),
    (r"^cvt\.encoder\.stages\.(\d+)\.cls_token$", r"stage\1.cls_token"),
    (r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stage\1.blocks.\2."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)"
     r"\.convolution_projection\.convolution\.", r".attn.conv_proj_\1.conv."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)"
     r"\.convolution_projection\.normalization\.", r".attn.conv_proj_\1.bn."),
    (r"\.attention\.attention\.projection_(query|key|value)\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", r".attn.proj."),
    (r"\.layernorm_before\.", r".norm1."),
    (r"\.layernorm_after\.", r".norm2."),
    (r"\.intermediate\.dense\.", r".mlp.fc1."),
    (r"\.output\.dense\.", r".mlp.fc2."),
    (r"(conv_proj_|proj_)query", r"\1q"),
    (r"(conv_proj_|proj_)key", r"\1k"),
    (r"(conv_proj_|proj_)value", r"\1v"),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def hf_cvt_to_microsoft(state: StateDict) -> dict[str, np.ndarray]:
  """Renames a Hugging Face CvT state dict to Microsoft's original names."""
  out = {}
  for key, value in state.items():
    for pattern, repl in _HF_TO_MS:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


def _layout(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # OIHW -> HWIO (depthwise: (C, 1, kh, kw) -> (kh, kw, 1, C))
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "dense":  # (out, in) -> (in, out)
    return value.T
  return value


def convert(state: StateDict, variables: Mapping[str, Any], *,
            architecture: str) -> dict[str, Any]:
  """Fills ``variables`` (a model's own init, for structure) from ``state``.

  Args:
    state: a PyTorch state dict as NumPy arrays (:func:`load_state_dict`).
    variables: ``{"params": ..., "batch_stats": ...}`` from ``model.init``
      (or ``jax.eval_shape`` of it); the head keeps these values when the
      checkpoint's number of classes differs.
    architecture: ``"resnet"`` or ``"cvt"``.

  Returns:
    New variables with the same structure as ``variables``.

  Raises:
    ValueError: on a missing or unexpected key or a shape mismatch.
  """
  if architecture == "cvt" and any(k.startswith("cvt.") for k in state):
    state = hf_cvt_to_microsoft(state)
  entries = {"resnet": resnet_entries, "cvt": cvt_entries}[architecture](
      variables["params"])
  flat = {c: traverse_util.flatten_dict(dict(variables.get(c, {})))
          for c in ("params", "batch_stats")}
  out = {c: dict(v) for c, v in flat.items()}
  used, missing, mismatched = set(), [], []
  head_kept = False
  for collection, path, key, kind in entries:
    target = flat[collection].get(path)
    if target is None:
      raise ValueError(f"internal: no {collection} {'/'.join(path)} in the model")
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    # The model's parameter dtype: float32, or float64 in exactness tests.
    value = _layout(np.asarray(state[key], getattr(target, "dtype", np.float32)),
                    kind)
    if value.shape != tuple(target.shape):
      if path[0] == "head" and hasattr(target, "__array__"):
        head_kept = True  # another number of classes: re-initialised head
        continue
      mismatched.append(f"{key} {value.shape} vs ours {tuple(target.shape)} "
                        f"at {'/'.join(path)}")
      continue
    out[collection][path] = value
  unexpected = sorted(k for k in state if k not in used and not _IGNORED.search(k))
  problems = []
  if missing:
    problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if unexpected:
    problems.append(f"unexpected keys {unexpected[:8]}"
                    f"{' ...' if len(unexpected) > 8 else ''}")
  if mismatched:
    problems.append(f"shape mismatches {mismatched[:4]}")
  if problems:
    raise ValueError(f"checkpoint does not fit this {architecture}: "
                     + "; ".join(problems)
                     + " (is it the right model and stem? ResNets need "
                     "stem='imagenet')")
  result = {c: traverse_util.unflatten_dict(v) for c, v in out.items() if v}
  result["head_reinitialized"] = head_kept
  return result


def architecture_of(model_name: str) -> str:
  if model_name in ("resnet18", "resnet50"):
    return "resnet"
  if model_name == "cvt13":
    return "cvt"
  raise ValueError(f"no pretrained import for {model_name!r}; supported: "
                   "resnet18, resnet50 (torchvision), cvt13 (Microsoft / HF)")


def _merge(loaded: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
  """Our-layout variables (from convert.py) into a model's variables."""
  out = {}
  for collection in ("params", "batch_stats"):
    ours = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    theirs = traverse_util.flatten_dict(dict(loaded.get(collection, {})))
    if set(ours) != set(theirs):
      raise ValueError(
          f"converted checkpoint does not fit this model: {collection} missing "
          f"{sorted('/'.join(p) for p in set(ours) - set(theirs))[:6]}, unexpected "
          f"{sorted('/'.join(p) for p in set(theirs) - set(ours))[:6]}")
    merged = {}
    for path, target in ours.items():
      value = np.asarray(theirs[path])
      if value.shape != tuple(target.shape):
        if path[0] != "head":
          raise ValueError(f"shape mismatch at {'/'.join(path)}: checkpoint "
                           f"{value.shape}, model {tuple(target.shape)}")
        value = target  # another number of classes: keep the fresh head
      merged[path] = value
    if merged:
      out[collection] = traverse_util.unflatten_dict(merged)
  return out


def load_pretrained(path: str | Path, model_name: str,
                    variables: Mapping[str, Any]) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` for ``model_name`` from a PyTorch file or
  from a folder written by ``experiments/convert.py`` (an orbax checkpoint)."""
  path = Path(path)
  if path.is_dir():
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from discrim_jax import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.quiet_closed_event_loops()  # an unreadable folder's leftovers
    loaded = ocp.StandardCheckpointer().restore(path.absolute())
    return _merge(loaded, variables)
  out = convert(load_state_dict(path), variables,
                architecture=architecture_of(model_name))
  out.pop("head_reinitialized")
  return out


def into_state(path: str | Path, model_name: str, state, sharding):
  """A fresh ``TrainState`` with its model's weights (and BatchNorm
  statistics) loaded from ``path`` by :func:`load_pretrained`; the
  training-only parameters (centres, projection head) stay as initialised
  and the optimiser state starts anew. Placed with ``sharding``."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from discrim_jax import optim  # pylint: disable=g-import-not-at-top
  from discrim_jax import step_fns  # pylint: disable=g-import-not-at-top
  variables = jax.device_get({"params": step_fns.model_params(state.params),
                              "batch_stats": state.batch_stats})
  loaded = load_pretrained(path, model_name, variables)
  logging.info("Initialised from %s", path)
  params = dict(loaded["params"])
  if optim.AUX in state.params:
    params[optim.AUX] = state.params[optim.AUX]
  new = state.replace(params=params, batch_stats=loaded.get("batch_stats", {}),
                      opt_state=state.tx.init(params))
  return jax.device_put(new, sharding)
