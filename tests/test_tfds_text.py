"""TFDS text tasks through the real ``tfds.data_source`` path, offline: on TFDS's mock data for the named tasks,
and on a tiny dataset prepared here as array_record (real files, so real decoding: Text comes back as bytes)."""
import json
import shutil
import time

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from transfer.data import tfds_text  # noqa: E402
from transfer.text.tokenizer import Encoded  # noqa: E402

MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


class FakeTokenizer:
  """One id per character, [CLS]=1 A [SEP]=2 (B [SEP]=2); records every call so tests see what reached it."""

  def __init__(self):
    self.calls = []

  def encode(self, texts, pairs=None, *, max_length, pad_to):
    self.calls.append((list(texts), None if pairs is None else list(pairs)))
    shape = (len(texts), pad_to)
    ids, types, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    truncated = 0
    for i, text in enumerate(texts):
      row = [1] + [3 + ord(c) % 500 for c in text] + [2]
      kind = [0] * len(row)
      if pairs is not None:
        second = [3 + ord(c) % 500 for c in pairs[i]] + [2]
        row, kind = row + second, kind + [1] * len(second)
      truncated += len(row) > max_length
      n = min(len(row), max_length)
      ids[i, :n], types[i, :n], mask[i, :n] = row[:n], kind[:n], 1
    return Encoded(ids, types, mask, truncated)


def config(name, **kw):
  return ml_collections.ConfigDict({"tfds_name": name, "max_length": 16, "split_seed": 0, **kw})


@pytest.mark.parametrize("name,classes,eval_split,paired", [
    ("glue/sst2", ["negative", "positive"], "validation", False),
    ("glue/mrpc", ["not_equivalent", "equivalent"], "validation", True),
    ("glue/qnli", ["entailment", "not_entailment"], "validation", True),
    ("glue/mnli", ["entailment", "neutral", "contradiction"], "validation_matched", True),
    ("imdb_reviews", ["neg", "pos"], "test", False),
    ("ag_news_subset", ["World", "Sports", "Business", "Sci/Tech"], "test", True),
])
def test_named_tasks_on_mock_data(name, classes, eval_split, paired, tmp_path):
  tok = FakeTokenizer()
  with tfds.testing.mock_data(num_examples=12, **MOCK):
    train, evaluation = tfds_text.load(config(name, data_dir=str(tmp_path)), tok)
  for ds in (train, evaluation):
    assert len(ds) == 12 and ds.class_names == classes
    assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() and ds.labels.max() < len(classes)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
      assert ds.inputs[key].shape == (12, 16) and ds.inputs[key].dtype == np.int32
  assert (train.name, evaluation.name) == (f"{name}/train", f"{name}/{eval_split}")
  assert len(tok.calls) == 2
  for texts, pairs in tok.calls:
    assert len(texts) == 12 and all(isinstance(t, str) for t in texts)
    assert (pairs is not None) == paired
    if paired:
      assert len(pairs) == 12 and all(isinstance(p, str) for p in pairs) and pairs != texts
  assert (train.inputs["token_type_ids"].max() == 1) == paired  # segment B reached the model inputs


def test_train_examples_is_a_fixed_subset():
  with tfds.testing.mock_data(num_examples=30, **MOCK):
    runs = [tfds_text.load(config("glue/mrpc", train_examples=6, split_seed=seed), FakeTokenizer())
            for seed in (3, 3, 4)]
  (a, a_eval), (b, _), (c, _) = runs
  assert len(a) == 6 and len(a_eval) == 30  # only train is subsampled
  np.testing.assert_array_equal(a.inputs["input_ids"], b.inputs["input_ids"])
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.inputs["input_ids"], c.inputs["input_ids"])


class TransferTestPairs(tfds.core.GeneratorBasedBuilder):
  """A GLUE-like pair task with non-ASCII text and an unlabelled (-1) test split, prepared without network."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["yes", "maybe", "no"]), "idx": np.int32}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(20, labelled=True),
            "validation": self._generate_examples(5, labelled=True),
            "test": self._generate_examples(4, labelled=False)}

  def _generate_examples(self, n, labelled):
    for i in range(n):
      yield i, {"premise": f"prémisse {i}", "hypothesis": f"hypothèse {i} ✓", "label": i % 3 if labelled else -1,
                "idx": i}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  TransferTestPairs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture
def pairs_task(monkeypatch):
  monkeypatch.setitem(tfds_text.TASKS, "transfer_test_pairs",
                      tfds_text.Task(("premise", "hypothesis"), "label", "train", "validation"))
  return "transfer_test_pairs"


def test_prepared_array_record_dataset(prepared, pairs_task):
  texts, pairs, labels, names = tfds_text.read_split(pairs_task, "train", data_dir=str(prepared))
  assert names == ["yes", "maybe", "no"] and labels.dtype == np.int32
  index = [int(t.split()[1]) for t in texts]  # real Text is bytes on disk: decoded to str here
  assert sorted(index) == list(range(20))
  assert pairs == [f"hypothèse {i} ✓" for i in index] and texts == [f"prémisse {i}" for i in index]
  assert labels.tolist() == [i % 3 for i in index]
  sub = tfds_text.read_split(pairs_task, "train", data_dir=str(prepared), examples=7, seed=1)
  assert len(sub[0]) == 7 and set(sub[0]) < set(texts)
  again = tfds_text.read_split(pairs_task, "train", data_dir=str(prepared), examples=7, seed=1)
  assert again[0] == sub[0] and again[2].tolist() == sub[2].tolist()
  train, evaluation = tfds_text.load(config(pairs_task, data_dir=str(prepared), max_length=8), FakeTokenizer())
  assert (len(train), len(evaluation)) == (20, 5) and train.inputs["input_ids"].shape == (20, 8)


def test_unlabelled_split_is_refused(prepared, pairs_task):
  with pytest.raises(ValueError, match=r"label -1 is not one of the classes"):
    tfds_text.read_split(pairs_task, "test", data_dir=str(prepared))


@pytest.mark.parametrize("name", ["glue/sst2", "imdb_reviews"])
def test_unprepared_dataset_fails_fast_and_says_how_to_prepare(name, tmp_path):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as err:
    tfds_text.read_split(name, "train", data_dir=str(tmp_path / "empty"))
  assert time.monotonic() - start < 10
  message = str(err.value)
  assert name in message and str(tmp_path / "empty") in message and "array_record" in message
  assert "download_and_prepare" in message and "data_dir" in message


def test_tfrecord_dataset_names_tensorflow(prepared, pairs_task, tmp_path):
  # Only TensorFlow can write tfrecord; TFDS decides the format from dataset_info.json, so relabel a copy.
  data_dir = tmp_path / "copy"
  shutil.copytree(prepared, data_dir)
  info_path = data_dir / pairs_task / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(RuntimeError, match=r"tfrecord.*pip install tensorflow-cpu"):
    tfds_text.read_split(pairs_task, "train", data_dir=str(data_dir))


def test_stsb_is_a_regression_task_with_float_scores():
  with tfds.testing.mock_data(num_examples=12, **MOCK):
    train_ds, eval_ds = tfds_text.load(config("glue/stsb"), FakeTokenizer())
  assert train_ds.regression and train_ds.num_outputs == 1 and train_ds.class_names == []
  assert train_ds.labels.dtype == np.float32 and len(eval_ds) == 12
  with pytest.raises(ValueError, match=r"config.task='classification', but glue/stsb is a regression task"):
    tfds_text.load(config("glue/stsb"), FakeTokenizer(), "classification")


def test_unknown_tasks_are_refused():
  with pytest.raises(ValueError, match="supported:"):
    tfds_text.read_split("glue/nope", "train")
