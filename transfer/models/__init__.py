"""Model registry: the family records (``transfer/models/family.py``), and config.model -> a Flax module.

Adding a family: its own module ending in ``FAMILY = Family(...)``, plus one line in ``FAMILIES`` below.
"""
from __future__ import annotations

import ast
import dataclasses

import jax.numpy as jnp

from transfer.models import bert, efficientnet_lite, gpt2, layers, llama, lora, resnet, resnetv2, vit
from transfer.models.classifier import FeatureClassifier, ImageClassifier, TextClassifier
from transfer.models.family import IMAGENET_NORMALIZATION, INCEPTION_NORMALIZATION, Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    efficientnet_lite.FAMILY,
    resnet.FAMILY,
    resnetv2.FAMILY,
    vit.FAMILY,
    bert.FAMILY,
    gpt2.FAMILY,
    llama.FAMILY,
)}
NAMES = sorted(name for f in FAMILIES.values() for name in f.variants)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = layers.REMAT_POLICIES   # config.model.remat (transfer/models/layers.py: remat)

# config.model.input_norm by name: the two conventions checkpoints are trained with.
NAMED_NORMALIZATIONS = {"imagenet": IMAGENET_NORMALIZATION, "inception": INCEPTION_NORMALIZATION}


def family(name: str) -> Family:
  """The family whose variants include ``config.model.name``."""
  for fam in FAMILIES.values():
    if name in fam.variants:
      return fam
  raise ValueError(f"config.model.name: unknown model {name!r}; available: {NAMES}")


def compiler_options(model_cfg) -> dict[str, str] | None:
  """The ``compiler_options`` of every jit that runs ``config.model``'s model: the backend's, with the family's
  library fusions (``layers.compiler_options``)."""
  return layers.compiler_options(family(model_cfg.name).cpu_library_fusions)


def family_of_model_type(model_type, source_name: str) -> Family:
  """The family that reads a Hugging Face ``config.json`` of this ``model_type``."""
  for fam in FAMILIES.values():
    if model_type in fam.hf_model_types:
      return fam
  known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
  raise ValueError(f"{source_name}: model_type {model_type!r} is not a family this project implements; "
                   f"known model types: {known}")


def input_normalization(fam: Family, choice) -> tuple:
  """``config.model.input_norm``: 'auto' (the family's usual checkpoints), a name in ``NAMED_NORMALIZATIONS``, or
  ``[mean, std]`` in pixel units (scalars or three per channel). A checkpoint trained with another convention than
  its family's (DeiT or DINO ViTs: ImageNet mean/std) loads cleanly but gives degraded features unless this says
  so."""
  if choice in (None, "auto"):
    return fam.input_norm
  if isinstance(choice, str) and choice.strip()[:1] in "[(":   # from the command line: '[[124,116,104],[58,57,57]]'
    try:
      choice = ast.literal_eval(choice)
    except (ValueError, SyntaxError):
      pass   # the error below names the value
  if isinstance(choice, str):
    if choice not in NAMED_NORMALIZATIONS:
      raise ValueError(f"config.model.input_norm={choice!r}: use 'auto', one of {sorted(NAMED_NORMALIZATIONS)}, "
                       "or [mean, std] in pixel units")
    return NAMED_NORMALIZATIONS[choice]

  def numbers(part):
    part = list(part) if isinstance(part, (list, tuple)) else [part]
    if len(part) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
      raise TypeError
    return tuple(float(v) for v in part) if len(part) == 3 else float(part[0])

  try:
    mean, std = (numbers(part) for part in choice)
    if min(std if isinstance(std, tuple) else (std,)) <= 0:
      raise TypeError
  except (TypeError, ValueError):
    raise ValueError(f"config.model.input_norm={choice!r}: expected [mean, std] in pixel units, each a number or "
                     "three (one per RGB channel), std > 0") from None
  return mean, std


def dtype_of(cfg):
  name = cfg.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype: {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def backbone(cfg):
  """The backbone module of ``config.model`` alone (no head)."""
  return family(cfg.name).backbone(cfg, dtype_of(cfg))


def build(cfg, num_classes: int | None):
  """A classifier: ``config.model``'s backbone and a new ``head`` of ``num_classes`` outputs (``None``: the module
  returns the pooled features). ``cfg``: name; images: optional width/depth overrides (small test models),
  dropout, drop_path, bn_momentum, input_norm; text: pretrained/architecture, pooling, dropout; dtype for both."""
  fam = family(cfg.name)
  if fam.inputs == "text":
    return TextClassifier(backbone=backbone(cfg), num_classes=num_classes, pooling=cfg.get("pooling") or fam.pooling,
                          dropout=cfg.get("dropout", 0.1))
  mean, std = input_normalization(fam, cfg.get("input_norm", "auto"))
  return ImageClassifier(backbone=backbone(cfg), num_classes=num_classes, dropout=cfg.get("dropout", 0.0),
                         input_mean=mean, input_std=std)


def build_lm(cfg):
  """A decoder with its next-token head: ``apply(variables, batch)`` -> (N, L, vocab) float32 logits."""
  fam = family(cfg.name)
  if fam.causal_lm is None:
    decoders = sorted(f.name for f in FAMILIES.values() if f.causal_lm is not None)
    raise ValueError(f"next-token prediction (config.task='causal_lm') needs a decoder; config.model.name="
                     f"{cfg.name!r} is a {fam.kind} (decoders: {decoders})")
  return fam.causal_lm(cfg, dtype_of(cfg))


def with_adapters(model, param_rules):
  """``model`` with the LoRA adapters ``param_rules`` ask for (``transfer/models/lora.py``), or as it is when no
  rule has ``lora``."""
  adapters = lora.targets(param_rules)
  if not adapters:
    return model
  if "adapters" not in {f.name for f in dataclasses.fields(model)}:
    raise ValueError(f"config.param_rules ask for LoRA adapters, which a {type(model).__name__} does not take "
                     "(a head on cached features has no backbone to adapt)")
  return model.clone(adapters=adapters)


def example_batch(name: str) -> dict:
  """A one-row input batch that fixes the shapes for ``init`` (and ``eval_shape``)."""
  return family(name).example_batch()


def layer_regexes(model) -> list[tuple[str, object]]:
  """Depth of each backbone parameter for layer-wise learning-rate decay (the head is deepest, undecayed)."""
  if isinstance(model, FeatureClassifier) or not hasattr(model, "backbone"):
    return []
  return family_of_module(model.backbone).layer_regexes(model.backbone)


def tensor_parallel_layout(model) -> list[tuple[str, tuple]]:
  """The backbone family's tensor-parallel layout (``Family.tensor_parallel``; none for a head on cached
  features), for ``config.sharding_rules``' value 'tensor' (``transfer/sharding.py``)."""
  if isinstance(model, FeatureClassifier) or not hasattr(model, "backbone"):
    return []
  return list(family_of_module(model.backbone).tensor_parallel)


def family_of_module(module) -> Family:
  """The family whose file defines this backbone module's class (its ``layer_regexes`` lives there too)."""
  owner = type(module).__module__
  for fam in FAMILIES.values():
    if fam.layer_regexes.__module__ == owner:
      return fam
  raise ValueError(f"no model family owns a backbone of type {type(module).__name__}")
