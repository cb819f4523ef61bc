"""Model registry: config.model -> a Flax classifier, and the per-family facts the trainer needs."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from transfer.models import efficientnet_lite
from transfer.models.classifier import FeatureClassifier, ImageClassifier, TextClassifier

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NAMES = sorted(efficientnet_lite.VARIANTS) + ["bert"]


def family(name: str) -> str:
  if name in efficientnet_lite.VARIANTS:
    return "efficientnet_lite"
  if name == "bert":
    return "bert"
  raise ValueError(f"config.model.name: unknown model {name!r}; available: {NAMES}")


def bert_config(cfg):
  """The BERT architecture of ``cfg.architecture`` or else ``cfg.pretrained`` (its config.json)."""
  from transfer import pretrained
  from transfer.models import bert
  source = cfg.get("architecture") or cfg.get("pretrained")
  if not source:
    raise ValueError("config.model: a 'bert' model needs model.pretrained or model.architecture (a folder, hub "
                     "id or short name whose config.json gives the architecture)")
  config, path = pretrained.hf_config(source)
  return bert.BertConfig.from_hf(config, path)


def build(cfg, num_classes: int | None):
  """``cfg``: name; images: optional width/depth overrides (small test models), dropout, drop_path, bn_momentum;
  text: pretrained/architecture, pooling, dropout. ``dtype`` is the compute dtype for both."""
  fam = family(cfg.name)
  if cfg.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"config.model.dtype: {cfg.dtype!r} is not one of {sorted(DTYPES)}")
  dtype = DTYPES[cfg.get("dtype", "float32")]
  if fam == "bert":
    from transfer.models import bert
    return TextClassifier(backbone=bert.BertEncoder(bert_config(cfg), dtype=dtype), num_classes=num_classes,
                          pooling=cfg.get("pooling", "cls"), dropout=cfg.get("dropout", 0.1))
  variant = efficientnet_lite.VARIANTS[cfg.name]
  backbone = efficientnet_lite.EfficientNetLite(
      width=cfg.get("width") or variant["width"], depth=cfg.get("depth") or variant["depth"],
      drop_path=cfg.get("drop_path", 0.0), bn_momentum=cfg.get("bn_momentum", 0.99), dtype=dtype)
  return ImageClassifier(backbone=backbone, num_classes=num_classes, dropout=cfg.get("dropout", 0.0))


def example_batch(name: str) -> dict:
  """A one-row input batch that fixes the shapes for ``init`` (and ``eval_shape``)."""
  if family(name) == "bert":
    return {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32),
            "token_type_ids": np.zeros((1, 8), np.int32)}
  return {"image": np.zeros((1, 32, 32, 3), np.uint8)}


def layer_regexes(model) -> list[tuple[str, object]]:
  """Depth of each backbone parameter for layer-wise learning-rate decay (the head is deepest, undecayed)."""
  if isinstance(model, FeatureClassifier):
    return []
  if isinstance(model, TextClassifier):
    n = model.backbone.config.num_hidden_layers
    return [(r"backbone/embeddings/.*", 0), (r"backbone/layer_(\d+)/.*", "group+1"), (r"backbone/pooler/.*", n + 1)]
  n = len(efficientnet_lite.block_specs(model.backbone.width, model.backbone.depth))
  return [(r"backbone/stem_.*", 0), (r"backbone/block_(\d+)/.*", "group+1"), (r"backbone/top_.*", n + 1)]
