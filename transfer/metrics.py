"""Run outputs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files; eval metrics."""
from __future__ import annotations

import errno
import json
import os
from typing import Callable

import numpy as np

from transfer import tb_events


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


class NoWriter:
  """The writer of a process other than 0 in a multi-process run: process 0 writes the run's metrics."""

  def write(self, step: int, metrics: dict) -> None:
    pass

  def close(self) -> None:
    pass


class MetricWriter:
  """Appends rows to ``WORKDIR/metrics.jsonl`` (and TensorBoard). A resumed run first drops the rows after its
  checkpoint (it logs those steps again) and a last line cut off by a kill or a full disk, with a message."""

  def __init__(self, workdir: str, *, resume_step: int = 0, log: Callable[[str], None] = print):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      rows, cut = _parse(self.path)
      kept = [r for r in rows if r["step"] <= resume_step]
      if cut is not None:
        log(f"{self.path}: dropped its last line, cut off (by a kill or a full disk?): {cut[:80]!r}")
      if cut is not None or len(kept) < len(rows) or not _ends_with_newline(self.path):
        tmp = self.path + ".tmp"   # the old file stays whole until the new one is complete
        try:
          with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
          os.replace(tmp, self.path)
        except OSError as e:
          if os.path.exists(tmp):
            os.remove(tmp)
          raise OSError(e.errno, f"cannot rewrite {self.path} for the resumed run: {e.strerror}") from None
    self.tb = tb_events.EventWriter(workdir)   # TensorBoard's view; metrics.jsonl is the record

  def write(self, step: int, metrics: dict) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise OSError(e.errno, f"cannot append step {int(step)} to {self.path}: {e.strerror}"
                    + (" (the disk is full)" if e.errno == errno.ENOSPC else "")) from None
    self.tb.scalars(step, metrics)

  def close(self) -> None:
    self.tb.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    size = f.seek(0, os.SEEK_END)
    if not size:
      return True
    f.seek(size - 1)
    return f.read(1) == b"\n"


def _parse(path: str) -> tuple[list[dict], str | None]:
  """(rows, the cut-off last line or None). A last line without its newline that is not a whole row was cut off
  mid-write (so was trailing NUL padding, which some filesystems leave after a crash); a bad line before the last
  is corruption: a ValueError naming the file and line."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")   # the last piece is b"" when the file ends with its newline
  rows, cut = [], None
  for number, raw in enumerate(lines, 1):
    last = number == len(lines) or (number == len(lines) - 1 and not lines[-1].strip(b"\0 \t\r"))
    text = raw.strip(b"\0 \t\r")
    if not text:
      if raw and last:   # NUL padding at the end
        cut = raw.decode("utf-8", "replace")
      continue
    try:
      row = json.loads(text)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a row with an integer 'step'")
    except ValueError as e:
      if last and number == len(lines):   # no newline after it: a write that never finished
        cut = raw.decode("utf-8", "replace")
        continue
      reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
      raise ValueError(f"{path} line {number} is not a metrics row ({reason}): {raw[:80]!r}; fix or delete that "
                       f"line") from None
    rows.append(row)
  return rows, cut


def read(workdir: str) -> list[dict]:
  """The rows of ``WORKDIR/metrics.jsonl`` (a last line cut off mid-write is left out)."""
  return _parse(os.path.join(workdir, "metrics.jsonl"))[0]
