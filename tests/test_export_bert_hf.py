"""A BERT text classifier exported as a transformers BertForSequenceClassification (to_hf_sequence_classification).

Reference: tests/test_bert.py's random-weight BertModel (LayerNorm affines and biases randomised, peaked attention),
saved with ``save_pretrained`` and loaded into our TextClassifier with a random head (a zero head would hide a
transposed or misplaced classifier). Each export is written as config.json + model.safetensors and loaded back with
``AutoModelForSequenceClassification``; both run one batch with padded rows and token types.
Tolerance: 1e-4 max-abs on the float32 logits, for 'cls' (an exact mapping) and 'first' (a near-linear pooler,
``FIRST_POOLER_EPS`` = 1e-4, whose documented truncation bound is checked at a large eps where it is measurable).
Measured: 'cls' 1.3e-6, 'first' 2.1e-6 (its bound at 1e-4: 8e-8, so float32 noise), regression 4.6e-7, on logits of
a few units; at eps 0.05 the 'first' error is 1.4e-2 against a bound of 2.1e-2.
"""
import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'  # never download; everything here is local

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import ml_collections  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from test_bert import _batch, _reference  # noqa: E402
from transfer import models, pretrained, rules  # noqa: E402
from transfer.convert import merge_pretrained  # noqa: E402
from transfer.models import bert  # noqa: E402

TOL = 1e-4  # float32 max-abs on logits, see module docstring
NAMES = ['negative', 'neutral', 'positive']


@pytest.fixture(scope='module')
def backbone_folder(tmp_path_factory):
  """A random BertModel (vocab 99, hidden 32, 2 layers, 4 heads, two token types) as save_pretrained writes it."""
  folder = str(tmp_path_factory.mktemp('bert'))
  _reference('bert-gelu-types').save_pretrained(folder)
  return folder


def _classifier(folder, pooling, outputs, seed=0):
  """(our TextClassifier, its flat ``params/...``): the saved backbone and a random head of ``outputs`` units."""
  cfg = ml_collections.ConfigDict({'name': 'bert', 'pretrained': folder, 'pooling': pooling})
  module = models.build(cfg, outputs)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), models.example_batch('bert')))
  init = {k: np.zeros(v.shape, v.dtype) for k, v in rules.flatten(shapes).items()}
  flat, report = merge_pretrained(init, pretrained.convert_checkpoint(cfg, source_name=folder),
                                  should_load=lambda p: not p.startswith('head/'), source_name=folder)
  assert sorted(report['kept_init']) == ['params/head/bias', 'params/head/kernel']
  rng = np.random.default_rng(seed)
  flat['params/head/kernel'] = rng.normal(0.0, 0.5, init['params/head/kernel'].shape).astype(np.float32)
  flat['params/head/bias'] = rng.normal(0.0, 0.5, (outputs,)).astype(np.float32)
  return module, flat


def _token_batch(hf_config):
  """Three rows, two of them padded, with random token types (test_bert's batch)."""
  ids, mask, types = _batch(bert.BertConfig.from_hf(hf_config, 'config.json'))
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}


def _write(folder, config_json, state):
  os.makedirs(folder)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config_json, f, indent=2)
  save_file(state, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
  return folder


def _transformers_logits(folder, batch):
  """Logits of the exported folder in transformers; every tensor of the model must come from the file."""
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
  assert type(model).__name__ == 'BertForSequenceClassification'
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  with torch.no_grad():
    logits = model.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  return model, logits


def test_hf_key_names_the_bert_for_sequence_classification_tensors():
  assert bert.hf_key('backbone/layer_0/attention/query/kernel') == 'bert.encoder.layer.0.attention.self.query.weight'
  assert bert.hf_key('params/backbone/layer_1/mlp_ln/scale') == 'bert.encoder.layer.1.output.LayerNorm.weight'
  assert bert.hf_key('backbone/embeddings/ln/bias') == 'bert.embeddings.LayerNorm.bias'
  assert bert.hf_key('backbone/pooler/kernel') == 'bert.pooler.dense.weight'
  assert bert.hf_key('head/bias') == 'classifier.bias'
  assert bert.hf_module('backbone/layer_1/attention/value/kernel') == 'bert.encoder.layer.1.attention.self.value'
  assert bert.hf_module('backbone/embeddings/word/embedding') == 'bert.embeddings.word_embeddings'
  for path in ('backbone/layer_0/attention/query/lora_a', 'backbone/layer_0/rel_pos/kernel', 'head/scale'):
    with pytest.raises(ValueError, match=f"'{path}' has no Hugging Face"):
      bert.hf_key(path)


@pytest.mark.parametrize('pooling,class_names', [('cls', NAMES), ('first', NAMES), ('cls', None)],
                         ids=['cls', 'first', 'regression'])
def test_export_matches_transformers(backbone_folder, tmp_path, pooling, class_names):
  hf_config, _ = pretrained.hf_config(backbone_folder)
  module, flat = _classifier(backbone_folder, pooling, len(class_names) if class_names else 1)
  config_json, state = bert.to_hf_sequence_classification(flat, hf_config=hf_config, class_names=class_names,
                                                          pooling=pooling)
  assert all(v.dtype == np.float32 for v in state.values())
  folder = _write(str(tmp_path / 'export'), config_json, state)
  batch = _token_batch(hf_config)
  ours = np.asarray(module.apply(rules.unflatten(flat), batch))
  model, theirs = _transformers_logits(folder, batch)
  assert set(state) == set(model.state_dict())
  diff = np.abs(ours - theirs).max()
  print(f'{pooling} {class_names}: logits max-abs {diff:.1e} (logits up to {np.abs(ours).max():.1f})')
  assert diff <= TOL, f'max-abs {diff:.2e} > {TOL}'
  if class_names:
    assert model.config.id2label == dict(enumerate(class_names))
    assert model.config.label2id == {n: i for i, n in enumerate(class_names)}
    assert model.config.problem_type == 'single_label_classification'
  else:
    assert model.config.num_labels == 1 and config_json['num_labels'] == 1 and theirs.shape == (3, 1)
    assert model.config.problem_type == 'regression'


def test_cls_export_reads_back_unchanged(backbone_folder):
  """'cls' is the forward converter inverted: the importer gives back every array bit for bit."""
  hf_config, _ = pretrained.hf_config(backbone_folder)
  _, flat = _classifier(backbone_folder, 'cls', 3)
  _, state = bert.to_hf_sequence_classification(flat, hf_config=hf_config, class_names=NAMES, pooling='cls')
  back = bert.convert_hf_state_dict(state, bert.BertConfig.from_hf(hf_config, 'config.json'))
  assert back.keys() == flat.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_first_pooling_error_stays_within_its_bound(backbone_folder, tmp_path):
  """At eps 0.05 tanh's curvature is measurable: transformers' logits differ from ours by more than float32 noise
  and by no more than the docstring's bound eps^2 / 3 * sum_j |W_kj| |h_j|^3 (h: our first-token states)."""
  eps = 0.05
  hf_config, _ = pretrained.hf_config(backbone_folder)
  module, flat = _classifier(backbone_folder, 'first', 3)
  config_json, state = bert.to_hf_sequence_classification(flat, hf_config=hf_config, class_names=NAMES,
                                                          pooling='first', pooler_eps=eps)
  batch = _token_batch(hf_config)
  variables = rules.unflatten(flat)
  ours = np.asarray(module.apply(variables, batch), np.float64)
  first = np.asarray(module.clone(num_classes=None).apply(variables, batch), np.float64)
  _, theirs = _transformers_logits(_write(str(tmp_path / 'export'), config_json, state), batch)
  bound = eps ** 2 / 3 * np.abs(first) ** 3 @ np.abs(flat['params/head/kernel'].astype(np.float64))
  error = np.abs(ours - theirs)
  print(f'eps {eps}: max error {error.max():.1e}, bound {bound.max():.1e}')
  assert error.max() > 10 * TOL
  assert np.all(error <= bound + 1e-5)


@pytest.mark.parametrize('pooling', ['mean', 'last'])
def test_poolings_without_a_transformers_class_are_refused(backbone_folder, pooling):
  hf_config, _ = pretrained.hf_config(backbone_folder)
  _, flat = _classifier(backbone_folder, pooling, 3)
  with pytest.raises(ValueError, match=rf"config\.model\.pooling='{pooling}' has no transformers equivalent.*"
                                       r"\('cls', 'first'\)"):
    bert.to_hf_sequence_classification(flat, hf_config=hf_config, class_names=NAMES, pooling=pooling)


def test_params_that_do_not_fit_are_listed(backbone_folder):
  hf_config, _ = pretrained.hf_config(backbone_folder)
  _, flat = _classifier(backbone_folder, 'cls', 3)
  plain = {k[len('params/'):]: v for k, v in flat.items()}  # the prefix-free form is accepted too
  export = lambda params, **kw: bert.to_hf_sequence_classification(
      params, **{'hf_config': hf_config, 'class_names': NAMES, 'pooling': 'cls', **kw})
  assert set(export(plain)[1]) == set(export(flat)[1])
  extra = 'backbone/layer_0/attention/rel_pos/kernel'
  with pytest.raises(ValueError, match=f'no BertForSequenceClassification counterpart: {extra}'):
    export({**plain, extra: np.zeros((2, 2))})
  with pytest.raises(ValueError, match='lora.merge.*backbone/layer_0/attention/query/lora_a'):
    export({**plain, 'backbone/layer_0/attention/query/lora_a': np.zeros((32, 4))})
  with pytest.raises(ValueError, match='missing backbone/layer_1/mlp_in/bias'):
    export({k: v for k, v in plain.items() if k != 'backbone/layer_1/mlp_in/bias'})
  with pytest.raises(ValueError, match=r'mis-shaped head/bias \(3,\) \(model: \(2,\)\)'):
    export(plain, class_names=['no', 'yes'])
  with pytest.raises(ValueError, match="model_type 'roberta'"):
    export(plain, hf_config={**hf_config, 'model_type': 'roberta', 'type_vocab_size': 1})
