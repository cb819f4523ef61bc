"""A pretrained backbone with a new linear head: the shape of every transfer model here."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class ImageClassifier(nn.Module):
  """``backbone(x, train=...) -> (N, D)`` features, dropout, then a Dense ``head`` (zero-initialised).

  A zero head starts every class at equal logits, so fine-tuning begins from the pretrained features instead of
  a random projection of them. ``bn_train`` decides whether BatchNorm uses batch statistics and updates its
  running averages; it is separate from ``train`` (dropout) because a frozen backbone keeps BN in inference mode.
  """
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  zero_init_head: bool = True

  @nn.compact
  def __call__(self, images, *, train: bool = False, bn_train: bool | None = None):
    features = self.backbone(images, train=train if bn_train is None else bn_train)
    features = nn.Dropout(self.dropout, deterministic=not train)(features)
    init = nn.initializers.zeros if self.zero_init_head else nn.initializers.lecun_normal()
    return nn.Dense(self.num_classes, kernel_init=init, name="head", dtype=jnp.float32)(features)
