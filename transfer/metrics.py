"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files."""
from __future__ import annotations

import json
import os


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
