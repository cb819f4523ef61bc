"""Llama family (Llama, Qwen2, Mistral): numerical parity with ``transformers`` through ``hf.read_folder`` and the
key table, and refusal of the variants the module does not implement.

Random-weight *ForCausalLM references of small odd shapes (randomised as described in tests/decoder_refs.py):
grouped-query attention, RoPE default / linear / llama3, tied and untied heads, biases, explicit head_dim.
Tolerance: 1e-4 max-abs in float32 on logits at real tokens, times the logits' scale when above 1; right- and
left-padded batches, the HF reference given the same positions (cumsum(mask) - 1) as our default.
"""
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402

from decoder_refs import assert_close, hf_logits, hf_positions, load, merge, padded_batch, randomize  # noqa: E402
from transfer import hf, optim  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import decoder_common, llama  # noqa: E402
from transfer.rules import flatten  # noqa: E402

LENGTHS = (11, 6, 3)
LLAMA = dict(vocab_size=101, hidden_size=48, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    # GQA 4 heads / 2 kv heads, linear RoPE scaling, untied head.
    'llama-gqa-linear-untied': ('llama', dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                                               'rope_theta': 500.0})),
    # llama3 RoPE (the low-frequency band scaled, the middle blended: theta and lengths chosen so all three
    # bands occur for head_dim 10), tied head, q/k/v/o and MLP biases, head_dim given (10 * 4 != 48).
    'llama-llama3-tied-bias': ('llama', dict(
        rope_parameters={'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 32, 'rope_theta': 1000.0},
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=10, num_hidden_layers=3)),
    # Qwen2: q/k/v bias (no o bias), tied, 3 kv heads of 6 query heads, default RoPE.
    'qwen2-bias-tied': ('qwen2', dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=3,
                                      tie_word_embeddings=True, rope_parameters={'rope_type': 'default',
                                                                                 'rope_theta': 10000.0})),
    # Mistral without a sliding window, multi-query (1 kv head), untied.
    'mistral-mqa': ('mistral', dict(num_key_value_heads=1, sliding_window=None, hidden_act='silu')),
}
CLASSES = {'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM, transformers.LlamaModel),
           'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, transformers.Qwen2Model),
           'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM, transformers.MistralModel)}


def _hf_config(name):
  kind, overrides = CONFIGS[name]
  config = CLASSES[kind][0](**{**LLAMA, **overrides})
  config._attn_implementation = 'eager'
  return config


def _reference(name, bare=False, seed=0):
  torch.manual_seed(seed)
  _, lm_cls, bare_cls = CLASSES[CONFIGS[name][0]]
  return randomize((bare_cls if bare else lm_cls)(_hf_config(name)), seed)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  ref = _reference(name)
  config, module, variables = load(ref, str(tmp_path), llama)
  kind, overrides = CONFIGS[name]
  assert config.model_type == kind and config.tie_word_embeddings == overrides.get('tie_word_embeddings', False)
  assert ('lm_head' in variables['params']) == (not config.tie_word_embeddings)
  for side in ('right', 'left'):
    ids, mask = padded_batch(config.vocab_size, LENGTHS, side)
    logits = module.apply(variables, {'input_ids': ids, 'attention_mask': mask})
    assert_close(logits, hf_logits(ref, ids, mask), mask, f'{name} {side}-padded logits')


def test_llama3_rope_uses_all_three_bands():
  """The llama3 test config really exercises the scaled, blended and kept frequency bands."""
  config = llama.LlamaConfig.from_hf(_hf_config('llama-llama3-tied-bias').to_dict())
  plain = decoder_common.rope_inverse_frequencies(config.head_dim, config.rope_theta)
  ratio = plain / config.inverse_frequencies
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, 4).any()
  assert ((ratio > 1.01) & (ratio < 3.99)).any(), ratio


def test_bare_model_checkpoint_loads_the_backbone(tmp_path):
  """LlamaModel saves without the 'model.' prefix and without lm_head; the hidden states still match."""
  ref = _reference('qwen2-bias-tied', bare=True)
  ref.save_pretrained(str(tmp_path))
  raw, state = hf.read_folder(str(tmp_path))
  assert not any(k.startswith('model.') for k in state)
  config = llama.LlamaConfig.from_hf(raw, 'config.json')
  module = llama.causal_lm(config)
  variables = merge(module, llama.convert_hf_state_dict(state, config, source_name='bare'))
  ids, mask = padded_batch(config.vocab_size, LENGTHS, 'left')
  hidden, _ = module.apply(variables, ids, mask, method=lambda m, i, a: m.backbone(i, a))
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(hf_positions(mask))).last_hidden_state.numpy()
  assert_close(hidden, expected, mask, 'hidden states')


def test_old_rope_scaling_layout_reads_the_same():
  """transformers 4 wrote ``rope_scaling`` (with 'type' or 'rope_type') beside a top-level ``rope_theta``;
  transformers 5 writes ``rope_parameters``. Both give the same module config."""
  new = llama.LlamaConfig.from_hf({**LLAMA, 'model_type': 'llama', 'rope_parameters': {
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16, 'rope_theta': 5e5}})
  old = llama.LlamaConfig.from_hf({**LLAMA, 'model_type': 'llama', 'rope_theta': 5e5, 'rope_scaling': {
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 16}})
  assert new == old and new.rope_theta == 5e5 and new.rope_original_max_positions == 16
  linear = llama.LlamaConfig.from_hf({**LLAMA, 'model_type': 'llama', 'rope_scaling': {'type': 'linear',
                                                                                      'factor': 2}})
  assert (linear.rope_type, linear.rope_factor, linear.rope_theta) == ('linear', 2.0, 10000.0)
  # No RoPE fields at all (older Llama configs): default RoPE, theta 10000; transformers agrees.
  bare = llama.LlamaConfig.from_hf({**LLAMA, 'model_type': 'llama', 'rope_scaling': None})
  assert (bare.rope_type, bare.rope_theta) == ('default', 10000.0)
  assert transformers.LlamaConfig(**{**LLAMA, 'rope_scaling': None}).rope_parameters['rope_theta'] == 10000.0


def _raw(kind='llama', **overrides):
  return {**LLAMA, 'model_type': kind, **overrides}


@pytest.mark.parametrize('raw,match', [
    (_raw(rope_scaling={'rope_type': 'yarn', 'factor': 4.0}), r"'rope_scaling.rope_type' is 'yarn'"),
    (_raw(rope_parameters={'rope_type': 'dynamic', 'factor': 2.0}), r"'rope_parameters.rope_type' is 'dynamic'"),
    (_raw(rope_parameters={'rope_type': 'linear'}), r"'rope_parameters.factor' must be positive, got None"),
    (_raw(rope_parameters={'rope_type': 'default', 'partial_rotary_factor': 0.5}),
     r"'rope_parameters.partial_rotary_factor' is 0.5"),
    (_raw(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 4.0, 'high_freq_factor': 1.0}),
     r"'rope_scaling.high_freq_factor' must be larger than low_freq_factor"),
    (_raw(rope_parameters={'full_attention': {'rope_type': 'default'}}),
     r"'rope_parameters' holds per-layer-type RoPE settings \['full_attention'\]"),
    (_raw('mistral', sliding_window=16), r"'sliding_window' is 16, smaller than max_position_embeddings 64"),
    (_raw('qwen2', use_sliding_window=True, sliding_window=16, max_window_layers=1),
     r"'use_sliding_window' is true with sliding_window 16"),
    (_raw('qwen2', use_sliding_window=True, sliding_window=16, layer_types=['full_attention', 'sliding_attention']),
     r"'use_sliding_window' is true"),
    (_raw('mixtral'), r"'model_type' must be one of \('llama', 'qwen2', 'mistral'\)"),
    (_raw('mistral', num_local_experts=8), r"'num_local_experts' is set \(8\): mixture-of-experts"),
    (_raw(hidden_act='gelu_fast'), r"'hidden_act' must be one of"),
    (_raw(num_key_value_heads=3), r"'num_key_value_heads' must be positive and divide num_attention_heads 4"),
    (_raw(head_dim=7), r"'head_dim' must be positive and even"),
    (_raw(hidden_size=44), r"'num_attention_heads' must divide hidden_size 44"),
    (_raw(layer_types=['full_attention', 'chunked_attention']), r"'layer_types' may only hold"),
    (_raw(vocab_size=None), r"'vocab_size' must be an integer, got None"),
])
def test_config_refusals_name_the_field(raw, match):
  with pytest.raises(ValueError, match=match):
    llama.LlamaConfig.from_hf(raw, 'some/config.json')


def test_harmless_sliding_window_settings_are_accepted():
  """Windows that mask nothing within the context, and Qwen2 windows that are switched off (Qwen2.5's config)."""
  assert llama.LlamaConfig.from_hf(_raw('mistral', sliding_window=None)).model_type == 'mistral'
  assert llama.LlamaConfig.from_hf(_raw('mistral', sliding_window=64)).model_type == 'mistral'
  llama.LlamaConfig.from_hf(_raw('qwen2', use_sliding_window=False, sliding_window=16, max_window_layers=1))
  llama.LlamaConfig.from_hf(_raw('qwen2', use_sliding_window=True, sliding_window=16, max_window_layers=2))
  # transformers 5's own qwen2 config.json (layer_types listed) loads.
  llama.LlamaConfig.from_hf(transformers.Qwen2Config(**LLAMA).to_dict())


def test_biases_follow_the_model_type():
  for kind, qkv, o, mlp in (('llama', True, True, True), ('qwen2', True, False, False),
                            ('mistral', False, False, False)):
    config = llama.LlamaConfig.from_hf(_raw(kind, attention_bias=True, mlp_bias=True))
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (qkv, o, mlp), kind
  assert llama.LlamaConfig.from_hf(_raw('qwen2')).qkv_bias   # Qwen2 always has q/k/v biases


def test_key_table_is_strict():
  ref = _reference('llama-gqa-linear-untied')
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  config = llama.LlamaConfig.from_hf(ref.config.to_dict())
  clean = llama.convert_hf_state_dict(state, config, source_name='clean')
  np.testing.assert_array_equal(clean['params/backbone/layers_1/self_attn/k_proj/kernel'],
                                state['model.layers.1.self_attn.k_proj.weight'].T)
  # RoPE buffers of older checkpoints are dropped.
  old = {**state, 'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(6, np.float32)}
  assert sorted(llama.convert_hf_state_dict(old, config, source_name='old')) == sorted(clean)
  # A bias the config does not have is an unknown key, not silently dropped.
  with pytest.raises(ConversionError, match=r'model.layers.0.self_attn.q_proj.bias'):
    llama.convert_hf_state_dict({**state, 'model.layers.0.self_attn.q_proj.bias': np.zeros(48, np.float32)},
                                config, source_name='x')
  # MoE expert weights are unknown keys too.
  with pytest.raises(ConversionError, match=r'block_sparse_moe'):
    llama.convert_hf_state_dict({**state, 'model.layers.0.block_sparse_moe.gate.weight': np.zeros((8, 48))},
                                config, source_name='x')
  fewer = {k: v for k, v in state.items() if not k.startswith('model.layers.1.')}
  with pytest.raises(ConversionError, match=r'layers \[0\].*num_hidden_layers = 2'):
    llama.convert_hf_state_dict(fewer, config, source_name='x')
  tied = llama.LlamaConfig.from_hf({**ref.config.to_dict(), 'tie_word_embeddings': True})
  with pytest.raises(ConversionError, match='lm_head.weight differs from embed_tokens.weight'):
    llama.convert_hf_state_dict(state, tied, source_name='x')


def test_layer_regexes_give_every_parameter_its_depth():
  config = llama.LlamaConfig.from_hf(_hf_config('llama-gqa-linear-untied').to_dict())
  module = llama.causal_lm(config)
  batch = {'input_ids': np.zeros((1, 4), np.int32), 'attention_mask': np.ones((1, 4), np.int32)}
  paths = [p.split('/', 1)[1] for p in flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), batch)))]
  regexes = llama.layer_regexes(module.backbone)
  assert all(any(re.fullmatch(r, p) for r, _ in regexes) for p in paths)
  depths, top = optim.layer_depths(paths, regexes)
  assert depths['backbone/embed_tokens/embedding'] == 0
  assert depths['backbone/layers_0/self_attn/q_proj/kernel'] == 1
  assert depths['backbone/layers_1/mlp/down_proj/kernel'] == 2
  assert depths['backbone/norm/scale'] == depths['lm_head/kernel'] == 3 and top == 4


def test_attention_dropout_in_train_mode_only():
  config = llama.LlamaConfig.from_hf(_raw(attention_dropout=0.3))
  module = llama.causal_lm(config)
  ids, mask = padded_batch(config.vocab_size, LENGTHS, 'right')
  batch = {'input_ids': ids, 'attention_mask': mask}
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), batch)
  apply = jax.jit(module.apply, static_argnames=('train',))
  evaluated = np.asarray(apply(variables, batch))
  train = lambda seed: np.asarray(apply(variables, batch, train=True, rngs={'dropout': jax.random.PRNGKey(seed)}))
  assert np.abs(train(1) - evaluated).max() > 1e-4 and np.abs(train(1) - train(2)).max() > 1e-4
  np.testing.assert_array_equal(train(3), train(3))
