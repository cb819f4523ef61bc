"""A pretrained backbone with a new linear head: the shape of every transfer model here.

Classifiers take the batch dict (``image``, or ``input_ids``/``attention_mask``/``token_type_ids``) and pick what
their backbone needs, so the trainer's steps are the same for every family.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transfer.models import lora


def _head(num_classes: int, zero_init: bool) -> nn.Dense:
  # A zero head starts every class at equal logits, so fine-tuning begins from the pretrained features instead
  # of a random projection of them.
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(num_classes, kernel_init=init, name="head", dtype=jnp.float32)


class ImageClassifier(nn.Module):
  """``backbone(images, train=...) -> (N, D)`` features, dropout, then a Dense ``head``.

  Images arrive as uint8 and are normalised here with the backbone's own ``(x - mean) / std`` in pixel units
  (scalars, or one value per RGB channel), so the data pipeline does not depend on the model; each family record's
  ``input_norm`` (``transfer/models/family.py``) sets them. ``backbone_train`` runs the backbone in
  training mode (BatchNorm batch statistics and running-average updates, stochastic depth); it is separate from
  ``train`` (the head's dropout) because a frozen backbone stays in inference mode: a fixed, cacheable feature
  extractor. ``num_classes=None`` returns the features (a checkpoint without a head).
  """
  backbone: nn.Module
  num_classes: int | None
  dropout: float = 0.0
  zero_init_head: bool = True
  input_mean: float | tuple[float, float, float] = 127.5   # default: [-1, 1] inputs
  input_std: float | tuple[float, float, float] = 127.5
  adapters: tuple = ()   # LoRA: transfer.models.lora.targets(config.param_rules)

  @nn.compact
  def __call__(self, batch, *, train: bool = False, backbone_train: bool | None = None):
    with lora.adapting(self.adapters, train=train):
      mean, std = jnp.asarray(self.input_mean, jnp.float32), jnp.asarray(self.input_std, jnp.float32)
      images = (jnp.asarray(batch["image"], jnp.float32) - mean) / std   # per-channel values: the last axis
      features = self.backbone(images, train=train if backbone_train is None else backbone_train)
      if self.num_classes is None:
        return features
      features = nn.Dropout(self.dropout, deterministic=not train)(features)
      return _head(self.num_classes, self.zero_init_head)(features)


TEXT_POOLINGS = ("cls", "first", "mean", "last")   # config.model.pooling for text (see TextClassifier)


class TextClassifier(nn.Module):
  """A text backbone ``backbone(ids, mask[, token_type_ids], train=...) -> (hidden (N, L, H), extra)`` and a head.

  ``extra`` is an encoder's pooled output (N, H) (BERT), or a decoder's cache (unused here). ``pooling``: 'cls'
  uses the encoder's pooler (tanh dense on the first token, BERT's classification recipe), 'first' the first
  token's hidden state, 'mean' the mask-weighted mean of the hidden states (sentence-transformers' recipe, what
  all-MiniLM-L6-v2 was trained for), 'last' the last non-padding token's (a decoder's: the only position that has
  seen the whole text; ``transformers``' GPT2ForSequenceClassification semantics, with left or right padding).
  ``num_classes=None`` returns the pooled features.
  """
  backbone: nn.Module
  num_classes: int | None
  pooling: str = "cls"
  dropout: float = 0.1
  zero_init_head: bool = True
  adapters: tuple = ()   # LoRA: transfer.models.lora.targets(config.param_rules)

  @nn.compact
  def __call__(self, batch, *, train: bool = False, backbone_train: bool | None = None):
    """``backbone_train`` (default ``train``) switches the encoder's dropout, as for ImageClassifier."""
    with lora.adapting(self.adapters, train=train):
      mask = batch["attention_mask"]
      types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
      hidden, extra = self.backbone(batch["input_ids"], mask, **types,
                                    train=train if backbone_train is None else backbone_train)
      if self.pooling == "cls":
        if extra is None or extra.ndim != 2:
          raise ValueError("config.model.pooling='cls' needs an encoder's pooler, and this backbone has none (a "
                           "decoder): use 'last' (the last non-padding token) or 'mean'")
        features = extra
      elif self.pooling == "first":
        features = hidden[:, 0]
      elif self.pooling == "last":
        length = mask.shape[1]   # the last 1 in each row's mask: right or left padding alike
        last = length - 1 - jnp.argmax(jnp.flip(mask, axis=1), axis=1)
        features = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
      elif self.pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        features = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
      else:
        raise ValueError(f"config.model.pooling: {self.pooling!r} is not one of {TEXT_POOLINGS}")
      if self.num_classes is None:
        return features
      features = nn.Dropout(self.dropout, deterministic=not train)(features)
      return _head(self.num_classes, self.zero_init_head)(features)


class FeatureClassifier(nn.Module):
  """The head alone, on precomputed backbone features (``batch['features']``): the cached-feature probe.

  Same ``head`` (and dropout) as the full classifiers, so its parameters, rules and checkpoints line up with theirs.
  """
  num_classes: int
  dropout: float = 0.0
  zero_init_head: bool = True

  @nn.compact
  def __call__(self, batch, *, train: bool = False, backbone_train: bool | None = None):
    features = nn.Dropout(self.dropout, deterministic=not train)(jnp.asarray(batch["features"], jnp.float32))
    return _head(self.num_classes, self.zero_init_head)(features)
