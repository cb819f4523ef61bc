"""Regression: one output, mean squared error; Pearson and Spearman correlation (STS-B's metrics) over all rows."""
from __future__ import annotations

import numpy as np

from transfer import metrics as metrics_lib
from transfer.tasks.base import Task, masked_sum


class Regression(Task):
  name = "regression"
  best_metric = "eval/pearson"
  batch_fields = ("label",)

  def check(self, config, train_ds) -> None:
    if config.get("label_smoothing", 0.0):
      raise ValueError("config.label_smoothing applies to classes; this is a regression task: set it to 0")

  def describe(self, train_ds) -> str:
    return "a regression target"

  def loss(self, outputs, batch):
    return ((outputs[:, 0] - batch["label"]) ** 2).mean()

  def eval_outputs(self, outputs, batch):
    mask = batch["mask"]
    squared = (outputs[:, 0] - batch["label"]) ** 2
    # Correlations need every prediction: the host gathers them.
    return {"loss": masked_sum(squared, mask), "count": mask.sum()}, {"prediction": outputs[:, 0]}

  def metrics(self, sums, rows, eval_ds):
    return {**metrics_lib.regression_metrics(rows["prediction"], eval_ds.labels),
            "eval/loss": sums["loss"] / sums["count"]}

  @staticmethod
  def predictions(outputs: np.ndarray) -> list[dict]:
    return [{"value": float(v)} for v in np.asarray(outputs)[:, 0]]
