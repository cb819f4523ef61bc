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


TOKEN_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "loss_mask")   # (N, L): trimmed together
IMAGE_SOURCES = ("image_folder", "npz", "tfds_image")   # transfer/data/images.py
SOURCES = ("digits", "text_files", "tfds_text", "lm_text", *IMAGE_SOURCES)   # config.data.name: what build reads


def is_image_source(name: str) -> bool:
  return name == "digits" or name in IMAGE_SOURCES


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


HOLDOUT_STREAM = 0x686F6C   # keeps held-out picks apart from the data order's (seed, epoch) generators


def holdout_rows(labels: np.ndarray | None, fraction: float, seed: int, *, field: str,
                 stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(kept rows, held-out rows): ``fraction`` of the rows, fixed by ``seed``. Stratified (``labels`` are class
  ids): rows shuffled and grouped by class, then evenly spaced picks, so every class gives its share of the
  held-out rows (to within one) and none is held out whole. Otherwise (scores, or no labels) a plain random pick.
  ``field`` is the config field the fraction came from, named in errors."""
  n = len(labels) if labels is not None else 0
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.{field}={fraction}: must be between 0 and 1 (exclusive)")
  if n < 2:
    raise ValueError(f"config.{field}={fraction}: {n} example(s) are too few to hold any out")
  n_held = min(n - 1, max(1, round(fraction * n)))
  order = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(n)
  if not stratify:
    return np.sort(order[n_held:]), np.sort(order[:n_held])
  order = order[np.argsort(labels[order], kind="stable")]
  held = np.sort(order[((np.arange(n_held) + 0.5) * n / n_held).astype(np.int64)])
  kept = np.setdiff1d(np.arange(n), held)
  lost = sorted(set(labels[held].tolist()) - set(labels[kept].tolist()))
  if lost:
    raise ValueError(f"config.{field}={fraction} holds out every example of class id(s) {lost}: training would "
                     "never see them; lower the fraction or use more data")
  return kept, held


def split_validation(train, fraction: float, seed: int):
  """(train, validation): ``config.data.val_fraction`` of the training split held out for model selection (the
  best checkpoint), so the eval split is measured once, at the checkpoint chosen here. Stratified for
  classification; fixed by ``config.data.split_seed``, so a resumed run and every seed of a sweep hold out the
  same rows."""
  stratify = train.task == "classification"
  labels = np.zeros(len(train), np.int32) if train.labels is None else train.labels   # causal LM: token rows
  kept, held = holdout_rows(labels, fraction, seed, field="data.val_fraction", stratify=stratify)
  return (train.subset(kept, f"{train.name}[train {len(kept)}]"),
          train.subset(held, f"{train.name}[validation {len(held)}]"))


@dataclasses.dataclass
class ArrayDataset:
  """Model inputs by name (``image`` (N, H, W, C) uint8; or ``input_ids`` ... (N, L)) and ``labels``: for
  ``task`` 'classification' (N,) int32 ids into ``class_names``; for 'regression' (N,) float32 scores (and no
  ``class_names``). The task is said by the loader, never guessed from the labels (``transfer.tasks``). For
  'causal_lm' ``labels`` is None: the targets are the inputs themselves (``input_ids`` where ``loss_mask`` is 1).

  ``pad_to_multiple_of`` (token inputs only; 0 = off): each batch is cut to its longest row's length rounded up to
  this multiple. Short texts then cost short compute; every distinct length compiles the step once.
  """
  inputs: dict[str, np.ndarray]
  labels: np.ndarray | None
  class_names: list[str]
  name: str
  pad_to_multiple_of: int = 0
  task: str = "classification"

  def __post_init__(self):
    if (self.labels is None) != (self.task == "causal_lm"):
      raise ValueError(f"{self.name}: a {self.task} dataset " + ("needs labels" if self.labels is None else
                       "has no labels (its targets are its input_ids)"))
    if self.labels is None and not self.inputs:
      raise ValueError(f"{self.name}: a dataset without labels needs inputs")
    if len(self) == 0:
      raise ValueError(f"{self.name}: the dataset is empty")
    if self.task == "classification" and not self.class_names:
      raise ValueError(f"{self.name}: a classification dataset needs class names")
    if self.task == "regression" and self.class_names:
      raise ValueError(f"{self.name}: a regression dataset has scores, not classes {self.class_names}")
    first = "labels" if self.labels is not None else f"rows of {next(iter(self.inputs))!r}"
    for key, value in self.inputs.items():
      if len(value) != len(self):
        raise ValueError(f"{self.name}: {len(value)} rows of {key!r} but {len(self)} {first}")

  def __len__(self) -> int:
    return len(self.labels) if self.labels is not None else len(next(iter(self.inputs.values())))

  @property
  def regression(self) -> bool:
    return self.task == "regression"

  @property
  def num_outputs(self) -> int:
    """Width of the head: one logit per class, or one score."""
    return len(self.class_names) or 1

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of an endless stream of epochs (see ``train_rows``)."""
    rows = train_rows(len(self), step, batch_size, seed)
    return self._trim({**{k: v[rows] for k, v in self.inputs.items()}, **self._labels(rows)})

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once; the last batch is padded and carries ``mask`` 0 on the padding."""
    for rows, mask in eval_rows(len(self), batch_size):
      yield self._trim({**{k: v[rows] for k, v in self.inputs.items()}, **self._labels(rows), "mask": mask})

  def subset(self, rows: np.ndarray, name: str) -> ArrayDataset:
    """The rows ``rows`` as a dataset of their own (a validation split carved from training: ``split_validation``)."""
    return dataclasses.replace(self, inputs={k: v[rows] for k, v in self.inputs.items()},
                               labels=None if self.labels is None else self.labels[rows], name=name)

  def _labels(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``{'label': ...}`` for the rows, or nothing for a dataset without labels (causal LM)."""
    return {} if self.labels is None else {"label": self.labels[rows]}

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


def build(cfg, model_cfg, task: str = "auto") -> tuple[ArrayDataset, ArrayDataset]:
  """(train, eval) datasets for ``config.data``; text is tokenised with ``config.model``'s own tokenizer. Image
  sources give ``images.ImageDataset`` (same interface, augmented per batch). ``task`` (``config.task``) tells
  text sources whose labels could be read either way how to read them."""
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
    tok.check_vocab(models.backbone(model_cfg).config.vocab_size, source)
    splits = (text_files if cfg.name == "text_files" else tfds_text).load(cfg, tok, task)
    multiple = cfg.get("pad_to_multiple_of", 0)
    if multiple < 0:
      raise ValueError(f"config.data.pad_to_multiple_of must be >= 0 (0: every batch at max_length), got {multiple}")
    for split in splits:
      split.pad_to_multiple_of = multiple
    return splits
  if cfg.name == "lm_text":   # causal-LM text: prompt/response JSONL or packed plain text (lm_text.py)
    from transfer.data import lm_text
    return lm_text.build(cfg, model_cfg)
  if cfg.name in IMAGE_SOURCES:
    from transfer.data import images
    return images.load(cfg)
  raise ValueError(f"config.data.name: unknown dataset {cfg.name!r}; available: {sorted(SOURCES)}")


def typical_image_side(cfg) -> int:
  """The training images' median shorter side before any resizing: what the auto rule picks a resolution from."""
  if cfg.name == "digits":
    return 8
  if cfg.name in IMAGE_SOURCES:
    from transfer.data import images
    return images.typical_short_side(images.sources(cfg)[0])
  raise ValueError(f"config.data.resolution='auto' needs an image dataset; config.data.name={cfg.name!r} is not one")
