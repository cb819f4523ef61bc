"""ResNet v2 as in BiT (Big Transfer) in Flax, plus key tables for Google's ``.npz`` files and timm's state dicts.

Pre-activation bottleneck units (GroupNorm + ReLU before each weight-standardised conv, the stride on the 3x3
conv, a 1x1 projection of the pre-activated input on the first unit of each stage), GroupNorm with 32 groups
(eps 1e-5), a final GroupNorm + ReLU before global average pooling, and the width factor of BiT's R50x1 ... R152x4
multiplying every channel count. The stem is a 7x7/2 conv padded by 3, then a zero pad of 1 and a 3x3/2 max pool
without padding: BiT's fixed padding, as timm's ``resnetv2_*_bit`` builds it. No BatchNorm, so no ``batch_stats``.
Inputs are NHWC images scaled to [-1, 1].

Google's BiT ``.npz`` names (``resnet/root_block/standardized_conv2d/kernel``,
``resnet/block{1-4}/unit{01..}/{a,b,c}/{standardized_conv2d/kernel,group_norm/gamma,group_norm/beta}``,
``.../a/proj/standardized_conv2d/kernel``, ``resnet/group_norm/{gamma,beta}``, ``resnet/head/conv2d/{kernel,bias}``)
are the ones timm's ``resnetv2._load_weights`` reads; kernels are HWIO already. ``to_timm`` writes a classifier
back out as timm's ``resnetv2_*_bit`` (``timm_export_table``).
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from transfer.convert import KeyRow, apply_key_table
from transfer.models.family import (INCEPTION_NORMALIZATION, Family, classifier_shapes, image_example,
                                    refuse_override, timm_input_overlay, timm_state_dict, torch_conv_weight)
from transfer.models.keys import choose_layout, torch_conv_kernel, torch_linear_kernel
from transfer.models.resnet import scaled

# name -> units per stage and width factor (BiT's released models).
VARIANTS = {
    'bit-r50x1': dict(depths=(3, 4, 6, 3), width=1),
    'bit-r50x3': dict(depths=(3, 4, 6, 3), width=3),
    'bit-r101x1': dict(depths=(3, 4, 23, 3), width=1),
    'bit-r101x3': dict(depths=(3, 4, 23, 3), width=3),
    'bit-r152x2': dict(depths=(3, 8, 36, 3), width=2),
    'bit-r152x4': dict(depths=(3, 8, 36, 3), width=4),
}
STEM_WIDTH, STAGE_WIDTHS, GROUPS = 64, (256, 512, 1024, 2048), 32

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')   # He init for ReLU nets


def channels(base: int, width: float) -> int:
  """``base * width``: a whole number that GroupNorm's 32 groups divide."""
  out = scaled(base, width)
  if out % GROUPS:
    raise ValueError(f'config.model.width={width}: {base} x {width} = {out} channels, which GroupNorm\'s '
                     f'{GROUPS} groups do not divide')
  return out


class StdConv(nn.Module):
  """Conv without bias whose kernel is standardised per output channel (zero mean, unit variance over H, W and
  input channels) at every call: BiT's weight standardisation, which makes GroupNorm train like BatchNorm."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0       # symmetric, PyTorch style
  eps: float = 1e-8      # timm's BiT value; far below any real kernel's variance
  dtype: Any = jnp.float32

  def kernel_value(self, in_features: int):
    """The raw kernel, through a method so that a LoRA adapter can adapt it before standardisation
    (transfer/models/lora.py: merging then stays exact)."""
    k = self.kernel_size
    return self.param('kernel', _conv_init, (k, k, in_features, self.features), jnp.float32)

  @nn.compact
  def __call__(self, x):
    kernel = self.kernel_value(x.shape[-1])
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    var = jnp.square(kernel - mean).mean(axis=(0, 1, 2), keepdims=True)
    kernel = (kernel - mean) * lax.rsqrt(var + self.eps)
    return lax.conv_general_dilated(jnp.asarray(x, self.dtype), kernel.astype(self.dtype), (self.stride,) * 2,
                                    ((self.padding, self.padding),) * 2,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _group_norm(name: str, dtype) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on activations with a large mean.
  return nn.GroupNorm(num_groups=GROUPS, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class PreActBottleneck(nn.Module):
  """GN-ReLU-conv1x1, GN-ReLU-conv3x3 (stride), GN-ReLU-conv1x1 to ``out_ch``, plus the shortcut."""
  out_ch: int
  stride: int
  project: bool          # first unit of a stage: 1x1 conv (with the stride) on the pre-activated input
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    mid = self.out_ch // 4
    preact = nn.relu(_group_norm('norm1', self.dtype)(x))
    shortcut = StdConv(self.out_ch, 1, self.stride, dtype=self.dtype, name='proj_conv')(preact) if self.project else x
    y = StdConv(mid, 1, dtype=self.dtype, name='conv1')(preact)
    y = StdConv(mid, 3, self.stride, padding=1, dtype=self.dtype, name='conv2')(
        nn.relu(_group_norm('norm2', self.dtype)(y)))
    y = StdConv(self.out_ch, 1, dtype=self.dtype, name='conv3')(nn.relu(_group_norm('norm3', self.dtype)(y)))
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)(y)   # stochastic depth
    return y + shortcut


class ResNetV2(nn.Module):
  """Backbone only: (N, H, W, 3) images in [-1, 1] -> (N, 2048 * width) globally average-pooled features.

  ``depths``: units per stage (BiT's names number stages and units from 1, and so do the module names here:
  ``stage{s}_unit{u}``); ``width``: BiT's width factor (an integer for the released models; tests use other
  depths and widths). Unit ``i`` of ``n`` uses stochastic depth ``drop_path * i / (n - 1)``
  (timm's linear rule: the last block drops at the full rate).
  """
  depths: tuple[int, ...]
  width: float = 1
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = StdConv(channels(STEM_WIDTH, self.width), 7, 2, padding=3, dtype=self.dtype, name='stem_conv')(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))   # zeros (not -inf): BiT pads before its max pool
    x = nn.max_pool(x, (3, 3), (2, 2), padding='VALID')
    total, i = sum(self.depths), 0
    for stage, (depth, width) in enumerate(zip(self.depths, STAGE_WIDTHS), start=1):
      for unit in range(1, depth + 1):
        x = PreActBottleneck(channels(width, self.width), 2 if (unit == 1 and stage > 1) else 1, unit == 1,
                             drop_path=self.drop_path * i / max(total - 1, 1), dtype=self.dtype,
                             name=f'stage{stage}_unit{unit}')(x, train=train)
        i += 1
    x = nn.relu(_group_norm('norm', self.dtype)(x))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion.

def _dense_from_1x1(w):
  """BiT's head is a 1x1 conv, (1, 1, C, K) in the npz: a Dense kernel (C, K)."""
  return w.reshape(w.shape[-2:])


_UNIT = r'resnet/block(\d)/unit0*(\d+)/'   # unit01 -> 1: the module names keep Google's 1-based numbers
NPZ_KEY_TABLE: list[KeyRow] = [
    (r'resnet/root_block/standardized_conv2d/kernel', 'params/backbone/stem_conv/kernel', None),
    *[row for letter, n in (('a', 1), ('b', 2), ('c', 3)) for row in (
        (_UNIT + letter + r'/standardized_conv2d/kernel', rf'params/backbone/stage\1_unit\2/conv{n}/kernel', None),
        (_UNIT + letter + r'/group_norm/gamma', rf'params/backbone/stage\1_unit\2/norm{n}/scale', None),
        (_UNIT + letter + r'/group_norm/beta', rf'params/backbone/stage\1_unit\2/norm{n}/bias', None))],
    (_UNIT + r'a/proj/standardized_conv2d/kernel', r'params/backbone/stage\1_unit\2/proj_conv/kernel', None),
    (r'resnet/group_norm/gamma', 'params/backbone/norm/scale', None),
    (r'resnet/group_norm/beta', 'params/backbone/norm/bias', None),
    (r'resnet/head/conv2d/kernel', 'params/head/kernel', _dense_from_1x1),
    (r'resnet/head/conv2d/bias', 'params/head/bias', None),
]


def timm_key_table(state_dict) -> list[KeyRow]:
  """Rows for timm's ``resnetv2_*_bit`` state dicts, whose stages and blocks count from 0 (``stages.S.blocks.B``):
  written out per block found in the checkpoint, so each lands on the 1-based ``stage{S+1}_unit{B+1}``."""
  blocks = sorted({tuple(map(int, m.groups())) for k in state_dict
                   if (m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', k))})
  rows: list[KeyRow] = [
      (r'stem\.conv\.weight', 'params/backbone/stem_conv/kernel', torch_conv_kernel),
      (r'norm\.weight', 'params/backbone/norm/scale', None),
      (r'norm\.bias', 'params/backbone/norm/bias', None),
      (r'head\.fc\.weight', 'params/head/kernel', torch_linear_kernel),
      (r'head\.fc\.bias', 'params/head/bias', None),
  ]
  for stage, block in blocks:
    src, dst = rf'stages\.{stage}\.blocks\.{block}\.', f'params/backbone/stage{stage + 1}_unit{block + 1}'
    rows += [(src + r'conv(\d)\.weight', dst + r'/conv\1/kernel', torch_conv_kernel),
             (src + r'norm(\d)\.weight', dst + r'/norm\1/scale', None),
             (src + r'norm(\d)\.bias', dst + r'/norm\1/bias', None),
             (src + r'downsample\.conv\.weight', dst + '/proj_conv/kernel', torch_conv_kernel)]
  return rows


LAYOUTS = {'Google BiT .npz': r'resnet/root_block/standardized_conv2d/kernel',
           'timm resnetv2 state dict': r'stem\.conv\.weight'}


def convert_state_dict(state_dict, *, source_name: str = 'checkpoint') -> dict:
  """A BiT checkpoint (Google's npz arrays or timm's state dict) -> flat ``{collection/path: array}``."""
  layout = choose_layout(state_dict, LAYOUTS, family='BiT ResNet v2', source_name=source_name)
  table = NPZ_KEY_TABLE if layout == 'Google BiT .npz' else timm_key_table(state_dict)
  return apply_key_table(state_dict, table, source_name=source_name)


# ---------------------------------------------------------------------------------------------------------------
# Export to timm (``Family.to_timm``): ``timm_key_table`` read backwards, one row per weight.

# Our variant -> timm's BiT network of the same depths and width factor (stem_type 'fixed', StdConv eps 1e-8).
TIMM_NAMES = {'bit-r50x1': 'resnetv2_50x1_bit', 'bit-r50x3': 'resnetv2_50x3_bit', 'bit-r101x1': 'resnetv2_101x1_bit',
              'bit-r101x3': 'resnetv2_101x3_bit', 'bit-r152x2': 'resnetv2_152x2_bit',
              'bit-r152x4': 'resnetv2_152x4_bit'}


def _conv_1x1_from_dense(kernel):
  """timm's BiT head is a 1x1 conv: a Dense kernel (C, K) -> (K, C, 1, 1)."""
  return np.transpose(kernel)[:, :, None, None]


def timm_export_table(depths) -> list[KeyRow]:
  """Rows for a network of ``depths`` units per stage: our 1-based ``stage{S}_unit{U}`` -> timm's 0-based
  ``stages.{S-1}.blocks.{U-1}``, written out per unit."""
  rows: list[KeyRow] = [
      (r'params/backbone/stem_conv/kernel', 'stem.conv.weight', torch_conv_weight),
      (r'params/backbone/norm/scale', 'norm.weight', None),
      (r'params/backbone/norm/bias', 'norm.bias', None),
      (r'params/head/kernel', 'head.fc.weight', _conv_1x1_from_dense),
      (r'params/head/bias', 'head.fc.bias', None),
  ]
  for stage, depth in enumerate(depths, start=1):
    for unit in range(1, depth + 1):
      src, dst = f'params/backbone/stage{stage}_unit{unit}/', f'stages.{stage - 1}.blocks.{unit - 1}.'
      rows += [(src + r'conv(\d)/kernel', dst + r'conv\1.weight', torch_conv_weight),
               (src + r'norm(\d)/scale', dst + r'norm\1.weight', None),
               (src + r'norm(\d)/bias', dst + r'norm\1.bias', None),
               (src + r'proj_conv/kernel', dst + 'downsample.conv.weight', torch_conv_weight)]
  return rows


def timm_model(cfg) -> str:
  """timm's name for ``config.model``'s BiT network. timm fixes the width factor by the name (its
  ``resnetv2_*_bit`` builders set it), so a ``config.model.width`` override must be another registered size."""
  variant = VARIANTS[cfg.name]
  width = cfg.get('width') or variant['width']
  for ours, v in VARIANTS.items():
    if v['depths'] == variant['depths'] and v['width'] == width:
      return TIMM_NAMES[ours]
  sizes = ', '.join(f"{n} (width {v['width']})" for n, v in VARIANTS.items() if v['depths'] == variant['depths'])
  raise ValueError(f'config.model.width={cfg.width}: timm builds a BiT network only at the width factor its name '
                   f'gives ({sizes}); {cfg.name} at width {width} has no timm equivalent')


def to_timm(flat, *, cfg, num_classes: int) -> tuple[str, dict, dict]:
  """A BiT classifier's variables -> ``(timm name, create_model kwargs, timm state dict)``; the head is timm's
  ``head.fc`` (a 1x1 conv). GroupNorm only: no running statistics."""
  name = timm_model(cfg)
  backbone = build_backbone(cfg, jnp.float32)
  state = timm_state_dict(flat, timm_export_table(backbone.depths),
                          model_shapes=classifier_shapes(backbone, num_classes), what=f'{cfg.name} -> timm {name}')
  return name, timm_input_overlay(cfg), state


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> ResNetV2:
  refuse_override(cfg, 'depth', 'a BiT ResNet\'s depth comes from its name')
  variant = VARIANTS[cfg.name]
  return ResNetV2(variant['depths'], width=cfg.get('width') or variant['width'], drop_path=cfg.get('drop_path', 0.0),
                  dtype=dtype)


def layer_regexes(backbone) -> list:
  """Stage-wise, then the final GroupNorm."""
  return [(r'backbone/stem_.*', 0), (r'backbone/stage(\d)_unit\d+/.*', 'group+0'), (r'backbone/norm/.*', 5)]


FAMILY = Family(
    name='bit', inputs='image', variants=VARIANTS, backbone=build_backbone,
    convert=lambda state, *, cfg, hf_config, source_name: convert_state_dict(state, source_name=source_name),
    layer_regexes=layer_regexes, example_batch=image_example, to_timm=to_timm,
    input_norm=INCEPTION_NORMALIZATION,   # [-1, 1], as BiT was trained (timm's resnetv2_*_bit: mean = std = 0.5)
    cpu_library_fusions=())   # XLA's GroupNorm and convolutions are faster (layers.compiler_options)
