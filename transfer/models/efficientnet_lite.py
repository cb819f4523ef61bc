"""EfficientNet-Lite0..4 backbone in Flax, plus the key tables that load PyTorch checkpoints of the same network.

The architecture mirrors ``efficientnet_lite_pytorch`` (lukemelas-style port of the TF "lite" builder) exactly,
so its ImageNet weights load without retraining: MBConv blocks without squeeze-excitation, ReLU6, TF "SAME"
padding, BatchNorm (eps 1e-3, momentum 0.99), stem (32) and top (1280) widths and the first and last stages'
repeat counts left unscaled. Inputs are NHWC images scaled to [-1, 1].

Two networks share this architecture and its checkpoint keys, told apart by ``padding`` (``PADDINGS``): 'same' is the
TF "lite" network above (TF "SAME" padding, BatchNorm eps 1e-3: the packaged weights, timm's
``tf_efficientnet_lite*``); 'symmetric' is timm's PyTorch-native ``efficientnet_lite*`` (every conv padded k//2 on
each side, BatchNorm eps 1e-5). The two give different outputs from the same weights, so a checkpoint whose layout
does not say which it is must be told (``checkpoint_padding``). ``to_timm`` writes a classifier back out as the
timm model of its padding (``timm_export_table``).

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
from transfer.models.family import (INCEPTION_NORMALIZATION, Family, batchnorm_export_rows, classifier_shapes,
                                    image_example, timm_input_overlay, timm_state_dict, torch_conv_weight,
                                    torch_linear_weight, with_batch_counters)
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

# config.model.padding -> the network's BatchNorm epsilon: TF's default for the TF port, PyTorch's for timm's own.
PADDINGS = {'same': 1e-3, 'symmetric': 1e-5}


def check_padding(padding: str) -> str:
  if padding not in PADDINGS:
    raise ValueError(f"config.model.padding={padding!r}: expected 'same' (TF \"SAME\": the packaged weights, timm's "
                     "tf_efficientnet_lite*) or 'symmetric' (k//2 on each side: timm's efficientnet_lite*)")
  return padding


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by ``width`` and rounds to a multiple of 8, never dropping more than 10%."""
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


def stage_repeats(depth: float) -> list[int]:
  """Blocks per stage: ``ceil(depth * repeats)``, except the first and last stages, which keep their count."""
  return [repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(depth * repeats))
          for i, (repeats, *_) in enumerate(_STAGES)]


def block_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
  """Per-block (kernel, stride, expand ratio, in channels, out channels), in the reference's flat order."""
  specs, in_ch = [], STEM_FEATURES
  for (_, kernel, stride, expand, _, out), repeats in zip(_STAGES, stage_repeats(depth)):
    out_ch = round_filters(out, width)
    for r in range(repeats):
      specs.append((kernel, stride if r == 0 else 1, expand, in_ch, out_ch))
      in_ch = out_ch
  return specs


def symmetric_padded(same_conv, x, kernel: int, stride: int):
  """``same_conv`` (an odd ``kernel``, TF "SAME" padding) applied as if padded ``kernel // 2`` on every side.

  The two paddings coincide when a side ``n`` has ``(n - 1) % stride == 0`` (then "SAME" adds ``kernel // 2`` on
  both sides). Otherwise zeros appended at the bottom/right bring ``n`` to that case; they only feed output
  rows/columns past the symmetric output's end (``(n - 1) // stride + 1``), which are cut off."""
  extra = [(1 - n) % stride for n in x.shape[1:3]]
  out_h, out_w = ((n - 1) // stride + 1 for n in x.shape[1:3])
  x = jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0)))
  return same_conv(x)[:, :out_h, :out_w]


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection, residual when shapes allow."""
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int
  drop_path: float = 0.0
  bn_momentum: float = 0.99
  padding: str = 'same'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = lambda feats, k, name, **kw: nn.Conv(feats, (k, k), padding='SAME', use_bias=False, dtype=self.dtype,
                                                 param_dtype=jnp.float32, name=name, **kw)
    bn = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=PADDINGS[self.padding],
                            dtype=self.dtype)
    inputs, mid = x, self.in_ch * self.expand
    if self.expand != 1:
      x = nn.relu6(bn('expand_bn')(conv(mid, 1, 'expand_conv')(x)))
    dw_conv = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name='dw_conv')
    x = dw_conv(x) if self.padding == 'same' else symmetric_padded(dw_conv, x, self.kernel, self.stride)
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
  padding: str = 'same'       # 'same': the TF network; 'symmetric': timm's efficientnet_lite* (module docstring)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    padding = check_padding(self.padding)
    bn = batch_norm_factory(train=train, momentum=self.bn_momentum, epsilon=PADDINGS[padding], dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(STEM_FEATURES, (3, 3), strides=(2, 2), padding='SAME' if padding == 'same' else ((1, 1), (1, 1)),
                use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name='stem_conv')(x)
    x = nn.relu6(bn('stem_bn')(x))
    specs = block_specs(self.width, self.depth)
    for i, (kernel, stride, expand, in_ch, out_ch) in enumerate(specs):
      x = MBConv(kernel, stride, expand, in_ch, out_ch, drop_path=self.drop_path * i / len(specs),
                 bn_momentum=self.bn_momentum, padding=padding, dtype=self.dtype, name=f'block_{i}')(x, train=train)
    x = nn.Conv(TOP_FEATURES, (1, 1), padding='SAME', use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, name='top_conv')(x)
    x = nn.relu6(bn('top_bn')(x))
    # Average in float32 so low-precision compute does not lose the small per-pixel contributions.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion. Two layouts: the packaged weights' ``efficientnet_lite_pytorch`` names (``_conv_stem``,
# ``_blocks.N.*`` numbered flat, ``_conv_head``, ``_fc``), always the TF network, and timm's names (``conv_stem``,
# ``blocks.STAGE.I.*``, ``conv_head``, ``classifier``), which its ``tf_efficientnet_lite*`` (padding 'same') and its
# ``efficientnet_lite*`` (padding 'symmetric') share key for key and shape for shape.

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


LAYOUTS = {'efficientnet_lite_pytorch': r'_conv_stem\.weight', 'timm efficientnet_lite': r'conv_stem\.weight'}


def checkpoint_padding(state_dict, padding: str | None, *, source_name: str = 'checkpoint') -> str:
  """The network (``PADDINGS``) a checkpoint holds: ``padding`` (``config.model.padding``; None = infer it) checked
  against what the layout says. An ``efficientnet_lite_pytorch`` file is the TF network ('same'); a timm file may
  be either network, and loading one as the other gives wrong outputs without any error, so it needs ``padding``."""
  if padding is not None:
    check_padding(padding)
  layout = choose_layout(state_dict, LAYOUTS, family='EfficientNet-Lite', source_name=source_name)
  if layout == 'efficientnet_lite_pytorch':
    if padding == 'symmetric':
      raise ValueError(f"config.model.padding='symmetric', but {source_name} is in efficientnet_lite_pytorch's "
                       "layout, which only holds the TF network (TF \"SAME\" padding): set config.model.padding="
                       "'same' or leave it unset")
    return 'same'
  if padding is None:
    raise ValueError(
        f"{source_name} is in timm's EfficientNet-Lite layout, which two networks share key for key: "
        "tf_efficientnet_lite* (TF \"SAME\" padding, BatchNorm eps 1e-3) and efficientnet_lite* (symmetric k//2 "
        "padding, eps 1e-5); loading one as the other runs without error but gives wrong outputs. Say which: set "
        "config.model.padding='same' for tf_efficientnet_lite*, 'symmetric' for timm's efficientnet_lite* "
        "(load_pretrained(..., padding=...); convert_state_dict(..., padding=...))")
  return padding


def convert_torch_state_dict(state_dict, source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """``efficientnet_lite_pytorch`` state dict -> flat ``{collection/path: array}`` for ``merge_pretrained``."""
  return apply_key_table(state_dict, KEY_TABLE, source_name=source_name)


def convert_state_dict(state_dict, *, source_name: str = 'checkpoint',
                       padding: str | None = None) -> dict[str, np.ndarray]:
  """A state dict in either layout (told apart by its stem's name) -> flat ``{collection/path: array}``, for the
  network ``checkpoint_padding(state_dict, padding)`` decides (an undecidable timm file is a ValueError); build the
  module with that padding."""
  checkpoint_padding(state_dict, padding, source_name=source_name)
  if choose_layout(state_dict, LAYOUTS, family='EfficientNet-Lite', source_name=source_name) == \
      'efficientnet_lite_pytorch':
    return convert_torch_state_dict(state_dict, source_name=source_name)
  return apply_key_table(state_dict, timm_key_table(state_dict), source_name=source_name)


# ---------------------------------------------------------------------------------------------------------------
# Export to timm (``Family.to_timm``): ``timm_key_table`` read backwards, one row per weight.

# Our variant -> timm's name of the same width and depth multipliers; padding 'same' adds timm's 'tf_' prefix.
TIMM_NAMES = {'efficientnet-lite0': 'efficientnet_lite0', 'efficientnet-lite1': 'efficientnet_lite1',
              'efficientnet-lite2': 'efficientnet_lite2', 'efficientnet-lite3': 'efficientnet_lite3',
              'efficientnet-lite4': 'efficientnet_lite4'}


def timm_export_table(width: float, depth: float) -> list[KeyRow]:
  """Rows for the network of these multipliers: our flat ``block_{i}`` -> timm's per-stage ``blocks.{S}.{I}``. A
  block without expansion (ratio 1) is timm's depthwise-separable block (``conv_dw``, then ``conv_pw`` projects);
  the others are inverted residuals (``conv_pw`` expands, ``conv_dw``, ``conv_pwl`` projects)."""
  rows: list[KeyRow] = [
      (r'params/backbone/stem_conv/kernel', 'conv_stem.weight', torch_conv_weight),
      *batchnorm_export_rows(r'stem_bn', 'bn1'),
      (r'params/backbone/top_conv/kernel', 'conv_head.weight', torch_conv_weight),
      *batchnorm_export_rows(r'top_bn', 'bn2'),
      (r'params/head/kernel', 'classifier.weight', torch_linear_weight),
      (r'params/head/bias', 'classifier.bias', None),
  ]
  positions = [(stage, index) for stage, repeats in enumerate(stage_repeats(depth)) for index in range(repeats)]
  for i, ((stage, index), (_, _, expand, _, _)) in enumerate(zip(positions, block_specs(width, depth))):
    if expand == 1:
      parts = [('dw', 'conv_dw', 'bn1'), ('project', 'conv_pw', 'bn2')]
    else:
      parts = [('expand', 'conv_pw', 'bn1'), ('dw', 'conv_dw', 'bn2'), ('project', 'conv_pwl', 'bn3')]
    for ours, conv, bn in parts:
      rows.append((f'params/backbone/block_{i}/{ours}_conv/kernel', f'blocks.{stage}.{index}.{conv}.weight',
                   torch_conv_weight))
      rows += batchnorm_export_rows(f'block_{i}/{ours}_bn', f'blocks.{stage}.{index}.{bn}')
  return rows


def timm_model(cfg) -> str:
  """timm's name for ``config.model``'s network: ``tf_efficientnet_lite{n}`` for padding 'same' (TF "SAME", eps
  1e-3), ``efficientnet_lite{n}`` for 'symmetric' (k//2, eps 1e-5). timm fixes the multipliers by the name, so
  ``config.model.width``/``depth`` overrides must be another variant's pair."""
  variant = VARIANTS[cfg.name]
  padding = check_padding(cfg.get('padding') or 'same')
  width, depth = cfg.get('width') or variant['width'], cfg.get('depth') or variant['depth']
  for ours, v in VARIANTS.items():
    if (v['width'], v['depth']) == (width, depth):
      return ('tf_' if padding == 'same' else '') + TIMM_NAMES[ours]
  pairs = ', '.join(f"{n} ({v['width']}, {v['depth']})" for n, v in VARIANTS.items())
  raise ValueError(f'config.model.width={cfg.get("width")}, config.model.depth={cfg.get("depth")}: timm builds '
                   f'EfficientNet-Lite only at the (width, depth) multipliers its names give ({pairs}); {cfg.name} '
                   f'at ({width}, {depth}) has no timm equivalent')


def to_timm(flat, *, cfg, num_classes: int) -> tuple[str, dict, dict]:
  """An EfficientNet-Lite classifier's variables -> ``(timm name, create_model kwargs, timm state dict)``; the head
  is timm's ``classifier``."""
  name = timm_model(cfg)
  backbone = build_backbone(cfg, jnp.float32)
  state = timm_state_dict(flat, timm_export_table(backbone.width, backbone.depth), what=f'{cfg.name} -> timm {name}',
                          model_shapes=classifier_shapes(backbone, num_classes))
  return name, timm_input_overlay(cfg), with_batch_counters(state)


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> EfficientNetLite:
  variant = VARIANTS[cfg.name]
  return EfficientNetLite(width=cfg.get('width') or variant['width'], depth=cfg.get('depth') or variant['depth'],
                          drop_path=cfg.get('drop_path', 0.0), bn_momentum=cfg.get('bn_momentum', 0.99),
                          padding=cfg.get('padding') or 'same', dtype=dtype)


def layer_regexes(backbone: EfficientNetLite) -> list:
  n = len(block_specs(backbone.width, backbone.depth))
  return [(r'backbone/stem_.*', 0), (r'backbone/block_(\d+)/.*', 'group+1'), (r'backbone/top_.*', n + 1)]


def convert(state, *, cfg, hf_config, source_name) -> dict:
  """Also settles ``config.model.padding``: the network the checkpoint holds (``checkpoint_padding``). timm's own
  ``efficientnet_lite*`` weights (``efficientnet_lite0.ra_in1k``) were trained on ImageNet mean/std inputs, not the
  TF models' [-1, 1], so for them an 'auto' ``config.model.input_norm`` becomes 'imagenet'."""
  cfg.padding = checkpoint_padding(state, cfg.get('padding'), source_name=source_name)
  if cfg.padding == 'symmetric' and cfg.get('input_norm') in (None, 'auto'):
    cfg.input_norm = 'imagenet'
  return convert_state_dict(state, source_name=source_name, padding=cfg.padding)


FAMILY = Family(
    name='efficientnet_lite', inputs='image', variants=VARIANTS, backbone=build_backbone, convert=convert,
    layer_regexes=layer_regexes, example_batch=image_example, to_timm=to_timm,
    input_norm=INCEPTION_NORMALIZATION,   # [-1, 1], as the TF "lite" models were trained
    cpu_library_fusions=('reduce',))   # XLA's convolutions, YNNPACK's reductions (layers.compiler_options)
