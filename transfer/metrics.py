"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files; eval metrics."""
from __future__ import annotations

import json
import os

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1 with ties given their average rank (as Spearman's coefficient needs)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x))
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / denom) if denom > 0 else 0.0  # constant predictions (e.g. a zero head): 0


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation (STS-B's metrics) and mean squared error."""
  p, t = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  return {"eval/pearson": _pearson(p, t), "eval/spearman": _pearson(_ranks(p), _ranks(t)),
          "eval/mse": float(np.mean((p - t) ** 2))}


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):  # a resumed run re-logs the steps after its checkpoint: drop their old lines
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(workdir, flush_secs=30)
    except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
      self.tb = None

  def write(self, step: int, metrics: dict) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
