"""Sentence (pair) classification from TensorFlow Datasets by name, read without TensorFlow.

``tfds.data_source`` reads datasets prepared as array_record (random access, no TensorFlow); ``tfds.load``
would need TensorFlow. Nothing is downloaded unless asked: offline, a download retries for minutes.
"""
from __future__ import annotations

import importlib
import typing

import numpy as np

from transfer.data import ArrayDataset, warn_if_eval_is_train


class Task(typing.NamedTuple):
  fields: tuple[str, ...]  # one text feature, or two: segments A and B of a sentence pair
  label: str
  train: str
  eval: str
  regression: bool = False


TASKS = {
    "glue/cola": Task(("sentence",), "label", "train", "validation"),
    "glue/sst2": Task(("sentence",), "label", "train", "validation"),
    "glue/mrpc": Task(("sentence1", "sentence2"), "label", "train", "validation"),
    "glue/qqp": Task(("question1", "question2"), "label", "train", "validation"),
    "glue/stsb": Task(("sentence1", "sentence2"), "label", "train", "validation", regression=True),
    "glue/mnli": Task(("premise", "hypothesis"), "label", "train", "validation_matched"),
    "glue/qnli": Task(("question", "sentence"), "label", "train", "validation"),
    "glue/rte": Task(("sentence1", "sentence2"), "label", "train", "validation"),
    "glue/wnli": Task(("sentence1", "sentence2"), "label", "train", "validation"),
    "imdb_reviews": Task(("text",), "label", "train", "test"),
    # Title and description as a pair: both kept, and longest-first truncation trims the (longer) description.
    "ag_news_subset": Task(("title", "description"), "label", "train", "test"),
}

_PREPARE = ("Prepare it on a machine with network access: python -c \"import tensorflow_datasets as tfds; "
            "tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\" "
            "(or `tfds build {name} --file_format=array_record --data_dir=DIR`; the tfds CLI needs tensorflow), "
            "copy DIR here and pass data_dir=DIR (config.data.data_dir).")


def task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown TFDS text task {name!r}; supported: {sorted(TASKS)}")
  return TASKS[name]


def _text(value) -> str:
  """Real array_record data decodes Text to bytes, TFDS's mock data to str: both become str, without surrounding
  whitespace (as text_files: GLUE's SST-2 sentences end with a space)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


def open_source(name: str, split: str, data_dir, download: bool):
  """``tfds.data_source``, with its misleading failures ("splits is empty", tfrecord) explained."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import file_adapters
  if name.startswith("glue/"):
    # A legacy builder, registered when its module is imported. TFDS imports all legacy modules in one loop that
    # stops at the first ImportError (nearest_neighbors needs h5py): without h5py, "Dataset glue not found".
    importlib.import_module("tensorflow_datasets.text.glue")
  # With a data_dir, TFDS would otherwise prepare tfrecord, which data_source cannot read.
  kwargs = {"file_format": "array_record"} if download else None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download, builder_kwargs=kwargs)
  except Exception as e:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      why = "the download failed" if download else "downloading is off"
      raise FileNotFoundError(f"TFDS dataset {name} is not prepared in {builder.data_dir} (data_dir={data_dir!r}; "
                              f"{why}). " + _PREPARE.format(name=name)) from e
    fmt = builder.info.file_format
    if fmt not in file_adapters.FileFormat.with_random_access():
      raise RuntimeError(
          f"TFDS dataset {name} in {builder.data_dir} is stored as {fmt.value}, which TFDS reads only through "
          f"TensorFlow (pip install tensorflow-cpu), and this loader uses TFDS's TensorFlow-free random access. "
          f"Convert it (`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format="
          f"array_record`, needs tensorflow-cpu) or prepare it again. " + _PREPARE.format(name=name)) from e
    raise


def read_records(source, rows: np.ndarray, chunk: int = 4096) -> list[dict]:
  """Batched reads, ~5x faster than one by one on array_record. TFDS 4.9.10's mock data source breaks
  ``__getitems__`` (an unbound partial: TypeError), so there records are read one by one."""
  out = []
  for start in range(0, len(rows), chunk):
    keys = [int(i) for i in rows[start:start + chunk]]
    try:
      out.extend(source.__getitems__(keys))
    except TypeError:
      out.extend(source[i] for i in keys)
  return out


def read_split(name: str, split: str, data_dir=None, download: bool = False, *, examples: int | None = None,
               seed: int = 0) -> tuple[list[str], list[str] | None, np.ndarray, list[str]]:
  """``(texts, pairs or None, labels, class names)``: int32 class ids, or for a regression task float32 scores and
  no class names. ``examples``: a fixed random subset, read alone."""
  t = task(name)
  source = open_source(name, split, data_dir, download)
  rows = np.arange(len(source))
  if examples:
    rows = np.sort(np.random.default_rng(seed).permutation(len(rows))[:examples])
  records = read_records(source, rows)
  texts = [_text(r[t.fields[0]]) for r in records]
  pairs = [_text(r[t.fields[1]]) for r in records] if len(t.fields) > 1 else None
  if t.regression:
    return texts, pairs, np.array([float(r[t.label]) for r in records], np.float32), []
  labels = np.array([int(r[t.label]) for r in records], np.int32)
  class_names = list(source.dataset_info.features[t.label].names)
  bad = (labels < 0) | (labels >= len(class_names))
  if bad.any():  # GLUE's test splits are unlabelled (-1)
    raise ValueError(f"{name}[{split}]: label {labels[bad][0]} is not one of the classes {class_names}")
  return texts, pairs, labels, class_names


def load(cfg, tokenizer, wanted: str = "auto") -> tuple[ArrayDataset, ArrayDataset]:
  """(train, eval) for ``config.data.tfds_name``, tokenised to ``cfg.max_length`` as ``text_files.load`` does.
  ``wanted`` (``config.task``) must be 'auto' or the dataset's own task."""
  name, t = cfg.tfds_name, task(cfg.tfds_name)
  if wanted != "auto" and wanted != ("regression" if t.regression else "classification"):
    raise ValueError(f"config.task={wanted!r}, but {name} is a "
                     f"{'regression' if t.regression else 'classification'} task (leave it at 'auto')")
  splits = (("train", cfg.get("train_split") or t.train), ("eval", cfg.get("eval_split") or t.eval))
  warn_if_eval_is_train(splits[0][1], splits[1][1], "eval_split", paths=False)
  out = []
  for role, split in splits:
    texts, pairs, labels, class_names = read_split(
        name, split, cfg.get("data_dir"), cfg.get("download", False),
        examples=cfg.get("train_examples") if role == "train" else None, seed=cfg.get("split_seed", 0))
    enc = tokenizer.encode(texts, pairs, max_length=cfg.max_length, pad_to=cfg.max_length)
    if enc.num_truncated:
      print(f"data: {name}[{split}]: {enc.num_truncated} of {len(labels)} rows truncated to {cfg.max_length} "
            "tokens", flush=True)
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
              "token_type_ids": enc.token_type_ids}
    out.append(ArrayDataset(inputs, labels, class_names, f"{name}/{split}",
                            task="regression" if t.regression else "classification"))
  return out[0], out[1]
