"""BERT-family text encoder in Flax (BERT, RoBERTa), plus the key table that loads Hugging Face checkpoints.

The computation mirrors ``transformers.BertModel`` / ``RobertaModel`` in eval mode exactly, so their weights load
without retraining: post-LayerNorm blocks, absolute learned positions, the pooler ``tanh(Dense(h[:, 0]))``.
The two families differ only in the embeddings: RoBERTa numbers positions from ``pad_token_id + 1`` and gives
padding tokens the position ``pad_token_id`` (derived from ``input_ids``, as HF does), and has one token type.

Padding: keys where ``attention_mask`` is 0 get ``finfo(float32).min`` added to their scores (HF's eager
constant). Unlike -inf, a fully masked row then gives a uniform softmax instead of NaN; for any real row the
masked weights are exactly 0 in float32. Hidden states at padded query positions are defined but meaningless.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transfer.convert import ConversionError, KeyRow, apply_key_table
from transfer.models.family import Family, hf_architecture, text_example

# HF activation names -> functions. 'gelu' is the exact erf form; the other two are the same tanh approximation.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
MODEL_TYPES = ('bert', 'roberta')
_INIT = nn.initializers.normal(0.02)  # HF's initializer_range default, for layers trained from scratch


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture facts of a Hugging Face ``config.json`` that change the computation or the shapes."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = 'gelu'
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int | None = 0
  model_type: str = 'bert'

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], source_name: str = 'config.json') -> 'BertConfig':
    """Validates every field (ValueError naming field and file) and refuses variants this model would get wrong."""
    def bad(field, why):
      return ValueError(f"{source_name}: field {field!r} {why}")

    def get(field, kind, ok=lambda v: True, why='is out of range'):
      if field not in config:
        raise bad(field, 'is missing')
      value = config[field]
      if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad(field, f'must be an integer, got {value!r}')
      if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad(field, f'must be a number, got {value!r}')
      if kind is str and not isinstance(value, str):
        raise bad(field, f'must be a string, got {value!r}')
      if not ok(value):
        raise bad(field, f'{why}: {value!r}')
      return value

    positive = lambda v: v > 0
    prob = lambda v: 0 <= v < 1
    model_type = get('model_type', str, lambda v: v in MODEL_TYPES, f'must be one of {MODEL_TYPES}')
    # Variants that would load but compute something else: relative positions, causal (decoder) attention.
    if config.get('position_embedding_type', 'absolute') not in (None, 'absolute'):
      raise bad('position_embedding_type', f"must be 'absolute', got {config['position_embedding_type']!r}")
    for field in ('is_decoder', 'add_cross_attention'):
      if config.get(field):
        raise bad(field, 'is true; only bidirectional encoders are supported')
    if model_type == 'roberta' or config.get('pad_token_id') is not None:  # RoBERTa's positions depend on it
      pad = get('pad_token_id', int, lambda v: v >= 0, 'must be >= 0')
    else:
      pad = get('pad_token_id', object)
    hidden = get('hidden_size', int, positive)
    heads = get('num_attention_heads', int, lambda v: v > 0 and hidden % v == 0,
                f'must be positive and divide hidden_size {hidden}')
    return cls(
        vocab_size=get('vocab_size', int, positive), hidden_size=hidden,
        num_hidden_layers=get('num_hidden_layers', int, positive), num_attention_heads=heads,
        intermediate_size=get('intermediate_size', int, positive),
        hidden_act=get('hidden_act', str, lambda v: v in ACTIVATIONS, f'must be one of {sorted(ACTIVATIONS)}'),
        max_position_embeddings=get('max_position_embeddings', int, positive),
        type_vocab_size=get('type_vocab_size', int, positive), layer_norm_eps=get('layer_norm_eps', float, positive),
        hidden_dropout_prob=get('hidden_dropout_prob', float, prob),
        attention_probs_dropout_prob=get('attention_probs_dropout_prob', float, prob),
        pad_token_id=pad, model_type=model_type)


def position_ids(input_ids: jnp.ndarray, config: BertConfig) -> jnp.ndarray:
  """BERT: 0..L-1. RoBERTa: pad+1, pad+2, ... over non-pad tokens, ``pad`` at pad tokens (fairseq's rule)."""
  length = input_ids.shape[1]
  if config.model_type == 'roberta':
    last = config.pad_token_id + length
    ids = (input_ids != config.pad_token_id).astype(jnp.int32)
    ids = jnp.cumsum(ids, axis=1) * ids + config.pad_token_id
  else:
    last, ids = length - 1, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
  if last >= config.max_position_embeddings:  # out-of-range gathers would silently return NaN/clamped rows
    raise ValueError(f"sequence length {length} needs position {last}, but max_position_embeddings is "
                     f"{config.max_position_embeddings}")
  return ids


class Attention(nn.Module):
  """Multi-head self-attention with explicit (N, L, heads, head_dim) reshapes; softmax in float32."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT,
                                  name=name)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, head_dim)
    q, k, v = split(dense('query')(x)), split(dense('key')(x)), split(dense('value')(x))
    scores = jnp.einsum('nqhd,nkhd->nhqk', q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(head_dim)
    probs = jax.nn.softmax(scores + mask_bias, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob, deterministic=not train)(probs)
    out = jnp.einsum('nhqk,nkhd->nqhd', probs.astype(self.dtype), v)
    return dense('out')(out.reshape(out.shape[0], out.shape[1], c.hidden_size))


class Layer(nn.Module):
  """Post-LN transformer block: LN(x + attention(x)), then LN(x + mlp(x)); dropout before each residual sum."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
    c = self.config
    dense = lambda feats, name: nn.Dense(feats, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT,
                                         name=name)
    ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                                   use_fast_variance=False, name=name)  # two-pass variance, like torch
    drop = nn.Dropout(c.hidden_dropout_prob, deterministic=not train)
    x = ln('attention_ln')(x + drop(Attention(c, self.dtype, name='attention')(x, mask_bias, train=train)))
    h = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, 'mlp_in')(x))
    return ln('mlp_ln')(x + drop(dense(c.hidden_size, 'mlp_out')(h)))


class Embeddings(nn.Module):
  """word + position + token type embeddings, then LayerNorm and dropout."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train: bool):
    c = self.config
    embed = lambda num, name: nn.Embed(num, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                       embedding_init=_INIT, name=name)
    x = (embed(c.vocab_size, 'word')(input_ids) + embed(c.type_vocab_size, 'token_type')(token_type_ids)
         + embed(c.max_position_embeddings, 'position')(position_ids(input_ids, c)))
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, use_fast_variance=False,
                     name='ln')(x)
    return nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(x)


class BertEncoder(nn.Module):
  """(N, L) token ids and 0/1 attention mask -> (last_hidden_state (N, L, H), pooled_output (N, H)).

  ``token_type_ids`` default to zeros (HF's default). ``dtype`` is the compute dtype; params stay float32 and
  attention scores/softmax are float32 whatever ``dtype`` is. Dropout only with ``train`` (rng stream 'dropout').
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
    c = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    # (N, 1, 1, L) additive bias over keys: 0 where attended, the float32 minimum where padded (see module doc).
    keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = Embeddings(c, self.dtype, name='embeddings')(input_ids, token_type_ids, train=train)
    for i in range(c.num_hidden_layers):
      x = Layer(c, self.dtype, name=f'layer_{i}')(x, mask_bias, train=train)
    pooled = nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT,
                      name='pooler')(x[:, 0])
    return x, jnp.tanh(pooled)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion from Hugging Face (BertModel, BertForSequenceClassification, RobertaModel, pretraining).

def _dense(source: str, target: str) -> list[KeyRow]:
  """nn.Linear (out, in) weight -> flax (in, out) kernel."""
  return [(source + r'\.weight', target + '/kernel', lambda w: np.ascontiguousarray(w.T)),
          (source + r'\.bias', target + '/bias', None)]


def _ln(source: str, target: str) -> list[KeyRow]:
  """LayerNorm weight/bias -> scale/bias; gamma/beta are the names in old TF-converted files (bert-base-uncased)."""
  return [(source + r'\.(?:weight|gamma)', target + '/scale', None),
          (source + r'\.(?:bias|beta)', target + '/bias', None)]


_P = r'(?:bert\.|roberta\.)?'  # task models (BertFor*, RobertaFor*) nest the encoder under this prefix
_L = _P + r'encoder\.layer\.(\d+)\.'
_B = 'params/backbone/'
KEY_TABLE: list[KeyRow] = [
    (_P + r'embeddings\.word_embeddings\.weight', _B + 'embeddings/word/embedding', None),
    (_P + r'embeddings\.position_embeddings\.weight', _B + 'embeddings/position/embedding', None),
    (_P + r'embeddings\.token_type_embeddings\.weight', _B + 'embeddings/token_type/embedding', None),
    *_ln(_P + r'embeddings\.LayerNorm', _B + 'embeddings/ln'),
    # Index buffers (arange / zeros) that older transformers versions saved; we compute them instead.
    (_P + r'embeddings\.(?:position_ids|token_type_ids)', None, None),
    *_dense(_L + r'attention\.self\.query', _B + r'layer_\1/attention/query'),
    *_dense(_L + r'attention\.self\.key', _B + r'layer_\1/attention/key'),
    *_dense(_L + r'attention\.self\.value', _B + r'layer_\1/attention/value'),
    *_dense(_L + r'attention\.output\.dense', _B + r'layer_\1/attention/out'),
    *_ln(_L + r'attention\.output\.LayerNorm', _B + r'layer_\1/attention_ln'),
    *_dense(_L + r'intermediate\.dense', _B + r'layer_\1/mlp_in'),
    *_dense(_L + r'output\.dense', _B + r'layer_\1/mlp_out'),
    *_ln(_L + r'output\.LayerNorm', _B + r'layer_\1/mlp_ln'),
    *_dense(_P + r'pooler\.dense', _B + 'pooler'),
    # BertForSequenceClassification's head sits on the pooled output, like ours. (RoBERTa's two-layer
    # classifier.dense/out_proj head reads the <s> token without the pooler: deliberately unmatched.)
    *_dense(r'classifier', 'params/head'),
    # Pretraining heads (masked-LM, next-sentence): not part of any downstream model, dropped on purpose.
    (r'cls\.(?:predictions|seq_relationship)\..*', None, None),
    (r'lm_head\..*', None, None),
]


def convert_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: BertConfig,
                          source_name: str = 'checkpoint') -> dict[str, np.ndarray]:
  """HF state dict -> flat ``{collection/path: array}`` for ``merge_pretrained``, checked against ``config``."""
  flat = apply_key_table(state_dict, KEY_TABLE, source_name=source_name)
  word = _B + 'embeddings/word/embedding'
  expected = (config.vocab_size, config.hidden_size)
  if word not in flat:
    raise ConversionError(f"{source_name}: no word embeddings (embeddings.word_embeddings.weight) in the checkpoint")
  if tuple(flat[word].shape) != expected:
    raise ConversionError(f"{source_name}: word embeddings have shape {tuple(flat[word].shape)} but the config says "
                          f"(vocab_size, hidden_size) = {expected}")
  layers = sorted({int(k.split('/')[2][len('layer_'):]) for k in flat if k.startswith(_B + 'layer_')})
  if layers != list(range(config.num_hidden_layers)):
    raise ConversionError(f"{source_name}: checkpoint has layers {layers} but the config says num_hidden_layers = "
                          f"{config.num_hidden_layers}")
  return flat


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> BertEncoder:
  config, path = hf_architecture(cfg)
  return BertEncoder(BertConfig.from_hf(config, path), dtype=dtype)


def layer_regexes(backbone: BertEncoder) -> list:
  n = backbone.config.num_hidden_layers
  return [(r'backbone/embeddings/.*', 0), (r'backbone/layer_(\d+)/.*', 'group+1'), (r'backbone/pooler/.*', n + 1)]


def convert(state, *, cfg, hf_config, source_name):
  return convert_hf_state_dict(state, BertConfig.from_hf(hf_config, source_name), source_name=source_name)


FAMILY = Family(name='bert', inputs='text', variants={'bert': None}, backbone=build_backbone, convert=convert,
                layer_regexes=layer_regexes, example_batch=text_example(with_types=True), hf_model_types=MODEL_TYPES,
                pooling='cls')
