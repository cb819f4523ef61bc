"""Llama-family decoders in Flax (model_type llama, qwen2, mistral), plus the key table for Hugging Face checkpoints.

The computation mirrors ``transformers.LlamaModel`` / ``Qwen2Model`` / ``MistralModel`` exactly, so their weights
load without retraining: pre-RMSNorm blocks, rotary positions (RoPE, types default, linear and llama3), SwiGLU MLP
``down(act(gate(x)) * up(x))``, grouped-query attention scaled by ``head_dim ** -0.5``, untied or tied LM head.
The three differ only in biases: Llama has q/k/v/o biases iff ``attention_bias`` and MLP biases iff ``mlp_bias``;
Qwen2 always has q/k/v biases (no o bias); Mistral none. Sliding-window attention is refused when it would mask
anything within the context (see ``LlamaConfig.from_hf``). Masks, positions, cache: ``decoder_common``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transfer.convert import ConversionError, KeyRow, apply_key_table
from transfer.models import decoder_common as common
from transfer.models.decoder_common import CausalLM
from transfer.models.layers import batch_sharded, gradient_barrier, remat

MODEL_TYPES = ('llama', 'qwen2', 'mistral')
# HF's per-model_type defaults for fields a config.json may leave out (transformers' LlamaConfig, Qwen2Config,
# MistralConfig).
_DEFAULTS = {
    'llama': dict(max_position_embeddings=2048, num_key_value_heads=None),
    'qwen2': dict(max_position_embeddings=32768, num_key_value_heads=32),
    'mistral': dict(max_position_embeddings=4096 * 32, num_key_value_heads=8),
}
# Fields of mixture-of-experts configs (Mixtral, Qwen2-MoE, ...): their checkpoints have expert weights this
# module has no place for.
_MOE_FIELDS = ('num_local_experts', 'num_experts', 'num_experts_per_tok', 'moe_intermediate_size')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture facts of a Llama/Qwen2/Mistral ``config.json`` that change the computation or shapes."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int
  hidden_act: str = 'silu'
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  tie_word_embeddings: bool = False
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  model_type: str = 'llama'

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], source_name: str = 'config.json') -> 'LlamaConfig':
    """Validates every field (ValueError naming field and file) and refuses what this module would compute
    differently: other RoPE types, partial rotary, sliding windows that mask within the context, experts."""
    r = common.FieldReader(config, source_name)
    model_type = r.get('model_type', str, ok=lambda v: v in MODEL_TYPES, why=f'must be one of {MODEL_TYPES}')
    defaults = _DEFAULTS[model_type]
    for field in _MOE_FIELDS:
      if config.get(field):
        raise r.error(field, f'is set ({config[field]!r}): mixture-of-experts layers are not supported')
    hidden = r.get('hidden_size', int, ok=common.positive)
    heads = r.get('num_attention_heads', int, ok=common.positive)
    kv_heads = r.get('num_key_value_heads', int, defaults['num_key_value_heads'], none_ok=True,
                     ok=lambda v: v > 0 and heads % v == 0,
                     why=f'must be positive and divide num_attention_heads {heads}')
    head_dim = r.get('head_dim', int, None, none_ok=True, ok=lambda v: v > 0 and v % 2 == 0,
                     why='must be positive and even (RoPE rotates pairs)')
    if head_dim is None:
      if hidden % heads or (hidden // heads) % 2:
        raise r.error('num_attention_heads', f'must divide hidden_size {hidden} into an even head size '
                      f'(or give head_dim), got {heads}')
      head_dim = hidden // heads
    max_positions = r.get('max_position_embeddings', int, defaults['max_position_embeddings'], ok=common.positive)
    rope = _rope(r, max_positions)
    _check_sliding_window(r, model_type, max_positions)
    layer_types = r.get('layer_types', list, None, none_ok=True) if 'layer_types' in config else None
    if layer_types is not None and any(t not in ('full_attention', 'sliding_attention') for t in layer_types):
      raise r.error('layer_types', f"may only hold 'full_attention' (and unused 'sliding_attention'), got "
                    f"{sorted(set(layer_types))}")
    attention_bias = r.get('attention_bias', bool, False)
    pad = r.get('pad_token_id', int, None, ok=lambda v: v >= 0, none_ok=True)
    return cls(
        vocab_size=r.get('vocab_size', int, ok=common.positive), hidden_size=hidden,
        intermediate_size=r.get('intermediate_size', int, ok=common.positive),
        num_hidden_layers=r.get('num_hidden_layers', int, ok=common.positive), num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions,
        hidden_act=r.get('hidden_act', str, 'silu', ok=lambda v: v in common.ACTIVATIONS,
                         why=f'must be one of {sorted(common.ACTIVATIONS)}'),
        rms_norm_eps=r.get('rms_norm_eps', float, 1e-6, ok=common.positive), **rope,
        qkv_bias=model_type == 'qwen2' or (model_type == 'llama' and attention_bias),
        o_bias=model_type == 'llama' and attention_bias,
        mlp_bias=model_type == 'llama' and r.get('mlp_bias', bool, False),
        attention_dropout=r.get('attention_dropout', float, 0.0, ok=common.probability),
        tie_word_embeddings=r.get('tie_word_embeddings', bool, False),
        eos_token_id=r.token_ids('eos_token_id'), pad_token_id=pad, model_type=model_type)

  @property
  def inverse_frequencies(self) -> np.ndarray:
    return common.rope_inverse_frequencies(
        self.head_dim, self.rope_theta, self.rope_type, self.rope_factor, self.rope_low_freq_factor,
        self.rope_high_freq_factor, self.rope_original_max_positions)


def _rope(r: common.FieldReader, max_positions: int) -> dict:
  """RoPE settings from either layout: transformers 5's ``rope_parameters`` dict (theta inside), or the older
  ``rope_scaling`` dict (or null) beside a top-level ``rope_theta``. Like transformers, ``rope_scaling`` wins when
  both are given, dict values win over top-level ones, and ``type`` is an old spelling of ``rope_type``."""
  field = 'rope_scaling' if r.config.get('rope_scaling') else 'rope_parameters'
  params = r.get(field, dict, None, none_ok=True) or {}
  where = lambda key: f'{field}.{key}'
  nested = sorted(key for key, value in params.items() if isinstance(value, dict))
  if nested:
    raise r.error(field, f'holds per-layer-type RoPE settings {nested}; one RoPE for all layers is supported')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in common.ROPE_TYPES:
    raise r.error(where('rope_type'), f'is {rope_type!r}; supported RoPE types: {common.ROPE_TYPES}')
  partial = params.get('partial_rotary_factor', r.config.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1, 1.0):
    raise r.error(where('partial_rotary_factor'), f'is {partial!r}; only full rotary embeddings (1.0) are supported')

  def number(key, default=None, ok=common.positive, why='must be positive'):
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
      raise r.error(where(key), f'{why}, got {value!r}')
    return value

  theta = params.get('rope_theta', r.config.get('rope_theta', 10000.0))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
    raise r.error(where('rope_theta') if 'rope_theta' in params else 'rope_theta',
                  f'must be a number > 1, got {theta!r}')
  out = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type in ('linear', 'llama3'):
    out['rope_factor'] = float(number('factor'))
  if rope_type == 'llama3':
    low, high = float(number('low_freq_factor')), float(number('high_freq_factor'))
    if high <= low:
      raise r.error(where('high_freq_factor'), f'must be larger than low_freq_factor {low}, got {high}')
    original = number('original_max_position_embeddings', r.config.get('original_max_position_embeddings',
                                                                         max_positions))
    if not isinstance(original, int):
      raise r.error(where('original_max_position_embeddings'), f'must be an integer, got {original!r}')
    out.update(rope_low_freq_factor=low, rope_high_freq_factor=high, rope_original_max_positions=original)
  return out


def _check_sliding_window(r: common.FieldReader, model_type: str, max_positions: int) -> None:
  """Refuses a sliding window that would mask keys within the context (this module attends to all of them).

  Mistral uses ``sliding_window`` when it is not null. Qwen2 only when ``use_sliding_window`` is true, and then
  only on its 'sliding_attention' layers (``layer_types``, or by default the layers from ``max_window_layers``
  on). Llama has none. A window of at least ``max_position_embeddings`` tokens never masks anything."""
  if model_type == 'llama':
    return
  window = r.get('sliding_window', int, None, ok=common.positive, none_ok=True)
  if window is None or window >= max_positions:
    return
  if model_type == 'mistral':
    raise r.error('sliding_window', f'is {window}, smaller than max_position_embeddings {max_positions}: '
                  'sliding-window attention is not supported (null, or a window covering the context, is)')
  if not r.get('use_sliding_window', bool, False):
    return
  layers = r.get('num_hidden_layers', int, ok=common.positive)
  layer_types = r.config.get('layer_types')
  if layer_types is None:
    first = r.get('max_window_layers', int, 28)
    sliding = first < layers
  else:
    sliding = 'sliding_attention' in layer_types
  if sliding:
    raise r.error('use_sliding_window', f'is true with sliding_window {window} < max_position_embeddings '
                  f'{max_positions} on some layers (max_window_layers / layer_types): sliding-window attention is '
                  'not supported')


class RMSNorm(nn.Module):
  """``scale * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back, as HF's LlamaRMSNorm."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * normed.astype(x.dtype)).astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE on queries and keys; the cache holds rotated keys."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, index, *, train: bool):
    c = self.config
    dense = lambda feats, bias, name: common.dense(feats, name, self.dtype, bias=bias)
    heads = lambda t, n: t.reshape(t.shape[0], t.shape[1], n, c.head_dim)
    inverse_frequencies = c.inverse_frequencies
    query = heads(dense(c.num_attention_heads * c.head_dim, c.qkv_bias, 'q_proj')(x), c.num_attention_heads)
    key = heads(dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, 'k_proj')(x), c.num_key_value_heads)
    value = heads(dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, 'v_proj')(x), c.num_key_value_heads)
    query = common.apply_rope(query, positions, inverse_frequencies)
    key = common.apply_rope(key, positions, inverse_frequencies)
    keys, values, layer_cache = common.write_layer_cache(layer_cache, key, value, index)
    out = common.attend(query, keys, values, allowed, scale=c.head_dim ** -0.5, dtype=self.dtype,
                        dropout=nn.Dropout(c.attention_dropout, deterministic=not train))
    return dense(c.hidden_size, c.o_bias, 'o_proj')(out), layer_cache


class MLP(nn.Module):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda feats, name: common.dense(feats, name, self.dtype, bias=c.mlp_bias)
    gate = common.ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, 'gate_proj')(x))
    return dense(c.hidden_size, 'down_proj')(gate * dense(c.intermediate_size, 'up_proj')(x))


class DecoderLayer(nn.Module):
  """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, allowed, layer_cache, index, train: bool):
    c = self.config
    x = gradient_barrier(x)   # the residual stream's gradient, materialised per block (layers.gradient_barrier)
    attn, layer_cache = Attention(c, self.dtype, name='self_attn')(
        RMSNorm(c.rms_norm_eps, self.dtype, name='input_layernorm')(x), positions, allowed, layer_cache, index,
        train=train)
    x = gradient_barrier(x + attn)
    mlp = MLP(c, self.dtype, name='mlp')(RMSNorm(c.rms_norm_eps, self.dtype, name='post_attention_layernorm')(x))
    return x + mlp, layer_cache


class LlamaModel(nn.Module):
  """(N, L) token ids and 0/1 mask -> (hidden (N, L, H) after the final norm, new cache or None).

  ``dtype`` is the compute dtype; params stay float32, attention scores/softmax are float32, RoPE angles too.
  Attention dropout (``attention_dropout``, the only dropout HF has here) only with ``train`` (rng 'dropout').
  Parameter names follow HF's (embed_tokens, layers_i/self_attn/q_proj, ..., norm). ``remat``:
  ``config.model.remat`` for the layers (``transfer.models.layers.remat``), with or without a cache.
  """
  config: LlamaConfig
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                 embedding_init=common.INIT)
    layer = remat(DecoderLayer, self.remat, static_argnums=(6,))   # train
    self.layers = [layer(c, self.dtype) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

  def __call__(self, input_ids, attention_mask, *, positions=None, cache=None, train: bool = False):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    length = input_ids.shape[1]
    common.check_length(length, cache, self.config.max_position_embeddings, 'max_position_embeddings')
    if positions is None:
      positions = common.default_positions(attention_mask, cache)
    positions = jnp.asarray(positions, jnp.int32)
    allowed, key_mask = common.allowed_keys(attention_mask, cache)
    index = None if cache is None else cache['index']
    x = batch_sharded(self.embed_tokens(input_ids))   # not the table's split (see layers.batch_sharded)
    layers = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, allowed, None if cache is None else cache['layers'][i], index, train)
      layers.append(layer_cache)
    return self.norm(x), common.updated_cache(cache, key_mask, length, layers)

  def attend(self, hidden):
    """Next-token logits through the tied token embedding, float32."""
    return common.tied_logits(hidden, self.embed_tokens.embedding)

  def init_cache(self, batch: int, max_len: int) -> dict:
    c = self.config
    return common.init_cache(batch, max_len, num_layers=c.num_hidden_layers, kv_heads=c.num_key_value_heads,
                             head_dim=c.head_dim, dtype=self.dtype)


def causal_lm(config: LlamaConfig, dtype=jnp.float32, remat: str = 'none') -> CausalLM:
  """The decoder with its LM head (tied or not, as the config says): params under ``backbone/`` and ``lm_head/``."""
  return CausalLM(backbone=LlamaModel(config, dtype, remat), tie_word_embeddings=config.tie_word_embeddings)


def layer_regexes(backbone: LlamaModel) -> list:
  """Layer-wise lr decay depths: embeddings 0, block i at i + 1, final norm and LM head at n + 1."""
  n = backbone.config.num_hidden_layers
  return [(r'backbone/embed_tokens/.*', 0), (r'backbone/layers_(\d+)/.*', 'group+1'), (r'backbone/norm/.*', n + 1),
          (r'lm_head/.*', n + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion from Hugging Face (*ForCausalLM: 'model.' prefix and lm_head; *Model: bare).

def _dense(source: str, target: str) -> list[KeyRow]:
  """nn.Linear (out, in) weight -> Flax (in, out) kernel."""
  return [(source + r'\.weight', target + '/kernel', lambda w: np.ascontiguousarray(w.T)),
          (source + r'\.bias', target + '/bias', None)]


_P = r'(?:model\.)?'
_L = _P + r'layers\.(\d+)\.'
_B = 'params/backbone/'


def key_table(config: LlamaConfig) -> list[KeyRow]:
  """Every key of a Llama/Qwen2/Mistral checkpoint: mapped, or dropped on purpose. A bias row matches only when
  the config has that bias, so a checkpoint with biases the config denies fails as an unmatched key."""
  lm_head = ((r'lm_head\.weight', None, None) if config.tie_word_embeddings
             else (r'lm_head\.weight', 'params/lm_head/kernel', lambda w: np.ascontiguousarray(w.T)))
  rows = [(_P + r'embed_tokens\.weight', _B + 'embed_tokens/embedding', None)]
  for name, bias in (('q_proj', config.qkv_bias), ('k_proj', config.qkv_bias), ('v_proj', config.qkv_bias),
                     ('o_proj', config.o_bias)):
    rows += _dense(_L + r'self_attn\.' + name, _B + r'layers_\1/self_attn/' + name)[:1 + bias]
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    rows += _dense(_L + r'mlp\.' + name, _B + r'layers_\1/mlp/' + name)[:1 + config.mlp_bias]
  return rows + [
      (_L + r'input_layernorm\.weight', _B + r'layers_\1/input_layernorm/scale', None),
      (_L + r'post_attention_layernorm\.weight', _B + r'layers_\1/post_attention_layernorm/scale', None),
      (_P + r'norm\.weight', _B + 'norm/scale', None),
      # RoPE frequency buffers older transformers versions saved; computed from the config instead.
      (_P + r'(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq', None, None),
      lm_head,
  ]


def convert_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: LlamaConfig, *,
                          source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """HF state dict -> flat ``{params/backbone/...: array}`` for ``merge_pretrained``, checked against ``config``."""
  flat = apply_key_table(state_dict, key_table(config), source_name=source_name)
  embed = _B + 'embed_tokens/embedding'
  if embed not in flat:
    raise ConversionError(f"{source_name}: no token embedding (embed_tokens.weight) in the checkpoint")
  expected = (config.vocab_size, config.hidden_size)
  if tuple(flat[embed].shape) != expected:
    raise ConversionError(f"{source_name}: embed_tokens.weight has shape {tuple(flat[embed].shape)} but the config "
                          f"says (vocab_size, hidden_size) = {expected}")
  if config.tie_word_embeddings and 'lm_head.weight' in state_dict:
    if not np.array_equal(np.asarray(state_dict['lm_head.weight']), flat[embed]):
      raise ConversionError(f"{source_name}: tie_word_embeddings is true but lm_head.weight differs from "
                            "embed_tokens.weight")
  layers = sorted({int(k.split('/')[2][len('layers_'):]) for k in flat if k.startswith(_B + 'layers_')})
  if layers != list(range(config.num_hidden_layers)):
    raise ConversionError(f"{source_name}: checkpoint has layers {layers} but the config says num_hidden_layers = "
                          f"{config.num_hidden_layers}")
  return flat


# ---------------------------------------------------------------------------------------------------------------
# Export back to Hugging Face (transfer/hf_export.py): the key table reversed, as transformers 5's save_pretrained
# writes a *ForCausalLM ('model.' prefix; a tied lm_head is not stored).

HF_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'mistral': 'MistralForCausalLM'}
_TRANSPOSE = lambda w: np.ascontiguousarray(w.T)   # Flax (in, out) kernel -> nn.Linear (out, in) weight


def hf_key_table(config: LlamaConfig) -> list[KeyRow]:
  """Flat ``params/...`` paths -> *ForCausalLM keys: ``key_table`` read backwards (biases wherever the params have
  them; which ones a model has is its config's business, checked against the module before export)."""
  layer = _B + r'layers_(\d+)/'
  rows = [(_B + 'embed_tokens/embedding', 'model.embed_tokens.weight', None),
          (layer + r'(self_attn|mlp)/(\w+_proj)/kernel', r'model.layers.\1.\2.\3.weight', _TRANSPOSE),
          (layer + r'(self_attn|mlp)/(\w+_proj)/bias', r'model.layers.\1.\2.\3.bias', None),
          (layer + r'(input_layernorm|post_attention_layernorm)/scale', r'model.layers.\1.\2.weight', None),
          (_B + 'norm/scale', 'model.norm.weight', None)]
  if not config.tie_word_embeddings:
    rows.append((r'params/lm_head/kernel', 'lm_head.weight', _TRANSPOSE))
  return rows


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).


# Tensor parallelism (config.sharding_rules value 'tensor', transfer/sharding.py): q/k/v (query and key-value
# heads) and the SwiGLU gate/up over their output units, o_proj and down_proj over their input units.
TENSOR_PARALLEL = [
    (r'backbone/layers_\d+/self_attn/(q|k|v)_proj/kernel', ('fsdp', 'tensor')),
    (r'backbone/layers_\d+/self_attn/(q|k|v)_proj/bias', ('tensor',)),
    (r'backbone/layers_\d+/self_attn/o_proj/kernel', ('tensor', 'fsdp')),
    (r'backbone/layers_\d+/mlp/(gate|up)_proj/kernel', ('fsdp', 'tensor')),
    (r'backbone/layers_\d+/mlp/down_proj/kernel', ('tensor', 'fsdp')),
]


FAMILY = common.decoder_family(
    'llama', config_cls=LlamaConfig, model_cls=LlamaModel, causal_lm=causal_lm,
    convert_hf_state_dict=convert_hf_state_dict, hf_key_table=hf_key_table, hf_architectures=HF_ARCHITECTURES,
    layer_regexes=layer_regexes, model_types=MODEL_TYPES, tensor_parallel=TENSOR_PARALLEL)
