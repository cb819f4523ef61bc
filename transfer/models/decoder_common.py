"""Pieces shared by the causal decoders (GPT-2, the Llama family): masks, attention over a fixed-size KV cache,
RoPE, the LM head, and reading ``config.json`` fields with errors that name them.

Masks and positions. A batch is ``input_ids`` and a 0/1 ``attention_mask`` of the same (N, L) shape; padding may
sit on either side. A query attends to keys at earlier-or-equal slots whose mask is 1. Positions default to the
number of real tokens before a token (``cumsum(mask) - 1``, clipped at 0), so a left-padded row has the same
positions, hence the same logits at its real tokens, as the unpadded row. Scores of disallowed keys are replaced
by ``finfo(float32).min``, so a query with no allowed key (a padding query at the start of a left-padded row) gets
a uniform, finite softmax instead of NaN; its output is meaningless and nothing real attends to it.

The KV cache is a plain pytree, fixed-size so one compiled decode step serves every position:
``{'index': () int32, 'mask': (N, max_len) bool, 'layers': ({'key': (N, max_len, kv_heads, head_dim),
'value': ...}, ...)}``. A call with ``cache`` writes its L keys/values and mask at ``index`` and returns the cache
with ``index + L``. The caller sizes the cache: a write past ``max_len`` would be clamped by
``lax.dynamic_update_slice`` (JAX cannot raise on a traced index), so ``transfer.generate`` allocates
``prompt length + max_new_tokens`` slots.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transfer.models import lora
from transfer.models.layers import dense_dot_general

# HF activation names (transformers.activations.ACT2FN) -> functions, for the ones these decoders accept.
# 'gelu' is the exact erf form; 'gelu_new' and 'gelu_pytorch_tanh' are the same tanh approximation.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}
INIT = nn.initializers.normal(0.02)  # HF's initializer_range default, for layers trained from scratch


def dense(features: int, name: str, dtype, *, bias: bool = True) -> nn.Dense:
  """A decoder's projection: float32 parameters, computed in ``dtype``, HF's initialisation from scratch."""
  return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=INIT,
                  dot_general=dense_dot_general, name=name)
_REQUIRED = object()


class FieldReader:
  """Reads typed fields of a ``config.json`` dict; every error is a ValueError naming the file and the field."""

  def __init__(self, config: Mapping[str, Any], source_name: str):
    self.config, self.source_name = config, source_name

  def error(self, field: str, why: str) -> ValueError:
    return ValueError(f"{self.source_name}: field {field!r} {why}")

  def get(self, field: str, kind: type, default: Any = _REQUIRED, *, ok=lambda v: True, why: str = 'is out of range',
          none_ok: bool = False):
    """``config[field]`` checked to be of ``kind`` (int, float, bool, str, dict, list) and to pass ``ok``; ``default``
    when the field is absent (absent and no default: an error). ``none_ok``: an explicit null is returned as None."""
    if field not in self.config:
      if default is _REQUIRED:
        raise self.error(field, 'is missing')
      return default
    value = self.config[field]
    if value is None and none_ok:
      return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
      raise self.error(field, f'must be an integer, got {value!r}')
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise self.error(field, f'must be a number, got {value!r}')
    if kind in (bool, str, dict, list) and not isinstance(value, kind):
      raise self.error(field, f'must be a {kind.__name__}, got {value!r}')
    if not ok(value):
      raise self.error(field, f'{why}: {value!r}')
    return float(value) if kind is float else value

  def token_ids(self, field: str) -> tuple[int, ...]:
    """``eos_token_id`` and the like: an id, a list of ids, or null -> a tuple (empty when null or absent)."""
    value = self.config.get(field)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
      raise self.error(field, f'must be a token id, a list of them or null, got {value!r}')
    return tuple(values)


positive = lambda v: v > 0
probability = lambda v: 0 <= v < 1


# ---------------------------------------------------------------------------------------------------------------
# Positions, masks and the cache.

def default_positions(attention_mask: jnp.ndarray, cache: Mapping | None) -> jnp.ndarray:
  """(N, L) int32: real tokens already in the cache plus ``cumsum(mask) - 1`` over this call, clipped at 0."""
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  before = 0 if cache is None else cache['mask'].astype(jnp.int32).sum(axis=1, keepdims=True)
  return jnp.maximum(before + jnp.cumsum(mask, axis=1) - 1, 0)


def allowed_keys(attention_mask: jnp.ndarray, cache: Mapping | None) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """``(allowed (N, L, T) bool, the cache's new key mask or None)``: causal over slots and not padding.

  Without a cache the keys are this call's L tokens (T = L); with one they are the cache's T slots, this call's
  tokens written at ``cache['index']``."""
  mask = jnp.asarray(attention_mask).astype(bool)
  length = mask.shape[1]
  if cache is None:
    slots = jnp.arange(length)
    return (slots[None, :] <= slots[:, None])[None] & mask[:, None, :], None
  key_mask = jax.lax.dynamic_update_slice(cache['mask'], mask, (0, cache['index']))
  query_slots = cache['index'] + jnp.arange(length)
  key_slots = jnp.arange(key_mask.shape[1])
  return (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :], key_mask


def check_length(length: int, cache: Mapping | None, max_positions: int, what: str) -> None:
  """Static shape checks: a cacheless call must fit the learned context, a cached one must fit the cache."""
  if cache is None and length > max_positions:
    raise ValueError(f"sequence length {length} is longer than the model's context ({what} = {max_positions})")
  if cache is not None and length > cache['mask'].shape[1]:
    raise ValueError(f"{length} tokens do not fit a KV cache of {cache['mask'].shape[1]} slots")


def init_cache(batch: int, max_len: int, *, num_layers: int, kv_heads: int, head_dim: int, dtype) -> dict:
  """An empty cache (see the module docstring for its layout)."""
  zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
  return {'index': jnp.zeros((), jnp.int32), 'mask': jnp.zeros((batch, max_len), bool),
          'layers': tuple({'key': zeros(), 'value': zeros()} for _ in range(num_layers))}


def updated_cache(cache: Mapping | None, key_mask, length: int, layers: list) -> dict | None:
  """The cache after a call of ``length`` tokens: new key mask, per-layer keys/values, index moved on."""
  if cache is None:
    return None
  return {'index': cache['index'] + length, 'mask': key_mask, 'layers': tuple(layers)}


def write_layer_cache(layer_cache: Mapping | None, key, value, index):
  """``(keys, values, new layer cache)``: this call's (N, L, kv_heads, head_dim) keys/values alone without a
  cache, else written into the cache at ``index`` and the whole cache returned as keys/values."""
  if layer_cache is None:
    return key, value, None
  start = (0, index, 0, 0)
  keys = jax.lax.dynamic_update_slice(layer_cache['key'], key.astype(layer_cache['key'].dtype), start)
  values = jax.lax.dynamic_update_slice(layer_cache['value'], value.astype(layer_cache['value'].dtype), start)
  return keys, values, {'key': keys, 'value': values}


def attend(query, keys, values, allowed, *, scale: float, dropout: nn.Dropout, dtype) -> jnp.ndarray:
  """Grouped-query attention: query (N, L, heads, D), keys/values (N, T, kv_heads, D), allowed (N, L, T).

  Query head h reads kv head ``h // (heads // kv_heads)`` (HF's ``repeat_kv``). Scores and softmax in float32.
  Returns (N, L, heads * D)."""
  n, length, heads, head_dim = query.shape
  kv_heads = keys.shape[2]
  query = query.reshape(n, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum('nqkgd,ntkd->nkgqt', query.astype(jnp.float32), keys.astype(jnp.float32)) * scale
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(scores, axis=-1))
  out = jnp.einsum('nkgqt,ntkd->nqkgd', probs.astype(dtype), values.astype(dtype))
  return out.reshape(n, length, heads * head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (HF's non-interleaved "rotate_half" layout).

ROPE_TYPES = ('default', 'linear', 'llama3')


def rope_inverse_frequencies(head_dim: int, theta: float, rope_type: str = 'default', factor: float = 1.0,
                             low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                             original_max_positions: int = 8192) -> np.ndarray:
  """(head_dim // 2,) float32 inverse frequencies, as ``transformers.modeling_rope_utils`` computes them.

  'linear' divides every frequency by ``factor``; 'llama3' (Llama 3.1) divides the low frequencies (wavelength
  above ``original_max_positions / low_freq_factor``) by ``factor``, keeps the high ones (wavelength below
  ``original_max_positions / high_freq_factor``) and blends linearly in between."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if rope_type == 'linear':
    inv = inv / factor
  elif rope_type == 'llama3':
    wavelength = 2 * math.pi / inv
    low_wavelength = original_max_positions / low_freq_factor
    high_wavelength = original_max_positions / high_freq_factor
    scaled = np.where(wavelength > low_wavelength, inv / factor, inv)
    smooth = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    inv = np.where(medium, blended, scaled)
  elif rope_type != 'default':
    raise ValueError(f"unknown RoPE type {rope_type!r}; supported: {ROPE_TYPES}")
  return inv.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inverse_frequencies: np.ndarray) -> jnp.ndarray:
  """Rotates (N, L, heads, D) ``x`` by (N, L) ``positions``: pairs (i, i + D/2), angles in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies)   # (N, L, D/2)
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None].astype(x.dtype)
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None].astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


# ---------------------------------------------------------------------------------------------------------------
# The language model: a decoder backbone plus the next-token head.

def tied_logits(hidden: jnp.ndarray, embedding: jnp.ndarray) -> jnp.ndarray:
  """``hidden @ embedding.T`` accumulated and returned in float32."""
  return jnp.einsum('nld,vd->nlv', hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)


class CausalLM(nn.Module):
  """A decoder backbone and its LM head; ``apply(variables, batch)`` -> (N, L, vocab) float32 next-token logits.

  ``backbone(input_ids, attention_mask, *, positions, cache, train) -> (hidden, cache)`` must expose ``config``
  (``vocab_size``), ``attend(hidden)`` (logits through the tied input embedding) and ``init_cache``. Tied: the
  logits are ``hidden @ embedding.T`` and there is no head parameter; untied: a bias-free Dense ``lm_head``.
  ``batch`` may carry ``positions`` to override the mask-derived ones.
  """
  backbone: nn.Module
  tie_word_embeddings: bool
  adapters: tuple = ()   # LoRA: transfer.models.lora.targets(config.param_rules)

  def setup(self):
    if not self.tie_word_embeddings:
      self.lm_head = nn.Dense(self.backbone.config.vocab_size, use_bias=False, dtype=self.backbone.dtype,
                              param_dtype=jnp.float32, kernel_init=INIT)

  def __call__(self, batch, *, train: bool = False, backbone_train: bool | None = None):
    logits, _ = self.decode(batch['input_ids'], batch['attention_mask'], positions=batch.get('positions'),
                            train=train if backbone_train is None else backbone_train, adapter_train=train)
    return logits

  def decode(self, input_ids, attention_mask, *, positions=None, cache=None, train: bool = False,
             last_only: bool = False, adapter_train: bool | None = None):
    """``(logits (N, L or 1, vocab) float32, new cache)``; ``last_only`` computes the head at the last slot only
    (generation needs nothing else, and the vocabulary projection is the largest matmul). ``adapter_train``
    (default ``train``): LoRA dropout on, which follows the training step, not the backbone's mode."""
    with lora.adapting(self.adapters, train=train if adapter_train is None else adapter_train):
      hidden, cache = self.backbone(input_ids, attention_mask, positions=positions, cache=cache, train=train)
      if last_only:
        hidden = hidden[:, -1:]
      return self.logits(hidden), cache

  def logits(self, hidden):
    if self.tie_word_embeddings:
      return self.backbone.attend(hidden)
    return self.lm_head(hidden).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> dict:
    return self.backbone.init_cache(batch, max_len)


# ---------------------------------------------------------------------------------------------------------------
# Export and the family record: the same for every decoder, given its config class, model and key tables.

def to_hf_state_dict(flat_params: Mapping[str, np.ndarray], config, hf_key_table, *,
                     source_name: str = 'params') -> dict[str, np.ndarray]:
  """Flat ``{params/...: array}`` (a ``convert_hf_state_dict`` output) -> the Hugging Face state dict, through the
  family's reversed key table; a separate LM head must agree with ``tie_word_embeddings``."""
  from transfer.convert import ConversionError, apply_key_table
  has_head = 'params/lm_head/kernel' in flat_params
  if has_head == config.tie_word_embeddings:
    raise ConversionError(f"{source_name}: tie_word_embeddings is {str(config.tie_word_embeddings).lower()} but the "
                          f"params {'hold' if has_head else 'have no'} a separate lm_head/kernel")
  return apply_key_table(flat_params, hf_key_table(config), source_name=source_name)


def decoder_family(name: str, *, config_cls, model_cls, causal_lm, convert_hf_state_dict, hf_key_table,
                   hf_architectures: Mapping[str, str], layer_regexes, model_types: tuple[str, ...],
                   tensor_parallel=()):
  """The ``Family`` record of a decoder family (``transfer/models/family.py``): its backbone, its causal LM, its
  conversion from and to Hugging Face checkpoints, all from a ``config.json`` read by ``config_cls.from_hf``."""
  from transfer.models.family import Family, hf_architecture, text_example

  def config_of(cfg):
    config, path = hf_architecture(cfg)
    return config_cls.from_hf(config, path)

  def to_hf(flat, *, hf_config, source_name) -> tuple[dict, dict]:
    config = config_cls.from_hf(hf_config, source_name)
    return ({**hf_config, 'architectures': [hf_architectures[config.model_type]]},
            to_hf_state_dict(flat, config, hf_key_table, source_name=source_name))

  def hf_weight(path, *, hf_config) -> tuple[str, bool]:
    import re
    full = path if path.startswith('params/') else 'params/' + path
    for pattern, key, fn in hf_key_table(config_cls.from_hf(hf_config, 'hf_config')):
      if match := re.fullmatch(pattern, full):
        return match.expand(key), fn is None and full.endswith('/kernel')   # kept (in, out): a Conv1D
    raise ValueError(f"param {path!r} has no Hugging Face {name} counterpart (no row of its export key table)")

  return Family(
      name=name, inputs='text', kind='decoder', variants={name: None}, hf_weight=hf_weight,
      backbone=lambda cfg, dtype: model_cls(config_of(cfg), dtype, remat=cfg.get('remat', 'none')),
      causal_lm=lambda cfg, dtype: causal_lm(config_of(cfg), dtype, remat=cfg.get('remat', 'none')),
      convert=lambda state, *, cfg, hf_config, source_name: convert_hf_state_dict(
          state, config_cls.from_hf(hf_config, source_name), source_name=source_name),
      to_hf=to_hf, layer_regexes=layer_regexes, example_batch=text_example(with_types=False),
      hf_model_types=model_types, pooling='last', upstream_head=r'params/lm_head/.*',
      tensor_parallel=tuple(tensor_parallel),
      cpu_library_fusions=())   # YNNPACK would take each attention core as one slow op (layers.compiler_options)
