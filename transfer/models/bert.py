"""BERT-family text encoder in Flax (BERT, RoBERTa), plus the key table that loads Hugging Face checkpoints and,
read backwards, writes a BERT classifier out as a ``BertForSequenceClassification`` (``to_hf_sequence_classification``).

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
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transfer.convert import ConversionError, KeyRow, apply_key_table
from transfer.models.classifier import TEXT_POOLINGS
from transfer.models.family import Family, hf_architecture, text_example
from transfer.models.layers import batch_sharded, dense_dot_general, remat
from transfer.models.lora import is_adapter

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
                                  dot_general=dense_dot_general, name=name)
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
  def __call__(self, x, mask_bias, train: bool):
    c = self.config
    dense = lambda feats, name: nn.Dense(feats, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT,
                                         dot_general=dense_dot_general, name=name)
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
  ``remat``: ``config.model.remat`` for the layers (``transfer.models.layers.remat``).
  """
  config: BertConfig
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
    c = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    # (N, 1, 1, L) additive bias over keys: 0 where attended, the float32 minimum where padded (see module doc).
    keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = batch_sharded(Embeddings(c, self.dtype, name='embeddings')(input_ids, token_type_ids, train=train))
    layer = remat(Layer, self.remat, static_argnums=(3,))   # train
    for i in range(c.num_hidden_layers):
      x = layer(c, self.dtype, name=f'layer_{i}')(x, mask_bias, train)
    pooled = nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_INIT,
                      dot_general=dense_dot_general, name='pooler')(x[:, 0])
    return x, jnp.tanh(pooled)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion from Hugging Face (BertModel, BertForSequenceClassification, RobertaModel, pretraining).

def _transpose(w: np.ndarray) -> np.ndarray:
  """nn.Linear (out, in) weight <-> flax (in, out) kernel; its own inverse, so export reads the table backwards."""
  return np.ascontiguousarray(w.T)


def _dense(source: str, target: str) -> list[KeyRow]:
  """nn.Linear (out, in) weight -> flax (in, out) kernel."""
  return [(source + r'\.weight', target + '/kernel', _transpose),
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
# Export to Hugging Face: KEY_TABLE read backwards, and a classifier written as a BertForSequenceClassification.

_EXPORT_PREFIX = 'bert.'  # how _P is written on export: where BertForSequenceClassification keeps its encoder
_INVERSE_TRANSFORMS = {None: None, _transpose: _transpose}  # a row's transform -> the one that undoes it
_GROUP = re.compile(r'\\(\d)')  # a \1-style group reference in a KEY_TABLE target


def _hf_template(pattern: str) -> str:
  """A KEY_TABLE source regex -> the one key it stands for on export, as an ``re`` expand template.

  The table's regexes use few constructs: ``_P`` (written ``bert.``), ``(\\d+)`` (a layer index, kept as the
  group ``g1``, ``g2``, ...), ``(?:a|b)`` (old and current spellings: the first, current one is written) and
  ``\\.``. Anything else is refused at import, rather than exported under a wrong name."""
  prefix, body = (_EXPORT_PREFIX, pattern[len(_P):]) if pattern.startswith(_P) else ('', pattern)
  numbers = iter(range(1, 100))
  body = re.sub(r'\(\\d\+\)', lambda _: f'\\g<g{next(numbers)}>', body)
  body = re.sub(r'\(\?:(\w*)(?:\|\w*)*\)', lambda m: m.group(1), body)
  template = prefix + body.replace('\\.', '.')
  example = re.sub(r'\\g<g\d+>', '0', template)
  if re.search(r'[\\()\[\]{}?*+|^$]', example) or not re.fullmatch(pattern, example):
    raise ValueError(f"bert.KEY_TABLE: the source regex {pattern!r} is not one fixed key; export cannot invert it")
  return template


def _path_regex(target: str) -> str:
  """A KEY_TABLE target (``params/backbone/layer_\\1/...``) -> a regex over our paths without the collection,
  whose group ``gN`` captures what the source's group N did."""
  if not target.startswith('params/'):
    raise ValueError(f"bert.KEY_TABLE: target {target!r} is not a parameter; export cannot invert it")
  parts, seen = [], set()
  for i, piece in enumerate(_GROUP.split(target[len('params/'):])):
    if i % 2 == 0:
      parts.append(re.escape(piece))
    else:
      parts.append(f'(?P=g{piece})' if piece in seen else f'(?P<g{piece}>\\d+)')
      seen.add(piece)
  return ''.join(parts)


def _export_table(table: list[KeyRow]) -> list[KeyRow]:
  """``table`` backwards: rows from our param paths (no collection prefix) to HF keys, with inverse transforms."""
  rows = []
  for source, target, transform in table:
    if target is None:  # dropped on import (buffers, pretraining heads): nothing of ours to write back
      continue
    if transform not in _INVERSE_TRANSFORMS:
      raise ValueError(f"bert.KEY_TABLE: the row for {source!r} has a transform with no declared inverse")
    path, key = _path_regex(target), _hf_template(source)
    if set(re.findall(r'\\g<(g\d+)>', key)) - set(re.compile(path).groupindex):
      raise ValueError(f"bert.KEY_TABLE: target {target!r} drops a group its source {source!r} needs")
    rows.append((path, key, _INVERSE_TRANSFORMS[transform]))
  return rows


# Our paths -> BertForSequenceClassification keys, for apply_key_table; derived, never edited by hand.
EXPORT_KEY_TABLE: list[KeyRow] = _export_table(KEY_TABLE)
_EXPORT_ROWS = [(re.compile(path), key) for path, key, _ in EXPORT_KEY_TABLE]
EXPORTED_POOLINGS = ('cls', 'first')  # the TextClassifier poolings BertForSequenceClassification computes
FIRST_POOLER_EPS = 1e-4  # 'first' export: the pooler's scale (see to_hf_sequence_classification)


def _relative(path: str) -> str:
  return path[len('params/'):] if path.startswith('params/') else path


def hf_key(path: str) -> str:
  """Our param path (``backbone/layer_0/attention/query/kernel``; a ``params/`` prefix is accepted) -> its key in a
  BertForSequenceClassification state dict (``bert.encoder.layer.0.attention.self.query.weight``), by KEY_TABLE
  read backwards. A path with no counterpart (a LoRA adapter, a layer BERT does not have) is a ValueError."""
  relative = _relative(path)
  for pattern, key in _EXPORT_ROWS:
    match = pattern.fullmatch(relative)
    if match:
      return match.expand(key)
  raise ValueError(f"param {path!r} has no Hugging Face BertForSequenceClassification counterpart (no row of "
                   "bert.KEY_TABLE produces it)")


def hf_module(path: str) -> str:
  """The HF module that holds ``path``'s tensor (``bert.encoder.layer.0.attention.self.query``): what PEFT names
  a LoRA adapter after (``base_model.model.<module>.lora_A.weight``)."""
  return hf_key(path).rsplit('.', 1)[0]


def _label_fields(class_names: Sequence[str] | None) -> dict:
  """The config.json fields that describe the head's outputs."""
  if class_names is None:
    return dict(num_labels=1, id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0}, problem_type='regression')
  names = list(class_names)
  if len(names) < 2 or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
    raise ValueError(f"class_names must be two or more distinct strings (None for a regression head), got {names!r}")
  return dict(num_labels=len(names), id2label={str(i): n for i, n in enumerate(names)},
              label2id={n: i for i, n in enumerate(names)}, problem_type='single_label_classification')


def _listing(paths, limit: int = 8) -> str:
  paths = sorted(paths)
  return ', '.join(paths[:limit]) + (f' (+{len(paths) - limit} more)' if len(paths) > limit else '')


def to_hf_sequence_classification(flat: Mapping[str, Any], *, hf_config: Mapping[str, Any],
                                  class_names: Sequence[str] | None, pooling: str,
                                  pooler_eps: float = FIRST_POOLER_EPS) -> tuple[dict, dict[str, np.ndarray]]:
  """A TextClassifier on a BERT backbone -> ``(config.json, state dict)`` of a ``BertForSequenceClassification``.

  ``flat``: its params (``backbone/...``, ``head/kernel`` (H, K), ``head/bias`` (K,)), with or without the
  ``params/`` prefix; LoRA adapters must be merged first (``lora.merge``). Every param must have an HF name and
  the shapes of the model ``hf_config`` (the backbone's config.json) describes, else a ValueError lists them.
  config.json is ``hf_config`` with the architecture, ``id2label``/``label2id`` from ``class_names`` (None: one
  output, ``problem_type='regression'``) and dtype float32; tensors are float32 in PyTorch's (out, in) layout.

  transformers' classifier always reads ``tanh(pooler(h[:, 0]))``, so by ``pooling``:
  - 'cls': exactly that; our pooler is written as it is.
  - 'first' (``h[:, 0]`` itself; our pooler is unused and not written): a pooler that is nearly the identity
    inside tanh, ``pooler_eps * I`` and bias 0, with the classifier weight divided by ``pooler_eps``. As
    ``|tanh x - x| <= |x|^3 / 3``, logit k differs from ours by at most ``pooler_eps^2 / 3 * sum_j |W_kj| |h_j|^3``
    (W the head kernel, h the first token's last hidden state): at 1e-4 that is 3.3e-9 times the sum, under 1e-6
    while the sum is under 300 (a final LayerNorm's outputs are a few units). Both scalings are multiplications,
    so float32 rounding stays relative, as in our own forward pass; 1e-4 also keeps ``W / eps`` far from float16's
    overflow should the folder be loaded in half precision. Tests measure the error against transformers.
  - 'mean', 'last': no transformers sequence-classification class computes them; refused.
  """
  if pooling not in TEXT_POOLINGS:
    raise ValueError(f"config.model.pooling={pooling!r} is not one of {TEXT_POOLINGS}")
  if pooling not in EXPORTED_POOLINGS:
    raise ValueError(f"config.model.pooling={pooling!r} has no transformers equivalent: BertForSequenceClassification "
                     f"classifies tanh(pooler(h[:, 0])); the poolings that export are {EXPORTED_POOLINGS}")
  if not 0 < pooler_eps <= 1:
    raise ValueError(f"pooler_eps={pooler_eps!r}: must be in (0, 1], small enough for tanh to be near-linear")
  config = BertConfig.from_hf(hf_config, 'hf_config')
  if config.model_type != 'bert':
    raise ValueError(f"hf_config: model_type {config.model_type!r}: only 'bert' backbones export as "
                     "BertForSequenceClassification (RoBERTa numbers positions differently and has its own head)")
  labels = _label_fields(class_names)

  params = {}
  for key, value in flat.items():
    path = _relative(key)
    if path in params:
      raise ValueError(f"params hold {path!r} both with and without the 'params/' prefix")
    params[path] = np.asarray(value, np.float32)
  if pooling == 'first':
    params = {p: v for p, v in params.items() if not p.startswith('backbone/pooler/')}
  if adapters := [p for p in params if is_adapter(p)]:
    raise ValueError(f"LoRA adapters must be merged into their kernels before export (transfer.models.lora.merge): "
                     f"{_listing(adapters)}")
  if unmapped := [p for p in params if not any(pattern.fullmatch(p) for pattern, _ in _EXPORT_ROWS)]:
    raise ValueError(f"params with no BertForSequenceClassification counterpart: {_listing(unmapped)}")

  # The shapes of the model hf_config describes, from an abstract init (nothing allocated), plus the head's.
  ids = np.zeros((1, 1), np.int32)
  encoder = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.PRNGKey(0), ids, ids + 1, ids))
  expected = {'backbone/' + '/'.join(k): v.shape for k, v in traverse_util.flatten_dict(encoder['params']).items()}
  expected.update({'head/kernel': (config.hidden_size, labels['num_labels']), 'head/bias': (labels['num_labels'],)})
  if pooling == 'first':
    expected = {p: s for p, s in expected.items() if not p.startswith('backbone/pooler/')}
  problems = []
  if missing := set(expected) - set(params):
    problems.append(f"missing {_listing(missing)}")
  if unexpected := set(params) - set(expected):
    problems.append(f"unexpected {_listing(unexpected)}")
  if changed := [p for p in set(params) & set(expected) if params[p].shape != tuple(expected[p])]:
    problems.append('mis-shaped ' + ', '.join(f"{p} {params[p].shape} (model: {tuple(expected[p])})"
                                              for p in sorted(changed)))
  if problems:
    raise ValueError(f"params do not fit the BertForSequenceClassification hf_config describes ({labels['num_labels']} "
                     f"outputs): " + '; '.join(problems))

  state = apply_key_table(params, EXPORT_KEY_TABLE, source_name='params')
  if pooling == 'first':
    eps = np.float32(pooler_eps)  # the same float32 value scales both sides, so only tanh's curvature remains
    state[hf_key('backbone/pooler/kernel')] = np.eye(config.hidden_size, dtype=np.float32) * eps
    state[hf_key('backbone/pooler/bias')] = np.zeros(config.hidden_size, np.float32)
    state[hf_key('head/kernel')] = state[hf_key('head/kernel')] / eps
  config_json = {**hf_config, 'architectures': ['BertForSequenceClassification'], **labels, 'dtype': 'float32'}
  if 'torch_dtype' in config_json:  # its name before transformers 5
    config_json['torch_dtype'] = 'float32'
  return config_json, {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# The family record (transfer/models/family.py).

def build_backbone(cfg, dtype) -> BertEncoder:
  config, path = hf_architecture(cfg)
  return BertEncoder(BertConfig.from_hf(config, path), dtype=dtype, remat=cfg.get('remat', 'none'))


def layer_regexes(backbone: BertEncoder) -> list:
  n = backbone.config.num_hidden_layers
  return [(r'backbone/embeddings/.*', 0), (r'backbone/layer_(\d+)/.*', 'group+1'), (r'backbone/pooler/.*', n + 1)]


def convert(state, *, cfg, hf_config, source_name):
  return convert_hf_state_dict(state, BertConfig.from_hf(hf_config, source_name), source_name=source_name)


# Tensor parallelism (config.sharding_rules value 'tensor', transfer/sharding.py): q/k/v and mlp_in split over
# their output units (heads, hidden), out and mlp_out over their input units.
TENSOR_PARALLEL = [
    (r'backbone/layer_\d+/attention/(query|key|value)/kernel', ('fsdp', 'tensor')),
    (r'backbone/layer_\d+/attention/(query|key|value)/bias', ('tensor',)),
    (r'backbone/layer_\d+/attention/out/kernel', ('tensor', 'fsdp')),
    (r'backbone/layer_\d+/mlp_in/kernel', ('fsdp', 'tensor')),
    (r'backbone/layer_\d+/mlp_in/bias', ('tensor',)),
    (r'backbone/layer_\d+/mlp_out/kernel', ('tensor', 'fsdp')),
]


FAMILY = Family(name='bert', inputs='text', variants={'bert': None}, backbone=build_backbone, convert=convert,
                layer_regexes=layer_regexes, tensor_parallel=TENSOR_PARALLEL, example_batch=text_example(with_types=True), hf_model_types=MODEL_TYPES,
                pooling='cls', to_hf_classifier=to_hf_sequence_classification,
                hf_weight=lambda path, *, hf_config: (hf_key(path), False),
                cpu_library_fusions=())   # YNNPACK would take attention cores as slow ops (layers.compiler_options)
