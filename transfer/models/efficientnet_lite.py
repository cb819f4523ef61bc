"""EfficientNet-Lite0..4 backbone in Flax, plus the key tables that load PyTorch checkpoints of the same network.

The architecture mirrors ``efficientnet_lite_pytorch`` (lukemelas-style port of the TF "lite" builder) exactly,
so its ImageNet weights load without retraining: MBConv blocks without squeeze-excitation, ReLU6, TF "SAME"
padding, BatchNorm (eps 1e-3, momentum 0.99), stem (32) and top (1280) widths and the first and last stages'
repeat counts left unscaled. Inputs are NHWC images scaled to [-1, 1].

Padding note: flax ``padding='SAME'`` is computed from the actual input shape (TF semantics: for stride 2 the
extra pixel goes bottom/right), so any resolution works. The reference instead freezes its padding at
construction time from ``image_size`` (default: the variant's resolution); an input whose size has a different
parity at any stride-2 conv is then silently mis-padded (e.g. lite0 built for 224 run at 240 gives 7x7 instead of
8x8 final maps and logits off by ~1.5). Compare against a reference built with ``image_size=None`` or the input size.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from transfer.convert import KeyRow, apply_key_table
from transfer.models.keys import choose_layout, torch_batchnorm_rows, torch_conv_kernel
from transfer.models.layers import DepthwiseConv, batch_norm_factory

# name -> (width multiplier, depth multiplier, native resolution), from the reference's efficientnet_params.
VARIANTS = {
    'efficientnet-lite0': dict(width=1.0, depth=1.0, resolution=224),
    'efficientnet-lite1': dict(width=1.0, depth=1.1, resolution=240),
    'efficientnet-lite2': dict(width=1.1, depth=1.2, resolution=260),
    'efficientnet-lite3': dict(width=1.2, depth=1.4, resolution=280),
    'efficientnet-lite4': dict(width=1.4, depth=1.8, resolution=300),
}

# Stages of the base network: (repeats, kernel, stride, expand ratio, input filters, output filters).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FEATURES, TOP_FEATURES = 32, 1280  # fixed for the lite models ("fix_head_stem")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by ``width`` and rounds to a multiple of 8, never dropping more than 10%."""
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


def block_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
  """Per-block (kernel, stride, expand ratio, in channels, out channels), in the reference's flat order."""
  specs, in_ch = [], STEM_FEATURES
  for i, (repeats, kernel, stride, expand, _, out) in enumerate(_STAGES):
    out_ch = round_filters(out, width)
    if 0 < i < len(_STAGES) - 1:  # the first and last stages keep their repeat count
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      specs.append((kernel, stride if r == 0 else 1, expand, in_ch, out_ch))
      in_ch = out_ch
  return specs


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection, residual when shapes allow."""
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int
  drop_path: float = 0.0
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = lambda feats, k, name, **kw: nn.Conv(feats, (k, k), padding='SAME', use_bias=False, dtype=self.dtype,
                                                 param_dtype=jnp.float32, name=name, **kw)
    bn = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=1e-3, dtype=self.dtype)
    inputs, mid = x, self.in_ch * self.expand
    if self.expand != 1:
      x = nn.relu6(bn('expand_bn')(conv(mid, 1, 'expand_conv')(x)))
    x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name='dw_conv')(x)
    x = nn.relu6(bn('dw_bn')(x))
    x = bn('project_bn')(conv(self.out_ch, 1, 'project_conv')(x))
    if self.stride == 1 and self.in_ch == self.out_ch:
      # Stochastic depth: drop the whole residual branch per example (rng stream 'dropout').
      x = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """Backbone only: (N, H, W, 3) images in [-1, 1] -> (N, 1280) globally average-pooled features.

  ``drop_path`` is the final block's stochastic-depth rate; block i uses ``drop_path * i / num_blocks`` like the
  reference. ``dtype`` is the computation dtype; parameters and BatchNorm statistics stay float32.
  """
  width: float = 1.0
  depth: float = 1.0
  drop_path: float = 0.0
  bn_momentum: float = 0.99   # the reference's; short fine-tuning runs want ~0.9 so running stats catch up
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    bn = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=1e-3, dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(STEM_FEATURES, (3, 3), strides=(2, 2), padding='SAME', use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, name='stem_conv')(x)
    x = nn.relu6(bn('stem_bn')(x))
    specs = block_specs(self.width, self.depth)
    for i, (kernel, stride, expand, in_ch, out_ch) in enumerate(specs):
      x = MBConv(kernel, stride, expand, in_ch, out_ch, drop_path=self.drop_path * i / len(specs),
                 bn_momentum=self.bn_momentum, dtype=self.dtype, name=f'block_{i}')(x, train=train)
    x = nn.Conv(TOP_FEATURES, (1, 1), padding='SAME', use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, name='top_conv')(x)
    x = nn.relu6(bn('top_bn')(x))
    # Average in float32 so low-precision compute does not lose the small per-pixel contributions.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion. Two layouts of the same network: the packaged weights' ``efficientnet_lite_pytorch``
# names (``_conv_stem``, ``_blocks.N.*`` numbered flat, ``_conv_head``, ``_fc``) and timm's ``tf_efficientnet_lite*``
# names (``conv_stem``, ``blocks.STAGE.I.*``, ``conv_head``, ``classifier``).

_BLOCK = r'_blocks\.(\d+)\.'
KEY_TABLE: list[KeyRow] = [
    (r'_conv_stem\.weight', 'params/backbone/stem_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(r'_bn0', 'stem_bn'),
    (_BLOCK + r'_expand_conv\.weight', r'params/backbone/block_\1/expand_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(_BLOCK + r'_bn0', r'block_\1/expand_bn'),
    (_BLOCK + r'_depthwise_conv\.weight', r'params/backbone/block_\1/dw_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(_BLOCK + r'_bn1', r'block_\1/dw_bn'),
    (_BLOCK + r'_project_conv\.weight', r'params/backbone/block_\1/project_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(_BLOCK + r'_bn2', r'block_\1/project_bn'),
    (r'_conv_head\.weight', 'params/backbone/top_conv/kernel', torch_conv_kernel),
    *torch_batchnorm_rows(r'_bn1', 'top_bn'),
    (r'_fc\.weight', 'params/head/kernel', np.transpose),
    (r'_fc\.bias', 'params/head/bias', None),
]


def timm_key_table(state_dict) -> list[KeyRow]:
  """Rows for timm's ``tf_efficientnet_lite*`` names, whose blocks are numbered per stage (``blocks.S.I``).

  The flat block number is the position of ``(S, I)`` in the checkpoint's own sorted block list; a block with a
  ``conv_pwl`` is an inverted residual (``conv_pw`` expands), one without is timm's depthwise-separable first
  block (``conv_pw`` projects). Keys outside these rows (squeeze-excitation, ...) stay unmatched: an error."""
  blocks = sorted({tuple(map(int, m.groups())) for k in state_dict
                   if (m := re.match(r'blocks\.(\d+)\.(\d+)\.', k))})
  rows: list[KeyRow] = [
      (r'conv_stem\.weight', 'params/backbone/stem_conv/kernel', torch_conv_kernel),
      *torch_batchnorm_rows(r'bn1', 'stem_bn'),
      (r'conv_head\.weight', 'params/backbone/top_conv/kernel', torch_conv_kernel),
      *torch_batchnorm_rows(r'bn2', 'top_bn'),
      (r'classifier\.weight', 'params/head/kernel', np.transpose),
      (r'classifier\.bias', 'params/head/bias', None),
  ]
  for i, (stage, index) in enumerate(blocks):
    src, dst = rf'blocks\.{stage}\.{index}\.', f'block_{i}'
    if f'blocks.{stage}.{index}.conv_pwl.weight' in state_dict:
      parts = [('conv_pw', 'bn1', 'expand'), ('conv_dw', 'bn2', 'dw'), ('conv_pwl', 'bn3', 'project')]
    else:
      parts = [('conv_dw', 'bn1', 'dw'), ('conv_pw', 'bn2', 'project')]
    for conv, bn, ours in parts:
      rows.append((src + conv + r'\.weight', f'params/backbone/{dst}/{ours}_conv/kernel', torch_conv_kernel))
      rows += torch_batchnorm_rows(src + bn, f'{dst}/{ours}_bn')
  return rows


LAYOUTS = {'efficientnet_lite_pytorch': r'_conv_stem\.weight', 'timm tf_efficientnet_lite': r'conv_stem\.weight'}


def convert_torch_state_dict(state_dict, source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """``efficientnet_lite_pytorch`` state dict -> flat ``{collection/path: array}`` for ``merge_pretrained``."""
  return apply_key_table(state_dict, KEY_TABLE, source_name=source_name)


def convert_state_dict(state_dict, *, source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """A state dict in either layout (told apart by its stem's name) -> flat ``{collection/path: array}``."""
  layout = choose_layout(state_dict, LAYOUTS, family='EfficientNet-Lite', source_name=source_name)
  if layout == 'efficientnet_lite_pytorch':
    return convert_torch_state_dict(state_dict, source_name=source_name)
  return apply_key_table(state_dict, timm_key_table(state_dict), source_name=source_name)
