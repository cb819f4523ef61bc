"""Orbax checkpoints under ``WORKDIR/checkpoints``: the last K, plus the best by an eval metric.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact and the partial one is ignored on restore.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:

  def __init__(self, directory: str, *, keep_last: int, best_metric: str | None, best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"config.checkpoint.best_mode: {best_mode!r} is not 'max' or 'min'")
    keep = [policies.LatestN(n=keep_last)]
    if best_metric:
      keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                 keep_checkpoints_without_metrics=False))
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
    """Starts an (asynchronous) save; ``metrics`` rank it for the best-checkpoint policy."""
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore(self, step: int, like: Any) -> Any:
    """Restores ``step`` into the structure, dtypes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
