"""The task interface (see ``transfer/tasks/__init__.py``)."""
from __future__ import annotations

import jax.numpy as jnp


class Task:
  """One kind of learning problem. Subclasses set ``name`` and ``best_metric`` and implement the methods.

  Device side (inside jit): ``loss`` and ``eval_outputs`` take the model's float32 outputs and the batch.
  Host side: ``metrics`` turns the summed eval outputs (and gathered per-row ones) into named metrics.
  """
  name = ""
  best_metric = ""      # the default config.checkpoint.best_metric
  best_mode = "max"
  batch_fields: tuple[str, ...] = ()   # what a training batch must carry besides the model inputs
  mixes_labels = False                 # mixup can blend this task's labels (class targets)

  def __init__(self, config):
    self.config = config

  def check(self, config, train_ds) -> None:
    """Config fields that do not apply to this task are errors naming them."""

  def describe(self, train_ds) -> str:
    """A few words for the start-up line: '10 classes', 'a regression target'."""
    raise NotImplementedError

  def build_model(self, model_cfg, train_ds):
    from transfer import models
    return models.build(model_cfg, train_ds.num_outputs)

  def loss(self, outputs, batch) -> jnp.ndarray:
    """The mean training loss of one batch (a float32 scalar)."""
    raise NotImplementedError

  def eval_outputs(self, outputs, batch) -> tuple[dict, dict]:
    """``(sums, rows)``: scalars summed over the batch's real rows (``batch['mask']`` 1), and per-row arrays the
    host keeps for its real rows (e.g. predictions that a correlation needs)."""
    raise NotImplementedError

  def metrics(self, sums: dict, rows: dict, eval_ds) -> dict:
    """Named eval metrics (``eval/...``) from the totals over every eval example."""
    raise NotImplementedError


def masked_sum(values, mask):
  return (values * mask).sum()
