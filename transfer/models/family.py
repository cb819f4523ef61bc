"""What a model family tells the rest of the project, in one record.

Each family module (``efficientnet_lite.py``, ``bert.py``, ...) ends with ``FAMILY = Family(...)``, and
``transfer/models/__init__.py`` lists those records: adding a family is its own file plus one line there. The
trainer, the loader and the probe ask the record, never the family's name, so no family-specific branch lives
outside its own file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np


# The two pixel conventions image checkpoints are trained with, as (mean, std) in pixel units.
IMAGENET_NORMALIZATION = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))   # torchvision, DeiT, DINO, most of timm
INCEPTION_NORMALIZATION = (127.5, 127.5)                                        # [-1, 1]: Google's ViT and BiT, TF lite


def refuse_override(cfg, field: str, why: str) -> None:
  """A ``config.model`` size override the family does not take is an error naming it, never ignored."""
  if cfg.get(field):
    raise ValueError(f"config.model.{field}={cfg.get(field)}: {why}")


def hf_architecture(cfg) -> tuple[dict, str]:
  """``(config.json contents, its path)`` for a Hugging Face-style family: from ``config.model.architecture``,
  else ``config.model.pretrained``. Text models take their shapes from there, not from their name."""
  from transfer import pretrained
  source = cfg.get("architecture") or cfg.get("pretrained")
  if not source:
    raise ValueError(f"config.model: a {cfg.name!r} model needs model.pretrained or model.architecture (a folder, "
                     "hub id or short name whose config.json gives the architecture)")
  return pretrained.hf_config(source)


def text_example(with_types: bool) -> Callable[[], dict]:
  """A one-row token batch (8 tokens) that fixes the input shapes for ``init``."""
  def example() -> dict:
    batch = {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32)}
    if with_types:
      batch["token_type_ids"] = np.zeros((1, 8), np.int32)
    return batch
  return example


def image_example() -> dict:
  return {"image": np.zeros((1, 32, 32, 3), np.uint8)}


def keep_checkpoint(flat, model_shapes, *, source_name: str):
  return flat


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  - ``name``: the family's id (``config.model.name`` picks one of ``variants``; the family itself when it is
    Hugging Face-style, e.g. ``bert``, whose shapes come from a config.json).
  - ``inputs``: ``'image'`` (uint8 ``image`` batches, normalised by the classifier) or ``'text'`` (token batches).
  - ``kind``: ``'encoder'`` (features for a head), or ``'decoder'`` (also next-token logits: the causal-LM task).
  - ``variants``: names users type -> the family's own settings for each.
  - ``backbone(cfg, dtype)``: ``config.model`` -> the backbone module.
  - ``convert(state, *, cfg, hf_config, source_name)``: a checkpoint's ``{key: array}`` in any layout the family
    knows (its key tables) -> flat ``{collection/path: array}``; a layout it does not know is an error. It also
    settles the ``config.model`` (``cfg``) fields that the checkpoint decides by itself (a ViT's pooling and
    position grid): set where unset, an error naming the field where they disagree, never a silent guess.
  - ``layer_regexes(backbone)``: ``[(regex, depth)]`` for layer-wise learning-rate decay (``transfer.optim``);
    defined in the family's own module, beside the backbone's class, which is how a backbone finds its family.
  - ``example_batch()``: one input row that fixes the shapes for ``init``.
  - ``input_norm``: images: the ``(mean, std)`` in pixel units of the family's usual checkpoints.
  - ``hf_model_types``: the ``config.json`` ``model_type`` values this family reads.
  - ``fit_checkpoint(flat, model_shapes, source_name)``: adapts a converted checkpoint to the configured model's
    shapes where that is sound (a ViT's position table resampled to another grid).
  - ``pooling``: text: the pooling a classifier on this family uses when ``config.model.pooling`` is unset.
  - ``causal_lm(cfg, dtype)``: decoders: the backbone with its next-token head (the causal-LM task's model).
  - ``to_hf(flat, *, hf_config, source_name)``: decoders: the inverse of ``convert``, giving ``(config.json,
    Hugging Face state dict)`` (``transfer/hf_export.py``).
  - ``upstream_head``: a regex over converted paths that belong to the checkpoint's own task head (a decoder's
    LM head), dropped when the model being built has no such parameter (a classifier on a decoder).
  """
  name: str
  inputs: str
  variants: Mapping[str, Any]
  backbone: Callable[..., Any]
  convert: Callable[..., dict]
  layer_regexes: Callable[[Any], list]
  example_batch: Callable[[], dict]
  kind: str = "encoder"
  input_norm: tuple | None = None
  hf_model_types: tuple[str, ...] = ()
  fit_checkpoint: Callable[..., dict] = keep_checkpoint
  pooling: str = "cls"
  causal_lm: Callable[..., Any] | None = None
  to_hf: Callable[..., tuple[dict, dict]] | None = None
  upstream_head: str = ""

  def __post_init__(self):
    if self.inputs not in ("image", "text"):
      raise ValueError(f"family {self.name}: inputs must be 'image' or 'text', got {self.inputs!r}")
    if self.kind not in ("encoder", "decoder"):
      raise ValueError(f"family {self.name}: kind must be 'encoder' or 'decoder', got {self.kind!r}")
    if (self.kind == "decoder") != (self.causal_lm is not None):
      raise ValueError(f"family {self.name}: a decoder (and only a decoder) has a causal_lm builder")
    if self.inputs == "image" and self.input_norm is None:
      raise ValueError(f"family {self.name}: an image family needs input_norm")
