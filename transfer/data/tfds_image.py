"""Image classification from TensorFlow Datasets by name, read without TensorFlow.

``tfds.data_source`` reads datasets prepared as array_record (random access); TFDS decodes each stored image with
PIL, and ``images.decode_source`` converts and shrinks it at once, so a split never sits in memory at full size.
Every record is read once (labels come with their images), so subsets are chosen after reading. TFDS's mock data
(``tfds.testing.mock_data``) runs this same code in the tests. Missing data fails at once with the command that
prepares it (``tfds_text.open_source``).
"""
from __future__ import annotations

import typing

import numpy as np

from transfer.data import tfds_text, warn_if_eval_is_train
from transfer.data.images import ImageSource

READ_CHUNK = 256   # records decoded at full size at a time


class Dataset(typing.NamedTuple):
  train: str
  eval: str | None   # None: TFDS has a single split; a stratified config.data.test_fraction of it is held out


# Each has an ``image`` Image feature and a ``label`` ClassLabel.
DATASETS = {
    "cifar10": Dataset("train", "test"),
    "cifar100": Dataset("train", "test"),            # the 100 fine labels
    "oxford_iiit_pet": Dataset("train", "test"),     # 37 breeds
    "oxford_flowers102": Dataset("train", "test"),   # 10 per class; with validation: train_split='train+validation'
    "dtd": Dataset("train", "test"),                 # split 1 of DTD's ten
    "eurosat": Dataset("train", None),               # eurosat/rgb: 27,000 images, one split
}


def dataset(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"config.data.tfds_name: unknown TFDS image dataset {name!r}; supported: {sorted(DATASETS)}")
  return DATASETS[name]


def sources(cfg) -> tuple[ImageSource, ImageSource | None]:
  name = cfg.get("tfds_name")
  if not name:
    raise ValueError(f"config.data.tfds_name: set it to one of {sorted(DATASETS)}")
  d = dataset(name)
  train_split, eval_split = cfg.get("train_split") or d.train, cfg.get("eval_split") or d.eval
  if eval_split:
    warn_if_eval_is_train(train_split, eval_split, "eval_split", paths=False)
  return (split_source(name, train_split, cfg),
          split_source(name, eval_split, cfg) if eval_split else None)


def split_source(name: str, split: str, cfg) -> ImageSource:
  source = tfds_text.open_source(name, split, cfg.get("data_dir"), cfg.get("download", False))

  def read(rows: np.ndarray):
    for start in range(0, len(rows), READ_CHUNK):
      chunk = rows[start:start + READ_CHUNK]
      for i, record in zip(chunk, tfds_text.read_records(source, chunk)):
        yield f"{name}[{split}] record {i}", record["image"], int(record["label"])

  return ImageSource(f"{name}/{split}", len(source), list(source.dataset_info.features["label"].names), read)
