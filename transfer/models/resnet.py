"""ResNet v1 (18 to 152) in Flax, plus the key table that loads torchvision's and timm's checkpoints.

The "v1.5" network both libraries build for ``resnet*``: the stride of a bottleneck sits on its 3x3 conv, a
strided or widening block projects its shortcut with a 1x1 conv + BatchNorm, the stem is a 7x7/2 conv and a 3x3/2
max pool, all padding is PyTorch's symmetric ``k // 2``. BatchNorm: eps 1e-5, running statistics in the
``batch_stats`` collection. Inputs are NHWC images normalised with ImageNet's per-channel mean and std.

torchvision and timm write the same state-dict names for these models (``conv1``, ``bn1``, ``layerS.B.convK``,
``layerS.B.bnK``, ``layerS.B.downsample.{0,1}``, ``fc``; checked key for key for resnet18 and resnet50 in
torchvision 0.29 and timm 1.0), so one key table serves both. ``to_timm`` writes a classifier back out as timm's
``resnet*`` (``TIMM_EXPORT_TABLE``: that table read backwards).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from transfer.convert import KeyRow, apply_key_table
from transfer.models.family import (IMAGENET_NORMALIZATION, Family, batchnorm_export_rows, classifier_shapes,
                                    image_example, refuse_override, timm_input_overlay, timm_state_dict,
                                    torch_conv_weight, torch_linear_weight, with_batch_counters)
from transfer.models.keys import choose_layout, torch_batchnorm_rows, torch_conv_kernel, torch_linear_kernel
from transfer.models.layers import batch_norm_factory

# name -> block type and blocks per stage (torchvision's table).
VARIANTS = {
    'resnet18': dict(bottleneck=False, depths=(2, 2, 2, 2)),
    'resnet34': dict(bottleneck=False, depths=(3, 4, 6, 3)),
    'resnet50': dict(bottleneck=True, depths=(3, 4, 6, 3)),
    'resnet101': dict(bottleneck=True, depths=(3, 4, 23, 3)),
    'resnet152': dict(bottleneck=True, depths=(3, 8, 36, 3)),
}
STEM_WIDTH, STAGE_WIDTHS, BOTTLENECK_EXPANSION = 64, (64, 128, 256, 512), 4

# He init (fan-out) as torchvision uses: keeps ReLU activations at unit scale when training from scratch.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def scaled(channels: int, width: float, what: str = 'config.model.width') -> int:
  """``channels * width``, which must be a whole number (``width`` shrinks test models, e.g. 0.25)."""
  out = channels * width
  if out < 1 or out != int(out):
    raise ValueError(f'{what}={width}: {channels} channels x {width} is not a whole number of channels')
  return int(out)


class ResidualBlock(nn.Module):
  """Basic (two 3x3 convs) or bottleneck (1x1, 3x3 with the stride, 1x1 to ``4 * width``) residual block."""
  width: int
  stride: int
  bottleneck: bool
  drop_path: float = 0.0
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    def conv(feats, k, stride, name):
      pad = ((k // 2, k // 2),) * 2
      return nn.Conv(feats, (k, k), (stride, stride), padding=pad, use_bias=False, kernel_init=_conv_init,
                     dtype=self.dtype, param_dtype=jnp.float32, name=name)

    bn = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    out_ch = self.width * (BOTTLENECK_EXPANSION if self.bottleneck else 1)
    shortcut = x
    if self.bottleneck:
      y = nn.relu(bn('bn1')(conv(self.width, 1, 1, 'conv1')(x)))
      y = nn.relu(bn('bn2')(conv(self.width, 3, self.stride, 'conv2')(y)))
      y = bn('bn3')(conv(out_ch, 1, 1, 'conv3')(y))
    else:
      y = nn.relu(bn('bn1')(conv(self.width, 3, self.stride, 'conv1')(x)))
      y = bn('bn2')(conv(out_ch, 3, 1, 'conv2')(y))
    if self.stride != 1 or x.shape[-1] != out_ch:
      shortcut = bn('downsample_bn')(conv(out_ch, 1, self.stride, 'downsample_conv')(x))
    # Stochastic depth: drop the whole residual branch per example (rng stream 'dropout').
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Backbone only: (N, H, W, 3) normalised images -> (N, D) globally average-pooled features.

  ``depths``: blocks per stage; ``width`` scales the stages' channel counts, not the 64-channel stem (1.0 is the
  real network; tests use 0.25; timm's ``channels`` option builds the same narrow network). Block ``i`` of ``n``
  uses stochastic depth ``drop_path * i / (n - 1)`` (timm's linear rule: the last block drops at the full rate).
  ``dtype`` is the computation dtype; parameters and BatchNorm statistics stay float32.
  """
  depths: tuple[int, ...]
  bottleneck: bool
  width: float = 1.0
  drop_path: float = 0.0
  bn_momentum: float = 0.9   # flax convention (PyTorch's momentum 0.1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(STEM_WIDTH, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, param_dtype=jnp.float32, name='stem_conv')(x)
    x = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)('stem_bn')(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    total, i = sum(self.depths), 0
    for stage, (depth, width) in enumerate(zip(self.depths, STAGE_WIDTHS), start=1):
      for b in range(depth):
        x = ResidualBlock(scaled(width, self.width), 2 if (b == 0 and stage > 1) else 1, self.bottleneck,
                          drop_path=self.drop_path * i / max(total - 1, 1), bn_momentum=self.bn_momentum, dtype=self.dtype,
                          name=f'stage{stage}_block{b}')(x, train=train)
        i += 1
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion: torchvision's and timm's state dicts (one layout).

_BLOCK = r'layer(\d)\.(\d+)\.'
KEY_TABLE = [
    (r'conv1\.weight', 'params/backbone/stem_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(r'bn1', 'stem_bn'),
    (_BLOCK + r'conv(\d)\.weight', r'params/backbone/stage\1_block\2/conv\3/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(_BLOCK + r'bn(\d)', r'stage\1_block\2/bn\3'),
    (_BLOCK + r'downsample\.0\.weight', r'params/backbone/stage\1_block\2/downsample_conv/kernel',
     torch_conv_kernel),
    *torch_batchnorm_rows(_BLOCK + r'downsample\.1', r'stage\1_block\2/downsample_bn'),
    (r'fc\.weight', 'params/head/kernel', torch_linear_kernel),
    (r'fc\.bias', 'params/head/bias', None),
]
LAYOUTS = {'torchvision/timm state dict': r'layer1\.0\.conv1\.weight'}


def convert_state_dict(state_dict, *, source_name: str = 'checkpoint') -> dict:
  """torchvision/timm ResNet state dict -> flat ``{collection/path: array}`` for ``merge_pretrained``."""
  choose_layout(state_dict, LAYOUTS, family='ResNet', source_name=source_name)
  return apply_key_table(state_dict, KEY_TABLE, source_name=source_name)


# ---------------------------------------------------------------------------------------------------------------
# Export to timm (``Family.to_timm``): ``KEY_TABLE`` read backwards, one row per weight.

_OUR_BLOCK = r'stage(\d)_block(\d+)/'
TIMM_EXPORT_TABLE: list[KeyRow] = [
    (r'params/backbone/stem_conv/kernel', 'conv1.weight', torch_conv_weight),
    *batchnorm_export_rows(r'stem_bn', 'bn1'),
    (r'params/backbone/' + _OUR_BLOCK + r'conv(\d)/kernel', r'layer\1.\2.conv\3.weight', torch_conv_weight),
    *batchnorm_export_rows(_OUR_BLOCK + r'bn(\d)', r'layer\1.\2.bn\3'),
    (r'params/backbone/' + _OUR_BLOCK + r'downsample_conv/kernel', r'layer\1.\2.downsample.0.weight',
     torch_conv_weight),
    *batchnorm_export_rows(_OUR_BLOCK + r'downsample_bn', r'layer\1.\2.downsample.1'),
    (r'params/head/kernel', 'fc.weight', torch_linear_weight),
    (r'params/head/bias', 'fc.bias', None),
]


def timm_model(cfg) -> tuple[str, dict]:
  """timm's name and ``create_model`` kwargs for ``config.model``'s ResNet: timm registers the same five depths
  under the same names, and builds the narrower networks of ``config.model.width`` from its ``channels`` argument
  (the stages' widths; both leave the 64-channel stem unscaled)."""
  width = cfg.get('width') or 1.0
  return cfg.name, ({} if width == 1.0 else {'channels': tuple(scaled(c, width) for c in STAGE_WIDTHS)})


def to_timm(flat, *, cfg, num_classes: int) -> tuple[str, dict, dict]:
  """A ResNet classifier's variables -> ``(timm name, create_model kwargs, timm state dict)``; the head is
  timm's ``fc``."""
  name, kwargs = timm_model(cfg)
  shapes = classifier_shapes(build_backbone(cfg, jnp.float32), num_classes)
  state = timm_state_dict(flat, TIMM_EXPORT_TABLE, model_shapes=shapes, what=f'{cfg.name} -> timm {name}')
  return name, {**kwargs, **timm_input_overlay(cfg)}, with_batch_counters(state)


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> ResNet:
  refuse_override(cfg, 'depth', 'a ResNet\'s depth comes from its name')
  return ResNet(**VARIANTS[cfg.name], width=cfg.get('width') or 1.0, drop_path=cfg.get('drop_path', 0.0),
                bn_momentum=cfg.get('bn_momentum', 0.9), dtype=dtype)


def layer_regexes(backbone) -> list:
  """Stage-wise: stem at depth 0, stage s (1..4) at depth s."""
  return [(r'backbone/stem_.*', 0), (r'backbone/stage(\d)_block\d+/.*', 'group+0')]


FAMILY = Family(
    name='resnet', inputs='image', variants=VARIANTS, backbone=build_backbone,
    convert=lambda state, *, cfg, hf_config, source_name: convert_state_dict(state, source_name=source_name),
    layer_regexes=layer_regexes, example_batch=image_example, to_timm=to_timm,
    # torchvision's and timm's ResNets: ImageNet's channel mean and std, times 255.
    input_norm=IMAGENET_NORMALIZATION,
    cpu_library_fusions=('reduce',))   # XLA's convolutions, YNNPACK's reductions (layers.compiler_options)
