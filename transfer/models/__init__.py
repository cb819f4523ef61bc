"""Model registry: config.model -> a Flax classifier, and the per-family facts the trainer needs."""
from __future__ import annotations

import ast

import jax.numpy as jnp
import numpy as np

from transfer.models import efficientnet_lite, resnet, resnetv2, vit
from transfer.models.classifier import FeatureClassifier, ImageClassifier, TextClassifier

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_FAMILIES = {"efficientnet_lite": efficientnet_lite.VARIANTS, "resnet": resnet.VARIANTS,
                  "bit": resnetv2.VARIANTS, "vit": vit.VARIANTS}
NAMES = sorted(name for variants in IMAGE_FAMILIES.values() for name in variants) + ["bert"]

# Per image family, the ``(mean, std)`` in pixel units its checkpoints' inputs were normalised with: scalars, or
# one value per RGB channel. ImageClassifier applies it, so every family takes the same uint8 images.
INPUT_NORMALIZATION = {
    "efficientnet_lite": (127.5, 127.5),   # [-1, 1], as the TF "lite" models were trained
    # torchvision's and timm's ResNets: ImageNet's channel mean and std (0.485, 0.456, 0.406), (0.229, 0.224,
    # 0.225), times 255.
    "resnet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "bit": (127.5, 127.5),   # [-1, 1], as BiT was trained (timm's resnetv2_*_bit: mean = std = 0.5)
    "vit": (127.5, 127.5),   # [-1, 1], as Google's ViTs were trained (timm's augreg weights: mean = std = 0.5)
}


# config.model.input_norm by name: the two conventions checkpoints are trained with.
NAMED_NORMALIZATIONS = {
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),   # DeiT, DINO, torchvision, most of timm
    "inception": (127.5, 127.5),                                         # [-1, 1]: Google's ViT and BiT, TF lite
}


def input_normalization(fam: str, choice) -> tuple:
  """``config.model.input_norm``: 'auto' (the family's usual checkpoints, ``INPUT_NORMALIZATION``), a name in
  ``NAMED_NORMALIZATIONS``, or ``[mean, std]`` in pixel units (scalars or three per channel). A checkpoint trained
  with another convention than its family's (DeiT or DINO ViTs: ImageNet mean/std) loads cleanly but gives
  degraded features unless this says so."""
  if choice in (None, "auto"):
    return INPUT_NORMALIZATION[fam]
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


def family(name: str) -> str:
  for fam, variants in IMAGE_FAMILIES.items():
    if name in variants:
      return fam
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
  mean, std = input_normalization(fam, cfg.get("input_norm", "auto"))
  return ImageClassifier(backbone=_image_backbone(fam, cfg, dtype), num_classes=num_classes,
                         dropout=cfg.get("dropout", 0.0), input_mean=mean, input_std=std)


def _image_backbone(fam: str, cfg, dtype):
  variant = IMAGE_FAMILIES[fam][cfg.name]
  if fam == "efficientnet_lite":
    return efficientnet_lite.EfficientNetLite(
        width=cfg.get("width") or variant["width"], depth=cfg.get("depth") or variant["depth"],
        drop_path=cfg.get("drop_path", 0.0), bn_momentum=cfg.get("bn_momentum", 0.99), dtype=dtype)
  if fam == "vit" and cfg.get("width"):
    raise ValueError(f"config.model.width={cfg.width}: a ViT's width comes from its name ({cfg.name}); "
                     f"'vit-test8' is the small test size")
  if cfg.get("depth"):
    raise ValueError(f"config.model.depth={cfg.depth}: only EfficientNet-Lite takes a depth multiplier; "
                     f"{cfg.name}'s depth comes from its name")
  if fam == "resnet":
    return resnet.ResNet(**variant, width=cfg.get("width") or 1.0, drop_path=cfg.get("drop_path", 0.0),
                         bn_momentum=cfg.get("bn_momentum", 0.9), dtype=dtype)
  if fam == "bit":
    return resnetv2.ResNetV2(variant["depths"], width=cfg.get("width") or variant["width"],
                             drop_path=cfg.get("drop_path", 0.0), dtype=dtype)
  if fam == "vit":
    return vit.from_variant(cfg.name, pooling=cfg.get("pooling", "cls"), drop_path=cfg.get("drop_path", 0.0),
                            posemb_grid=cfg.get("posemb_grid"), dtype=dtype)
  raise AssertionError(fam)


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
  if isinstance(model.backbone, vit.ViT):
    n = model.backbone.depth
    return [(r"backbone/(patch_embed/.*|cls|pos_embedding)", 0), (r"backbone/block_(\d+)/.*", "group+1"),
            (r"backbone/encoder_norm/.*", n + 1)]
  if isinstance(model.backbone, resnet.ResNet):   # stage-wise: stem 0, stage s (1..4) at depth s
    return [(r"backbone/stem_.*", 0), (r"backbone/stage(\d)_block\d+/.*", "group+0")]
  if isinstance(model.backbone, resnetv2.ResNetV2):   # stage-wise, then the final GroupNorm
    return [(r"backbone/stem_.*", 0), (r"backbone/stage(\d)_unit\d+/.*", "group+0"), (r"backbone/norm/.*", 5)]
  n = len(efficientnet_lite.block_specs(model.backbone.width, model.backbone.depth))
  return [(r"backbone/stem_.*", 0), (r"backbone/block_(\d+)/.*", "group+1"), (r"backbone/top_.*", n + 1)]
