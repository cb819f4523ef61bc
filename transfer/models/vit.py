"""Vision Transformer (ViT) in Flax, plus key tables for timm's state dicts and Google's ``.npz`` files.

The network of Dosovitskiy et al. as timm's ``vit_*`` and Google's vit_jax / big_vision build it: a p x p patch
embedding conv, learned position embeddings, pre-LayerNorm encoder blocks (LayerNorm eps 1e-6, multi-head
self-attention, an MLP with exact GELU), a final LayerNorm, then the class token ('cls' pooling) or the mean of
the patch tokens ('mean' pooling, a model without class token: big_vision's 'gap', timm's ``class_token=False,
global_pool='avg', fc_norm=False``). Inputs are NHWC images scaled to [-1, 1].

Position embeddings are stored for ``posemb_grid``: a loaded checkpoint's own grid (``checkpoint_grid``), else the
variant's native resolution / patch. An input of another size is run with them resampled bilinearly to its grid
(the class token's entry kept apart), once per call, as timm does when it loads a checkpoint into a model of
another size; so a 384 px checkpoint fine-tuned at 224 px is interpolated once, never twice. A config that asks
for another stored grid (``config.model.posemb_grid``) has the checkpoint resampled once, at load
(``fit_checkpoint``). Attention parameters use Google's layout (separate
query/key/value kernels of shape (D, heads, D / heads), an output kernel (heads, D / heads, D)); timm's fused
``qkv`` is split on conversion, and fused again by ``to_timm``, which writes a classifier back out as timm's
``vit_*`` (``TIMM_EXPORT_TABLE``).
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transfer.convert import ConversionError, KeyRow, apply_key_table
from transfer.models.family import (INCEPTION_NORMALIZATION, Family, classifier_shapes, image_example,
                                    refuse_override, timm_input_overlay, timm_state_dict, torch_conv_weight,
                                    torch_linear_weight)
from transfer.models.keys import choose_layout, torch_conv_kernel, torch_linear_kernel
from transfer.models.layers import dense_dot_general, gradient_barrier, remat

# name -> patch size, width, depth, heads, MLP width, native resolution (ViT paper sizes; DeiT's Ti; a test size).
VARIANTS = {
    'vit-test8': dict(patch=8, dim=64, depth=2, heads=2, mlp_dim=256, resolution=32),   # tests only
    'vit-ti16': dict(patch=16, dim=192, depth=12, heads=3, mlp_dim=768, resolution=224),
    'vit-s16': dict(patch=16, dim=384, depth=12, heads=6, mlp_dim=1536, resolution=224),
    'vit-s32': dict(patch=32, dim=384, depth=12, heads=6, mlp_dim=1536, resolution=224),
    'vit-b16': dict(patch=16, dim=768, depth=12, heads=12, mlp_dim=3072, resolution=224),
    'vit-b32': dict(patch=32, dim=768, depth=12, heads=12, mlp_dim=3072, resolution=224),
    'vit-l16': dict(patch=16, dim=1024, depth=24, heads=16, mlp_dim=4096, resolution=224),
    'vit-l32': dict(patch=32, dim=1024, depth=24, heads=16, mlp_dim=4096, resolution=224),
}
POOLINGS = ('cls', 'mean')
LAYERNORM_EPS = 1e-6


def resample_posemb(posemb, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int):
  """(1, num_prefix + old_h * old_w, D) position embeddings -> (1, num_prefix + new_h * new_w, D).

  The first ``num_prefix`` entries (the class token's) are kept as they are; the grid is resized bilinearly with
  half-pixel centres and no antialiasing: timm's ``resample_abs_pos_embed(..., interpolation='bilinear',
  antialias=False)``, what timm's loader of Google's ViT checkpoints uses."""
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return posemb
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  dim = grid.shape[-1]
  grid = jnp.reshape(jnp.asarray(grid, jnp.float32), (1, *old_grid, dim))
  grid = jax.image.resize(grid, (1, *new_grid, dim), method='bilinear', antialias=False)
  grid = jnp.reshape(grid, (1, new_grid[0] * new_grid[1], dim)).astype(posemb.dtype)
  return jnp.concatenate([jnp.asarray(prefix), grid], axis=1)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda feats, name: nn.Dense(feats, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=nn.initializers.xavier_uniform(),
                                         dot_general=dense_dot_general, name=name)
    return dense(x.shape[-1], 'fc2')(nn.gelu(dense(self.mlp_dim, 'fc1')(x), approximate=False))


class EncoderBlock(nn.Module):
  """x + attention(LN(x)), then x + MLP(LN(x)); each residual branch dropped per example in training."""
  heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.LayerNorm(LAYERNORM_EPS, use_fast_variance=False, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    x = gradient_barrier(x)   # the residual stream's gradient, materialised per block (layers.gradient_barrier)
    y = norm('norm1')(x)
    y = nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, param_dtype=jnp.float32,
                                        kernel_init=nn.initializers.xavier_uniform(),
                                        qkv_dot_general=dense_dot_general, out_dot_general=dense_dot_general,
                                        name='attn')(y, y)
    x = gradient_barrier(x + drop(y))
    return x + drop(MlpBlock(self.mlp_dim, dtype=self.dtype, name='mlp')(norm('norm2')(x)))


class ViT(nn.Module):
  """Backbone only: (N, H, W, 3) images in [-1, 1] -> (N, dim) features after the final LayerNorm.

  H and W should be multiples of ``patch`` (a remainder is cropped by the patch conv, as in timm). Block ``i`` of
  ``n`` uses stochastic depth ``drop_path * i / (n - 1)`` (timm's linear rule). ``remat``: ``config.model.remat``
  for the blocks (``layers.remat``).
  """
  patch: int
  dim: int
  depth: int
  heads: int
  mlp_dim: int
  posemb_grid: tuple[int, int]
  pooling: str = 'cls'
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.pooling not in POOLINGS:
      raise ValueError(f"config.model.pooling: {self.pooling!r}; a ViT pools by one of {POOLINGS}")
    x = nn.Conv(self.dim, (self.patch, self.patch), (self.patch, self.patch), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='patch_embed')(jnp.asarray(x, self.dtype))
    n, grid = x.shape[0], x.shape[1:3]
    x = x.reshape(n, grid[0] * grid[1], self.dim)
    prefix = 1 if self.pooling == 'cls' else 0
    posemb = self.param('pos_embedding', nn.initializers.normal(0.02),
                        (1, prefix + self.posemb_grid[0] * self.posemb_grid[1], self.dim), jnp.float32)
    if prefix:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.dim), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.dim)), x], axis=1)
    x = x + resample_posemb(posemb, self.posemb_grid, grid, prefix).astype(self.dtype)
    block = remat(EncoderBlock, self.remat, static_argnums=(2,))   # train
    for i in range(self.depth):
      x = block(self.heads, self.mlp_dim, drop_path=self.drop_path * i / max(self.depth - 1, 1), dtype=self.dtype,
                name=f'block_{i}')(x, train)
    x = nn.LayerNorm(LAYERNORM_EPS, use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32,
                     name='encoder_norm')(x)
    return x[:, 0] if prefix else jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)


def from_variant(name: str, *, pooling: str = 'cls', drop_path: float = 0.0, posemb_grid: int | None = None,
                 dtype=jnp.float32, remat: str = 'none') -> ViT:
  """The registry's ``name``; ``posemb_grid``: the side of the stored position-embedding table (default: the
  variant's native resolution / patch; a loaded checkpoint's own grid, so it is never resampled at load)."""
  v = VARIANTS[name]
  grid = posemb_grid or v['resolution'] // v['patch']
  if grid < 1:
    raise ValueError(f"config.model.posemb_grid={posemb_grid}: must be a positive number of patches per side")
  return ViT(v['patch'], v['dim'], v['depth'], v['heads'], v['mlp_dim'], (grid, grid), pooling=pooling,
             drop_path=drop_path, dtype=dtype, remat=remat)


def checkpoint_grid(flat: dict, *, source_name: str) -> int:
  """The side of a converted checkpoint's position-embedding grid (its class-token entry, if any, set apart)."""
  have = flat[_B + 'pos_embedding']
  prefix = 1 if _B + 'cls' in flat else 0
  if prefix and math.isqrt(have.shape[1]) ** 2 == have.shape[1]:
    raise ConversionError(f'{source_name}: position embeddings {_B}pos_embedding {have.shape} have no class-token '
                          'entry but the checkpoint has a class token (a big_vision \'tok\' checkpoint?); not '
                          'supported')
  return _square_grid(have.shape[1] - prefix, f'{source_name}: {_B}pos_embedding {tuple(have.shape)}')[0]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion.

_B = 'params/backbone/'


def timm_key_table(num_heads: int) -> list[KeyRow]:
  """Rows for timm's ``VisionTransformer`` state dict after ``split_qkv`` (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.N.{norm1,attn.q/k/v,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``);
  the attention kernels are reshaped per head, hence ``num_heads``."""
  def heads_in(w):    # torch (out = heads * hd, in) -> (in, heads, hd); a bias (heads * hd,) -> (heads, hd)
    w = np.transpose(w) if w.ndim == 2 else w
    return w.reshape(*w.shape[:-1], num_heads, w.shape[-1] // num_heads)

  def heads_out(w):   # torch (out, in = heads * hd) -> (heads, hd, out)
    return np.transpose(w).reshape(num_heads, w.shape[1] // num_heads, w.shape[0])

  blk = r'blocks\.(\d+)\.'
  return [
      (r'cls_token', _B + 'cls', None),
      (r'pos_embed', _B + 'pos_embedding', None),
      (r'patch_embed\.proj\.weight', _B + 'patch_embed/kernel', torch_conv_kernel),
      (r'patch_embed\.proj\.bias', _B + 'patch_embed/bias', None),
      (blk + r'norm(\d)\.weight', _B + r'block_\1/norm\2/scale', None),
      (blk + r'norm(\d)\.bias', _B + r'block_\1/norm\2/bias', None),
      *[(blk + rf'attn\.{short}\.weight', _B + rf'block_\1/attn/{full}/kernel', heads_in)
        for short, full in (('q', 'query'), ('k', 'key'), ('v', 'value'))],
      *[(blk + rf'attn\.{short}\.bias', _B + rf'block_\1/attn/{full}/bias', heads_in)
        for short, full in (('q', 'query'), ('k', 'key'), ('v', 'value'))],
      (blk + r'attn\.proj\.weight', _B + r'block_\1/attn/out/kernel', heads_out),
      (blk + r'attn\.proj\.bias', _B + r'block_\1/attn/out/bias', None),
      (blk + r'mlp\.fc(\d)\.weight', _B + r'block_\1/mlp/fc\2/kernel', torch_linear_kernel),
      (blk + r'mlp\.fc(\d)\.bias', _B + r'block_\1/mlp/fc\2/bias', None),
      (r'norm\.weight', _B + 'encoder_norm/scale', None),
      (r'norm\.bias', _B + 'encoder_norm/bias', None),
      (r'head\.weight', 'params/head/kernel', torch_linear_kernel),
      (r'head\.bias', 'params/head/bias', None),
  ]


def split_qkv(state_dict, source_name: str) -> dict:
  """timm's fused ``blocks.N.attn.qkv.{weight,bias}`` (query, key, value stacked on the output axis) -> three
  entries ``blocks.N.attn.{q,k,v}.*``; everything else as it is."""
  out = {}
  for key, value in state_dict.items():
    m = re.fullmatch(r'(blocks\.\d+\.attn\.)qkv\.(weight|bias)', key)
    if not m:
      out[key] = value
      continue
    value = np.asarray(value)
    if value.shape[0] % 3:
      raise ConversionError(f'{source_name}: {key} has {value.shape[0]} rows, not query, key and value stacked')
    for part, short in zip(np.split(value, 3, axis=0), 'qkv'):
      out[f'{m.group(1)}{short}.{m.group(2)}'] = part
  return out


_G = r'(?:params/|opt/target/)?'   # big_vision and optimizer-state files nest the parameters under a prefix
_ENC = _G + r'Transformer/encoderblock_(\d+)/'
# vit_jax names its block's layers LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; big_vision
# LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0: one row covers both (a file mixing them maps
# two arrays to one variable, which is an error).
NPZ_KEY_TABLE: list[KeyRow] = [
    (_G + r'embedding/(kernel|bias)', _B + r'patch_embed/\1', None),
    (_G + r'cls', _B + 'cls', None),
    (_G + r'(?:Transformer/posembed_input/)?pos_embedding', _B + 'pos_embedding', None),
    (_ENC + r'LayerNorm_0/(scale|bias)', _B + r'block_\1/norm1/\2', None),
    (_ENC + r'LayerNorm_[12]/(scale|bias)', _B + r'block_\1/norm2/\2', None),
    (_ENC + r'MultiHeadDotProductAttention_[01]/(query|key|value|out)/(kernel|bias)', _B + r'block_\1/attn/\2/\3',
     None),
    (_ENC + r'MlpBlock_[03]/Dense_0/(kernel|bias)', _B + r'block_\1/mlp/fc1/\2', None),
    (_ENC + r'MlpBlock_[03]/Dense_1/(kernel|bias)', _B + r'block_\1/mlp/fc2/\2', None),
    (_G + r'Transformer/encoder_norm/(scale|bias)', _B + r'encoder_norm/\1', None),
    (_G + r'head/(kernel|bias)', r'params/head/\1', None),
]
LAYOUTS = {'Google ViT .npz': _G + r'embedding/kernel', 'timm state dict': r'patch_embed\.proj\.weight'}


def convert_state_dict(state_dict, *, num_heads: int, source_name: str = 'checkpoint') -> dict:
  """A ViT checkpoint (timm's state dict or Google's npz arrays) -> flat ``{collection/path: array}``.

  Position embeddings keep the checkpoint's grid; ``fit_checkpoint`` resamples them to a model's."""
  layout = choose_layout(state_dict, LAYOUTS, family='ViT', source_name=source_name)
  if layout == 'Google ViT .npz':
    return apply_key_table(state_dict, NPZ_KEY_TABLE, source_name=source_name)
  return apply_key_table(split_qkv(state_dict, source_name), timm_key_table(num_heads), source_name=source_name)


def _square_grid(tokens: int, what: str) -> tuple[int, int]:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ConversionError(f'{what}: {tokens} patch positions are not a square grid')
  return side, side


def fit_checkpoint(flat: dict, model_shapes: dict, *, source_name: str) -> dict:
  """``flat`` with its position embeddings resampled to the grid of ``model_shapes`` (flat path -> shape).

  A model with a class token keeps the checkpoint's class-token entry; a checkpoint whose embeddings hold a square
  number of positions while the model has a class token has no such entry (big_vision's 'tok' layout adds them
  before the class token is prepended), which this model cannot represent: an error."""
  key = _B + 'pos_embedding'
  if key not in flat or key not in model_shapes or tuple(flat[key].shape) == tuple(model_shapes[key]):
    return flat
  prefix = 1 if _B + 'cls' in model_shapes else 0
  have, want = flat[key], tuple(model_shapes[key])
  if have.ndim != 3 or have.shape[0] != 1 or have.shape[2] != want[2]:
    raise ConversionError(f'{source_name}: position embeddings {key} of shape {have.shape} do not fit the model\'s '
                          f'{want}')
  if prefix and math.isqrt(have.shape[1]) ** 2 == have.shape[1]:
    raise ConversionError(f'{source_name}: position embeddings {key} {have.shape} have no class-token entry but '
                          f'the model has a class token (a big_vision \'tok\' checkpoint?); not supported')
  old = _square_grid(have.shape[1] - prefix, f'{source_name}: {key} {have.shape}')
  new = _square_grid(want[1] - prefix, f'model {key} {want}')
  return {**flat, key: np.asarray(resample_posemb(have, old, new, prefix))}


# ---------------------------------------------------------------------------------------------------------------
# Export to timm (``Family.to_timm``): ``timm_key_table`` read backwards, then query/key/value fused into timm's qkv.

# Our variant -> timm's name and the create_model kwargs that give its sizes. vit-test8 has no timm name: it is
# timm's ViT-Ti/16 builder given the test size's patch, width, depth and heads (MLP ratio 4 as every variant here).
TIMM_MODELS = {
    'vit-test8': ('vit_tiny_patch16_224', dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    'vit-ti16': ('vit_tiny_patch16_224', {}),
    'vit-s16': ('vit_small_patch16_224', {}),
    'vit-s32': ('vit_small_patch32_224', {}),
    'vit-b16': ('vit_base_patch16_224', {}),
    'vit-b32': ('vit_base_patch32_224', {}),
    'vit-l16': ('vit_large_patch16_224', {}),
    'vit-l32': ('vit_large_patch32_224', {}),
}


def _heads_joined_in(w):
  """A query/key/value kernel (D, heads, hd) -> torch (heads * hd, D); its bias (heads, hd) -> (heads * hd,)."""
  w = w.reshape(*w.shape[:-2], w.shape[-2] * w.shape[-1])
  return np.transpose(w) if w.ndim == 2 else w


def _heads_joined_out(w):
  """The output kernel (heads, hd, D) -> torch (D, heads * hd)."""
  return np.transpose(w.reshape(w.shape[0] * w.shape[1], w.shape[2]))


_OUR_BLOCK = _B + r'block_(\d+)/'
TIMM_EXPORT_TABLE: list[KeyRow] = [
    (_B + 'cls', 'cls_token', None),
    (_B + 'pos_embedding', 'pos_embed', None),
    (_B + 'patch_embed/kernel', 'patch_embed.proj.weight', torch_conv_weight),
    (_B + 'patch_embed/bias', 'patch_embed.proj.bias', None),
    (_OUR_BLOCK + r'norm(\d)/scale', r'blocks.\1.norm\2.weight', None),
    (_OUR_BLOCK + r'norm(\d)/bias', r'blocks.\1.norm\2.bias', None),
    *[(_OUR_BLOCK + f'attn/{full}/kernel', rf'blocks.\1.attn.{short}.weight', _heads_joined_in)
      for short, full in (('q', 'query'), ('k', 'key'), ('v', 'value'))],
    *[(_OUR_BLOCK + f'attn/{full}/bias', rf'blocks.\1.attn.{short}.bias', _heads_joined_in)
      for short, full in (('q', 'query'), ('k', 'key'), ('v', 'value'))],
    (_OUR_BLOCK + r'attn/out/kernel', r'blocks.\1.attn.proj.weight', _heads_joined_out),
    (_OUR_BLOCK + r'attn/out/bias', r'blocks.\1.attn.proj.bias', None),
    (_OUR_BLOCK + r'mlp/fc(\d)/kernel', r'blocks.\1.mlp.fc\2.weight', torch_linear_weight),
    (_OUR_BLOCK + r'mlp/fc(\d)/bias', r'blocks.\1.mlp.fc\2.bias', None),
    (_B + 'encoder_norm/scale', 'norm.weight', None),
    (_B + 'encoder_norm/bias', 'norm.bias', None),
    (r'params/head/kernel', 'head.weight', torch_linear_weight),
    (r'params/head/bias', 'head.bias', None),
]


def fuse_qkv(state: dict) -> dict:
  """``blocks.N.attn.{q,k,v}.*`` -> timm's ``blocks.N.attn.qkv.*``, query, key and value stacked on the output
  axis: the inverse of ``split_qkv``."""
  out, parts = {}, {}
  for key, value in state.items():
    m = re.fullmatch(r'(blocks\.\d+\.attn\.)([qkv])\.(weight|bias)', key)
    if m:
      parts.setdefault(f'{m.group(1)}qkv.{m.group(3)}', {})[m.group(2)] = value
    else:
      out[key] = value
  for key, qkv in parts.items():
    if sorted(qkv) != ['k', 'q', 'v']:
      raise ConversionError(f'{key}: needs query, key and value, got only {sorted(qkv)}')
    out[key] = np.concatenate([qkv['q'], qkv['k'], qkv['v']], axis=0)
  return out


def timm_model(cfg) -> tuple[str, dict]:
  """timm's name and ``create_model`` kwargs for ``config.model``'s ViT. timm's model is built for the stored
  position grid (``img_size`` = grid * patch), where the table needs no resampling; timm then takes only that input
  size (this model resamples the table bilinearly for other sizes, which timm's ``dynamic_img_size`` would do
  bicubically, so it is not turned on). 'mean' pooling is timm's ``class_token=False, global_pool='avg',
  fc_norm=False``."""
  name, kwargs = TIMM_MODELS[cfg.name]
  v = VARIANTS[cfg.name]
  pooling = cfg.get('pooling', 'cls')
  if pooling not in POOLINGS:
    raise ValueError(f"config.model.pooling: {pooling!r}; a ViT pools by one of {POOLINGS}")
  if pooling == 'mean':
    kwargs = {**kwargs, 'class_token': False, 'global_pool': 'avg', 'fc_norm': False}
  grid = cfg.get('posemb_grid') or v['resolution'] // v['patch']
  return name, {**kwargs, 'img_size': grid * v['patch']}


def to_timm(flat, *, cfg, num_classes: int) -> tuple[str, dict, dict]:
  """A ViT classifier's variables -> ``(timm name, create_model kwargs, timm state dict)``; the head is timm's
  ``head``."""
  name, kwargs = timm_model(cfg)
  state = timm_state_dict(flat, TIMM_EXPORT_TABLE, what=f'{cfg.name} -> timm {name}',
                          model_shapes=classifier_shapes(build_backbone(cfg, jnp.float32), num_classes))
  size = kwargs['img_size']
  return name, {**kwargs, **timm_input_overlay(cfg, input_size=(3, size, size))}, fuse_qkv(state)


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> ViT:
  refuse_override(cfg, 'width', f"a ViT's width comes from its name ({cfg.name}); 'vit-test8' is the small test size")
  refuse_override(cfg, 'depth', f"a ViT's depth comes from its name ({cfg.name})")
  return from_variant(cfg.name, pooling=cfg.get('pooling', 'cls'), drop_path=cfg.get('drop_path', 0.0),
                      posemb_grid=cfg.get('posemb_grid'), dtype=dtype, remat=cfg.get('remat', 'none'))


def layer_regexes(backbone: ViT) -> list:
  return [(r'backbone/(patch_embed/.*|cls|pos_embedding)', 0), (r'backbone/block_(\d+)/.*', 'group+1'),
          (r'backbone/encoder_norm/.*', backbone.depth + 1)]


def adopt_checkpoint(cfg, flat: dict, *, source_name: str) -> None:
  """A ViT checkpoint says how it pools (a class token, or none: mean pooling) and the grid of its position table.
  ``cfg`` (``config.model``) takes both where unset; a pooling that disagrees is an error naming the setting (not
  the shape mismatches it would cause). The table stays at the checkpoint's grid unless ``cfg.posemb_grid`` says
  otherwise (then ``fit_checkpoint`` resamples it once at load); each call resamples it to the input's grid."""
  pooling = 'cls' if _B + 'cls' in flat else 'mean'
  if cfg.get('pooling') is None:
    cfg.pooling = pooling
  elif cfg.pooling != pooling:
    raise ValueError(f"config.model.pooling={cfg.pooling!r}, but {source_name} " + (
        "has a class token: set config.model.pooling='cls'" if pooling == 'cls' else
        "has no class token (it was trained with mean pooling): set config.model.pooling='mean'"))
  if cfg.get('posemb_grid') is None:
    cfg.posemb_grid = checkpoint_grid(flat, source_name=source_name)


def convert(state, *, cfg, hf_config, source_name) -> dict:
  flat = convert_state_dict(state, num_heads=VARIANTS[cfg.name]['heads'], source_name=source_name)
  adopt_checkpoint(cfg, flat, source_name=source_name)
  return flat


# Tensor parallelism (config.sharding_rules value 'tensor', transfer/sharding.py): the heads of q/k/v (kernels
# (D, heads, head_dim)) and the MLP's fc1 units split over 'tensor'; attn/out and fc2 over their input side.
TENSOR_PARALLEL = [
    (r'backbone/block_\d+/attn/(query|key|value)/kernel', ('fsdp', 'tensor', None)),
    (r'backbone/block_\d+/attn/(query|key|value)/bias', ('tensor', None)),
    (r'backbone/block_\d+/attn/out/kernel', ('tensor', None, 'fsdp')),
    (r'backbone/block_\d+/mlp/fc1/kernel', ('fsdp', 'tensor')),
    (r'backbone/block_\d+/mlp/fc1/bias', ('tensor',)),
    (r'backbone/block_\d+/mlp/fc2/kernel', ('tensor', 'fsdp')),
]


FAMILY = Family(
    name='vit', inputs='image', variants=VARIANTS, backbone=build_backbone,
    convert=convert,
    layer_regexes=layer_regexes, tensor_parallel=TENSOR_PARALLEL, example_batch=image_example,
    input_norm=INCEPTION_NORMALIZATION,   # [-1, 1], as Google's ViTs were trained (timm's augreg: mean = std = 0.5)
    fit_checkpoint=fit_checkpoint, to_timm=to_timm,
    cpu_library_fusions=())   # YNNPACK would take each attention core as one slow op (layers.compiler_options)
