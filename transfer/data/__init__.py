"""Datasets held in memory (arrays here; images of varying sizes in ``images.py``), with batches that are a pure
function of (seed, step).

Because batch ``s`` depends only on the seed and ``s``, a resumed run sees exactly the batches an uninterrupted
one would: the data position is the step number, saved with every checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np


TOKEN_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
IMAGE_SOURCES = ("image_folder", "npz", "tfds_image")   # transfer/data/images.py


def train_rows(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows of training batch ``step`` in an endless stream of epochs, each a fresh permutation drawn from
  (seed, epoch): a pure function of its arguments, so a resumed run draws the same rows."""
  index = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, positions = index // n, index % n
  rows = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, int(epoch)]).permutation(n)
    rows[epochs == epoch] = order[positions[epochs == epoch]]
  return rows


def eval_rows(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(rows, mask)`` batches covering rows 0..n-1 once; the last is padded with row 0 under ``mask`` 0."""
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    pad = batch_size - len(rows)
    mask = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    yield np.concatenate([rows, np.zeros(pad, np.int64)]), mask


@dataclasses.dataclass
class ArrayDataset:
  """Model inputs by name (``image`` (N, H, W, C) uint8; or ``input_ids`` ... (N, L)) and ``labels``: (N,) int32
  class ids, or for a regression task (``class_names`` empty) (N,) float32 scores.

  ``pad_to_multiple_of`` (token inputs only; 0 = off): each batch is cut to its longest row's length rounded up to
  this multiple. Short texts then cost short compute; every distinct length compiles the step once.
  """
  inputs: dict[str, np.ndarray]
  labels: np.ndarray
  class_names: list[str]
  name: str
  pad_to_multiple_of: int = 0

  def __post_init__(self):
    if len(self.labels) == 0:
      raise ValueError(f"{self.name}: the dataset is empty")
    for key, value in self.inputs.items():
      if len(value) != len(self.labels):
        raise ValueError(f"{self.name}: {len(value)} rows of {key!r} but {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def regression(self) -> bool:
    return not self.class_names

  @property
  def num_outputs(self) -> int:
    """Width of the head: one logit per class, or one score."""
    return len(self.class_names) or 1

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of an endless stream of epochs (see ``train_rows``)."""
    rows = train_rows(len(self), step, batch_size, seed)
    return self._trim({**{k: v[rows] for k, v in self.inputs.items()}, "label": self.labels[rows]})

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once; the last batch is padded and carries ``mask`` 0 on the padding."""
    for rows, mask in eval_rows(len(self), batch_size):
      yield self._trim({**{k: v[rows] for k, v in self.inputs.items()}, "label": self.labels[rows], "mask": mask})

  def _trim(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the all-padding tail columns of token inputs (see ``pad_to_multiple_of``)."""
    if not self.pad_to_multiple_of or "attention_mask" not in batch:
      return batch
    full = batch["attention_mask"].shape[1]
    longest = int(batch["attention_mask"].sum(1).max())
    keep = min(full, -(-max(longest, 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of)
    return {k: (v[:, :keep] if k in TOKEN_INPUTS else v) for k, v in batch.items()}


def warn_if_eval_is_train(train: str, evaluation: str, field: str, *, paths: bool) -> bool:
  """Warns (and returns True) when the evaluation split (``config.data.FIELD``) is, or may contain, the training
  split: files and folders (``paths``) by real path; TFDS split strings when equal, or with the same base split
  when either is unsliced (``train`` vs ``train[80%:]``). A warning, not an error: evaluating on training data is
  a fair check that a model can fit at all, but its accuracy must not be read as transfer."""
  if not train or not evaluation:
    return False   # an unset field has its own error where it is read
  if paths:
    same = os.path.realpath(train) == os.path.realpath(evaluation)
  else:
    same = train == evaluation or (train.split("[")[0] == evaluation.split("[")[0]
                                   and ("[" not in train or "[" not in evaluation))
  if same:
    print(f"warning: config.data.{field}={evaluation!r} is or contains the training data ({train!r}): its "
          "accuracy measures memorisation, not transfer", flush=True)
  return same


def build(cfg, model_cfg) -> tuple[ArrayDataset, ArrayDataset]:
  """(train, eval) datasets for ``config.data``; text is tokenised with ``config.model``'s own tokenizer. Image
  sources give ``images.ImageDataset`` (same interface, augmented per batch)."""
  if cfg.name == "digits":
    from transfer.data import digits
    return digits.load(resolution=cfg.resolution, per_class=cfg.get("train_per_class"),
                       test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)
  if cfg.name in ("text_files", "tfds_text"):
    from transfer import models, pretrained
    from transfer.data import text_files, tfds_text
    source = model_cfg.get("architecture") or model_cfg.get("pretrained")
    if not source:
      raise ValueError(f"config.data.name={cfg.name!r} needs config.model.pretrained (or .architecture) to find "
                       "the tokenizer")
    tok = pretrained.tokenizer(source)
    tok.check_vocab(models.bert_config(model_cfg).vocab_size, source)
    splits = (text_files if cfg.name == "text_files" else tfds_text).load(cfg, tok)
    multiple = cfg.get("pad_to_multiple_of", 0)
    if multiple < 0:
      raise ValueError(f"config.data.pad_to_multiple_of must be >= 0 (0: every batch at max_length), got {multiple}")
    for split in splits:
      split.pad_to_multiple_of = multiple
    return splits
  if cfg.name in IMAGE_SOURCES:
    from transfer.data import images
    return images.load(cfg)
  raise ValueError(f"config.data.name: unknown dataset {cfg.name!r}; available: "
                   f"{sorted(['digits', 'text_files', 'tfds_text', *IMAGE_SOURCES])}")


def typical_image_side(cfg) -> int:
  """The training images' median shorter side before any resizing: what the auto rule picks a resolution from."""
  if cfg.name == "digits":
    return 8
  if cfg.name in IMAGE_SOURCES:
    from transfer.data import images
    return images.typical_short_side(images.sources(cfg)[0])
  raise ValueError(f"config.data.resolution='auto' needs an image dataset; config.data.name={cfg.name!r} is not one")
