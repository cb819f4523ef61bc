"""GPT-2 decoder in Flax, plus the key table that loads Hugging Face checkpoints (GPT2LMHeadModel, GPT2Model).

The computation mirrors ``transformers.GPT2Model`` / ``GPT2LMHeadModel`` exactly, so their weights load without
retraining: pre-LayerNorm blocks, learned absolute positions, fused q/k/v projection, attention scaled by
``head_dim ** -0.5`` (unless ``scale_attn_weights`` is false) and by ``1 / (layer + 1)`` with
``scale_attn_by_inverse_layer_idx``, the LM head tied to the token embedding unless ``tie_word_embeddings`` is
false. ``reorder_and_upcast_attn`` only changes how HF computes the scores in mixed precision; here scores and
softmax are always float32, which is what that option asks for. HF's ``Conv1D`` stores its weight as (in, out),
already Flax's kernel layout. Masks, positions and the KV cache: ``transfer.models.decoder_common``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from transfer.convert import ConversionError, KeyRow, apply_key_table
from transfer.models import decoder_common as common
from transfer.models.decoder_common import CausalLM
from transfer.models.layers import batch_sharded, gradient_barrier, remat

MODEL_TYPES = ('gpt2',)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The architecture facts of a GPT-2 ``config.json``; names follow HF's aliases (hidden_size for n_embd, ...)."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  intermediate_size: int
  activation_function: str = 'gelu_new'
  layer_norm_epsilon: float = 1e-5
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  model_type: str = 'gpt2'

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], source_name: str = 'config.json') -> 'GPT2Config':
    """Validates every field (ValueError naming field and file); defaults are GPT2Config's for absent fields."""
    r = common.FieldReader(config, source_name)
    r.get('model_type', str, ok=lambda v: v in MODEL_TYPES, why=f'must be one of {MODEL_TYPES}')
    if r.get('add_cross_attention', bool, False):
      raise r.error('add_cross_attention', 'is true; cross-attention (an encoder-decoder GPT-2) is not supported')
    hidden = r.get('n_embd', int, 768, ok=common.positive)
    heads = r.get('n_head', int, 12, ok=lambda v: v > 0 and hidden % v == 0,
                  why=f'must be positive and divide n_embd {hidden}')
    inner = r.get('n_inner', int, None, ok=common.positive, none_ok=True)
    pad = r.get('pad_token_id', int, None, ok=lambda v: v >= 0, none_ok=True)
    return cls(
        vocab_size=r.get('vocab_size', int, 50257, ok=common.positive), hidden_size=hidden,
        num_hidden_layers=r.get('n_layer', int, 12, ok=common.positive), num_attention_heads=heads,
        max_position_embeddings=r.get('n_positions', int, 1024, ok=common.positive),
        intermediate_size=4 * hidden if inner is None else inner,
        activation_function=r.get('activation_function', str, 'gelu_new', ok=lambda v: v in common.ACTIVATIONS,
                                  why=f'must be one of {sorted(common.ACTIVATIONS)}'),
        layer_norm_epsilon=r.get('layer_norm_epsilon', float, 1e-5, ok=common.positive),
        resid_pdrop=r.get('resid_pdrop', float, 0.1, ok=common.probability),
        embd_pdrop=r.get('embd_pdrop', float, 0.1, ok=common.probability),
        attn_pdrop=r.get('attn_pdrop', float, 0.1, ok=common.probability),
        scale_attn_weights=r.get('scale_attn_weights', bool, True),
        scale_attn_by_inverse_layer_idx=r.get('scale_attn_by_inverse_layer_idx', bool, False),
        tie_word_embeddings=r.get('tie_word_embeddings', bool, True),
        eos_token_id=r.token_ids('eos_token_id'), pad_token_id=pad)


def _layer_norm(config: GPT2Config, dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance, like torch.
  return nn.LayerNorm(config.layer_norm_epsilon, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


class Attention(nn.Module):
  """Causal self-attention with the fused ``c_attn`` projection; ``layer`` sets the inverse-layer scaling."""
  config: GPT2Config
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, allowed, layer_cache, index, *, train: bool):
    c = self.config
    dense = lambda feats, name: common.dense(feats, name, self.dtype)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], c.num_attention_heads, c.head_dim)
    query, key, value = (split(t) for t in jnp.split(dense(3 * c.hidden_size, 'c_attn')(x), 3, axis=-1))
    keys, values, layer_cache = common.write_layer_cache(layer_cache, key, value, index)
    scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
    if c.scale_attn_by_inverse_layer_idx:
      scale /= float(self.layer + 1)
    out = common.attend(query, keys, values, allowed, scale=scale, dtype=self.dtype,
                        dropout=nn.Dropout(c.attn_pdrop, deterministic=not train))
    out = nn.Dropout(c.resid_pdrop, deterministic=not train)(dense(c.hidden_size, 'c_proj')(out))
    return out, layer_cache


class Block(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: GPT2Config
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, allowed, layer_cache, index, train: bool):
    c = self.config
    dense = lambda feats, name: common.dense(feats, name, self.dtype)
    x = gradient_barrier(x)   # the residual stream's gradient, materialised per block (layers.gradient_barrier)
    attn, layer_cache = Attention(c, self.layer, self.dtype, name='attn')(
        _layer_norm(c, self.dtype, 'ln_1')(x), allowed, layer_cache, index, train=train)
    x = gradient_barrier(x + attn)
    h = _layer_norm(c, self.dtype, 'ln_2')(x)
    h = common.ACTIVATIONS[c.activation_function](dense(c.intermediate_size, 'c_fc')(h))
    h = nn.Dropout(c.resid_pdrop, deterministic=not train)(dense(c.hidden_size, 'c_proj')(h))
    return x + h, layer_cache


class GPT2Model(nn.Module):
  """(N, L) token ids and 0/1 mask -> (hidden (N, L, H) after ``ln_f``, new cache or None).

  ``dtype`` is the compute dtype; params stay float32, attention scores/softmax are float32. Dropout (embd, attn,
  resid pdrop, as HF) only with ``train`` (rng stream 'dropout'). Parameter names follow HF's (wte, wpe, h_i, ln_f).
  ``remat``: ``config.model.remat`` for the blocks (``transfer.models.layers.remat``), with or without a cache.
  """
  config: GPT2Config
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    c = self.config
    embed = lambda num: nn.Embed(num, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                 embedding_init=common.INIT)
    self.wte, self.wpe = embed(c.vocab_size), embed(c.max_position_embeddings)
    block = remat(Block, self.remat, static_argnums=(5,))   # train
    self.h = [block(c, i, self.dtype) for i in range(c.num_hidden_layers)]
    self.ln_f = _layer_norm(c, self.dtype, None)
    self.embd_drop = nn.Dropout(c.embd_pdrop)

  def __call__(self, input_ids, attention_mask, *, positions=None, cache=None, train: bool = False):
    c = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    length = input_ids.shape[1]
    common.check_length(length, cache, c.max_position_embeddings, 'n_positions')
    if positions is None:
      positions = common.default_positions(attention_mask, cache)
    allowed, key_mask = common.allowed_keys(attention_mask, cache)
    index = None if cache is None else cache['index']
    x = self.embd_drop(self.wte(input_ids) + self.wpe(jnp.asarray(positions, jnp.int32)), deterministic=not train)
    x = batch_sharded(x)   # not the embedding table's split (see layers.batch_sharded)
    layers = []
    for i, block in enumerate(self.h):
      x, layer_cache = block(x, allowed, None if cache is None else cache['layers'][i], index, train)
      layers.append(layer_cache)
    return self.ln_f(x), common.updated_cache(cache, key_mask, length, layers)

  def attend(self, hidden):
    """Next-token logits through the tied token embedding, float32."""
    return common.tied_logits(hidden, self.wte.embedding)

  def init_cache(self, batch: int, max_len: int) -> dict:
    c = self.config
    return common.init_cache(batch, max_len, num_layers=c.num_hidden_layers, kv_heads=c.num_attention_heads,
                             head_dim=c.head_dim, dtype=self.dtype)


def causal_lm(config: GPT2Config, dtype=jnp.float32, remat: str = 'none') -> CausalLM:
  """GPT-2 with its LM head (tied or not, as the config says): params under ``backbone/`` and ``lm_head/``."""
  return CausalLM(backbone=GPT2Model(config, dtype, remat), tie_word_embeddings=config.tie_word_embeddings)


def layer_regexes(backbone: GPT2Model) -> list:
  """Layer-wise lr decay depths: embeddings 0, block i at i + 1, final norm and LM head at n + 1."""
  n = backbone.config.num_hidden_layers
  return [(r'backbone/(?:wte|wpe)/.*', 0), (r'backbone/h_(\d+)/.*', 'group+1'), (r'backbone/ln_f/.*', n + 1),
          (r'lm_head/.*', n + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion from Hugging Face (GPT2LMHeadModel: 'transformer.' prefix and lm_head; GPT2Model: bare).

def _linear(source: str, target: str) -> list[KeyRow]:
  """Conv1D (in, out) weight -> Flax (in, out) kernel, as is."""
  return [(source + r'\.weight', target + '/kernel', None), (source + r'\.bias', target + '/bias', None)]


def _ln(source: str, target: str) -> list[KeyRow]:
  return [(source + r'\.weight', target + '/scale', None), (source + r'\.bias', target + '/bias', None)]


_P = r'(?:transformer\.)?'
_H = _P + r'h\.(\d+)\.'
_B = 'params/backbone/'


def key_table(config: GPT2Config) -> list[KeyRow]:
  """Every key of a GPT-2 checkpoint: mapped, or dropped on purpose. The LM head follows ``tie_word_embeddings``:
  tied checkpoints may carry ``lm_head.weight`` as a copy of ``wte`` (checked in ``convert_hf_state_dict``)."""
  lm_head = ((r'lm_head\.weight', None, None) if config.tie_word_embeddings
             else (r'lm_head\.weight', 'params/lm_head/kernel', lambda w: np.ascontiguousarray(w.T)))
  return [
      (_P + r'wte\.weight', _B + 'wte/embedding', None),
      (_P + r'wpe\.weight', _B + 'wpe/embedding', None),
      *_ln(_H + r'ln_1', _B + r'h_\1/ln_1'),
      *_linear(_H + r'attn\.c_attn', _B + r'h_\1/attn/c_attn'),
      *_linear(_H + r'attn\.c_proj', _B + r'h_\1/attn/c_proj'),
      # The causal-mask buffers older transformers versions saved; the mask is computed instead.
      (_H + r'attn\.(?:bias|masked_bias)', None, None),
      *_ln(_H + r'ln_2', _B + r'h_\1/ln_2'),
      *_linear(_H + r'mlp\.c_fc', _B + r'h_\1/c_fc'),
      *_linear(_H + r'mlp\.c_proj', _B + r'h_\1/c_proj'),
      *_ln(_P + r'ln_f', _B + 'ln_f'),
      lm_head,
  ]


def convert_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: GPT2Config, *,
                          source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """HF state dict -> flat ``{params/backbone/...: array}`` for ``merge_pretrained``, checked against ``config``."""
  flat = apply_key_table(state_dict, key_table(config), source_name=source_name)
  wte = _B + 'wte/embedding'
  if wte not in flat:
    raise ConversionError(f"{source_name}: no token embedding (wte.weight) in the checkpoint")
  expected = (config.vocab_size, config.hidden_size)
  if tuple(flat[wte].shape) != expected:
    raise ConversionError(f"{source_name}: wte.weight has shape {tuple(flat[wte].shape)} but the config says "
                          f"(vocab_size, n_embd) = {expected}")
  if config.tie_word_embeddings and 'lm_head.weight' in state_dict:
    if not np.array_equal(np.asarray(state_dict['lm_head.weight']), flat[wte]):
      raise ConversionError(f"{source_name}: tie_word_embeddings is true but lm_head.weight differs from wte.weight")
  layers = sorted({int(k.split('/')[2][len('h_'):]) for k in flat if k.startswith(_B + 'h_')})
  if layers != list(range(config.num_hidden_layers)):
    raise ConversionError(f"{source_name}: checkpoint has blocks {layers} but the config says n_layer = "
                          f"{config.num_hidden_layers}")
  return flat


# ---------------------------------------------------------------------------------------------------------------
# Export back to Hugging Face (transfer/hf_export.py): the key table reversed, as transformers 5's save_pretrained
# writes a GPT2LMHeadModel ('transformer.' prefix; a tied lm_head is not stored).

HF_ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel'}


def _to_hf_rows(path: str, hf_key: str, leaf: str) -> list[KeyRow]:
  return [(_B + path + '/' + leaf, 'transformer.' + hf_key + '.weight', None),
          (_B + path + '/bias', 'transformer.' + hf_key + '.bias', None)]


def hf_key_table(config: GPT2Config) -> list[KeyRow]:
  """Flat ``params/...`` paths -> GPT2LMHeadModel keys: ``key_table`` read backwards."""
  rows = [(_B + r'(wte|wpe)/embedding', r'transformer.\1.weight', None),
          *_to_hf_rows(r'h_(\d+)/(ln_1|ln_2)', r'h.\1.\2', 'scale'),
          *_to_hf_rows(r'h_(\d+)/attn/(c_attn|c_proj)', r'h.\1.attn.\2', 'kernel'),
          *_to_hf_rows(r'h_(\d+)/(c_fc|c_proj)', r'h.\1.mlp.\2', 'kernel'),
          *_to_hf_rows('ln_f', 'ln_f', 'scale')]
  if not config.tie_word_embeddings:
    rows.append((r'params/lm_head/kernel', 'lm_head.weight', lambda w: np.ascontiguousarray(w.T)))
  return rows


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).


# Tensor parallelism (config.sharding_rules value 'tensor', transfer/sharding.py): c_attn (the fused q|k|v, its
# output split into contiguous blocks over 'tensor', which the compiler re-lays for the head split) and c_fc over
# their output units, the two c_proj over their input units.
TENSOR_PARALLEL = [
    (r'backbone/h_\d+/(attn/c_attn|c_fc)/kernel', ('fsdp', 'tensor')),
    (r'backbone/h_\d+/(attn/c_attn|c_fc)/bias', ('tensor',)),
    (r'backbone/h_\d+/(attn/)?c_proj/kernel', ('tensor', 'fsdp')),
]


FAMILY = common.decoder_family(
    'gpt2', config_cls=GPT2Config, model_cls=GPT2Model, causal_lm=causal_lm,
    convert_hf_state_dict=convert_hf_state_dict, hf_key_table=hf_key_table, hf_architectures=HF_ARCHITECTURES,
    layer_regexes=layer_regexes, model_types=MODEL_TYPES, tensor_parallel=TENSOR_PARALLEL)
