"""GPT-2: numerical parity with ``transformers`` (PyTorch) through ``hf.read_folder`` and the key table.

Random-weight GPT2LMHeadModel / GPT2Model references of small odd shapes (see tests/decoder_refs.py for how
they are randomised). Tolerance: 1e-4 max-abs in float32 on logits (hidden states for the bare backbone) at real
tokens, times the logits' scale when above 1. Batches are right- and left-padded; the HF reference gets the same
positions (cumsum(mask) - 1) as our default.
"""
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from decoder_refs import assert_close, hf_logits, hf_positions, load, merge, padded_batch, randomize  # noqa: E402
from transfer import hf, optim  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import gpt2  # noqa: E402
from transfer.rules import flatten  # noqa: E402

LENGTHS = (9, 5, 2)
BASE = dict(vocab_size=101, n_embd=48, n_head=3, n_layer=3, n_positions=24, initializer_range=0.2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
CONFIGS = {
    'gelu_new-3x48': {},
    # Inverse-layer scaling, reordered/upcast attention, explicit inner size, exact gelu, another epsilon.
    'inverse-layer-gelu': dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, n_inner=40,
                               activation_function='gelu', layer_norm_epsilon=1e-3, n_layer=2),
    # Untied LM head, unscaled attention, 2 heads of 16, relu.
    'untied-unscaled': dict(tie_word_embeddings=False, scale_attn_weights=False, n_embd=32, n_head=2,
                            activation_function='relu', vocab_size=67, initializer_range=0.1),
}


def _reference(name, bare=False, seed=0):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(**{**BASE, **CONFIGS[name]})
  config._attn_implementation = 'eager'
  return randomize((transformers.GPT2Model if bare else transformers.GPT2LMHeadModel)(config), seed)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  ref = _reference(name)
  config, module, variables = load(ref, str(tmp_path), gpt2)
  assert config.tie_word_embeddings == CONFIGS[name].get('tie_word_embeddings', True)
  assert ('lm_head' in variables['params']) == (not config.tie_word_embeddings)
  for side in ('right', 'left'):
    ids, mask = padded_batch(config.vocab_size, LENGTHS, side)
    logits = module.apply(variables, {'input_ids': ids, 'attention_mask': mask})
    assert logits.dtype == jnp.float32 and logits.shape == (*ids.shape, config.vocab_size)
    assert_close(logits, hf_logits(ref, ids, mask), mask, f'{name} {side}-padded logits')


def test_left_padding_gives_the_unpadded_logits(tmp_path):
  """The default positions count real tokens only, so padding on the left changes nothing at real tokens."""
  _, module, variables = load(_reference('gelu_new-3x48'), str(tmp_path), gpt2)
  ids, mask = padded_batch(101, (6, 6), 'left')
  padded_ids = np.concatenate([np.zeros((2, 3), ids.dtype), ids], axis=1)
  padded_mask = np.concatenate([np.zeros((2, 3), mask.dtype), mask], axis=1)
  plain = module.apply(variables, {'input_ids': ids, 'attention_mask': mask})
  padded = module.apply(variables, {'input_ids': padded_ids, 'attention_mask': padded_mask})
  np.testing.assert_allclose(np.asarray(padded)[:, 3:], np.asarray(plain), atol=1e-5)
  # And positions given explicitly override the default: shifting them changes the logits.
  shifted = module.apply(variables, {'input_ids': ids, 'attention_mask': mask,
                                     'positions': np.broadcast_to(np.arange(6) + 2, ids.shape)})
  assert np.abs(np.asarray(shifted) - np.asarray(plain)).max() > 1e-2


def test_bare_gpt2model_checkpoint_loads_the_backbone(tmp_path):
  """GPT2Model saves without the 'transformer.' prefix and without lm_head; the hidden states still match."""
  ref = _reference('gelu_new-3x48', bare=True)
  ref.save_pretrained(str(tmp_path))
  raw, state = hf.read_folder(str(tmp_path))
  assert not any(k.startswith('transformer.') for k in state)
  config = gpt2.GPT2Config.from_hf(raw, 'config.json')
  module = gpt2.causal_lm(config)
  variables = merge(module, gpt2.convert_hf_state_dict(state, config, source_name='bare'))
  ids, mask = padded_batch(config.vocab_size, LENGTHS, 'left')
  hidden, cache = module.apply(variables, ids, mask, method=lambda m, i, a: m.backbone(i, a))
  assert cache is None
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(hf_positions(mask))).last_hidden_state.numpy()
  assert_close(hidden, expected, mask, 'hidden states')


def _state(name='gelu_new-3x48'):
  ref = _reference(name)
  return ref, {k: v.numpy() for k, v in ref.state_dict().items()}


def test_key_table_drops_buffers_and_refuses_unknown_keys():
  ref, state = _state()
  config = gpt2.GPT2Config.from_hf(ref.config.to_dict())
  clean = gpt2.convert_hf_state_dict(state, config, source_name='clean')
  # Old checkpoints carry the causal-mask buffers and a copy of wte as lm_head.weight: dropped.
  state['transformer.h.0.attn.bias'] = np.tril(np.ones((1, 1, 24, 24), np.float32))
  state['transformer.h.0.attn.masked_bias'] = np.array(-1e4, np.float32)
  state['lm_head.weight'] = state['transformer.wte.weight']
  flat = gpt2.convert_hf_state_dict(state, config, source_name='old')
  assert sorted(flat) == sorted(clean) and 'params/lm_head/kernel' not in flat
  # Conv1D weights are already (in, out): loaded as they are.
  np.testing.assert_array_equal(flat['params/backbone/h_1/attn/c_attn/kernel'],
                                state['transformer.h.1.attn.c_attn.weight'])
  with pytest.raises(ConversionError, match='transformer.h.0.crossattention.c_attn.weight'):
    gpt2.convert_hf_state_dict({**state, 'transformer.h.0.crossattention.c_attn.weight': np.zeros((48, 96))},
                               config, source_name='x')
  with pytest.raises(ConversionError, match='lm_head.weight differs'):
    gpt2.convert_hf_state_dict({**state, 'lm_head.weight': state['transformer.wte.weight'] + 1}, config,
                               source_name='x')
  fewer = {k: v for k, v in state.items() if not k.startswith('transformer.h.2.')}
  with pytest.raises(ConversionError, match=r'blocks \[0, 1\].*n_layer = 3'):
    gpt2.convert_hf_state_dict(fewer, config, source_name='x')
  with pytest.raises(ConversionError, match=r'\(vocab_size, n_embd\) = \(102, 48\)'):
    gpt2.convert_hf_state_dict(state, gpt2.GPT2Config.from_hf({**ref.config.to_dict(), 'vocab_size': 102}),
                               source_name='x')


def test_untied_checkpoint_needs_its_lm_head():
  ref, state = _state('untied-unscaled')
  config = gpt2.GPT2Config.from_hf(ref.config.to_dict())
  flat = gpt2.convert_hf_state_dict(state, config, source_name='untied')
  np.testing.assert_array_equal(flat['params/lm_head/kernel'], state['lm_head.weight'].T)
  del state['lm_head.weight']
  with pytest.raises(ConversionError, match='params/lm_head/kernel'):
    merge(gpt2.causal_lm(config), gpt2.convert_hf_state_dict(state, config, source_name='x'))


@pytest.mark.parametrize('field,value,match', [
    ('add_cross_attention', True, "'add_cross_attention' is true"),
    ('activation_function', 'quick_gelu', "'activation_function' must be one of"),
    ('n_head', 5, "'n_head' must be positive and divide n_embd 48"),
    ('model_type', 'gpt_neo', "'model_type' must be one of"),
    ('resid_pdrop', 1.0, "'resid_pdrop' is out of range"),
    ('scale_attn_weights', 'yes', "'scale_attn_weights' must be a bool"),
])
def test_config_refusals_name_the_field(field, value, match):
  config = {**transformers.GPT2Config(**BASE).to_dict(), field: value}
  with pytest.raises(ValueError, match=match):
    gpt2.GPT2Config.from_hf(config, 'some/config.json')


def test_config_defaults_follow_transformers():
  """A config.json that lists only model_type gets GPT2Config's defaults (the 124M model's shapes)."""
  config = gpt2.GPT2Config.from_hf({'model_type': 'gpt2'})
  assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
          config.max_position_embeddings, config.intermediate_size) == (50257, 768, 12, 12, 1024, 3072)
  assert config.tie_word_embeddings and config.activation_function == 'gelu_new'


def test_dropout_in_train_mode_only():
  config = gpt2.GPT2Config.from_hf({**transformers.GPT2Config(**{**BASE, 'resid_pdrop': 0.3, 'attn_pdrop': 0.3,
                                                                  'embd_pdrop': 0.3}).to_dict()})
  module = gpt2.causal_lm(config)
  ids, mask = padded_batch(config.vocab_size, LENGTHS, 'right')
  batch = {'input_ids': ids, 'attention_mask': mask}
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), batch)
  apply = jax.jit(module.apply, static_argnames=('train', 'backbone_train'))
  evaluated = np.asarray(apply(variables, batch))
  train = lambda seed: np.asarray(apply(variables, batch, train=True, rngs={'dropout': jax.random.PRNGKey(seed)}))
  assert np.abs(train(1) - evaluated).max() > 1e-3
  assert np.abs(train(1) - train(2)).max() > 1e-3
  np.testing.assert_array_equal(train(1), train(1))
  # backbone_train=False switches dropout off even with train=True (a frozen backbone).
  np.testing.assert_allclose(apply(variables, batch, train=True, backbone_train=False), evaluated, atol=1e-6)


def test_layer_regexes_give_every_parameter_its_depth():
  for name in ('gelu_new-3x48', 'untied-unscaled'):
    config = gpt2.GPT2Config.from_hf(transformers.GPT2Config(**{**BASE, **CONFIGS[name]}).to_dict())
    module = gpt2.causal_lm(config)
    batch = {'input_ids': np.zeros((1, 4), np.int32), 'attention_mask': np.ones((1, 4), np.int32)}
    paths = [p.split('/', 1)[1] for p in flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), batch)))]
    depths, top = optim.layer_depths(paths, gpt2.layer_regexes(module.backbone))
    n = config.num_hidden_layers
    assert depths['backbone/wte/embedding'] == depths['backbone/wpe/embedding'] == 0
    assert depths['backbone/h_0/attn/c_attn/kernel'] == 1 and depths[f'backbone/h_{n - 1}/c_fc/bias'] == n
    assert depths['backbone/ln_f/scale'] == n + 1 and top == n + 2
    if not config.tie_word_embeddings:
      assert depths['lm_head/kernel'] == n + 1
    assert all(any(re.fullmatch(r, p) for r, _ in gpt2.layer_regexes(module.backbone)) for p in paths)


def test_saved_config_json_round_trip(tmp_path):
  """The config.json transformers 5 writes is read field for field."""
  transformers.GPT2Config(**{**BASE, **CONFIGS['inverse-layer-gelu']}).save_pretrained(str(tmp_path))
  with open(os.path.join(tmp_path, 'config.json')) as f:
    config = gpt2.GPT2Config.from_hf(json.load(f))
  assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.activation_function,
          config.layer_norm_epsilon, config.scale_attn_by_inverse_layer_idx, config.eos_token_id) == (
              48, 2, 40, 'gelu', 1e-3, True, (0,))
