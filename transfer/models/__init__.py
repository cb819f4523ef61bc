"""Model registry: config.model -> a Flax classifier, and the per-family facts the trainer needs."""
from __future__ import annotations

import jax.numpy as jnp

from transfer.models import efficientnet_lite
from transfer.models.classifier import ImageClassifier

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def family(name: str) -> str:
  if name in efficientnet_lite.VARIANTS:
    return "efficientnet_lite"
  raise ValueError(f"config.model.name: unknown model {name!r}; available: {sorted(efficientnet_lite.VARIANTS)}")


def build(cfg, num_classes: int) -> ImageClassifier:
  """``cfg``: name, and optional width/depth overrides (small test models), dropout, drop_path, dtype."""
  family(cfg.name)
  variant = efficientnet_lite.VARIANTS[cfg.name]
  if cfg.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"config.model.dtype: {cfg.dtype!r} is not one of {sorted(DTYPES)}")
  backbone = efficientnet_lite.EfficientNetLite(
      width=cfg.get("width") or variant["width"], depth=cfg.get("depth") or variant["depth"],
      drop_path=cfg.get("drop_path", 0.0), bn_momentum=cfg.get("bn_momentum", 0.99), dtype=DTYPES[cfg.get("dtype", "float32")])
  return ImageClassifier(backbone=backbone, num_classes=num_classes, dropout=cfg.get("dropout", 0.0))


def layer_regexes(model: ImageClassifier) -> list[tuple[str, object]]:
  """Depth of each backbone parameter for layer-wise learning-rate decay (the head is deepest, undecayed)."""
  n = len(efficientnet_lite.block_specs(model.backbone.width, model.backbone.depth))
  return [(r"backbone/stem_.*", 0), (r"backbone/block_(\d+)/.*", "group+1"), (r"backbone/top_.*", n + 1)]
