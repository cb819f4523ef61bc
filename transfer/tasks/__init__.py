"""Tasks: what a run learns. The trainer calls its task and has no task-specific branches.

A task owns its batch fields, its model's head, its loss, its evaluation (every example counted once, padded rows
masked), its default best metric and how its predictions look. Adding a task: its own module with a ``Task``
subclass, plus one line in ``TASKS``. ``config.task`` names it; 'auto' takes the task the data are for, and a
task the data cannot serve (a causal-LM dataset with a classification head, class labels for regression) is an
error, never a fallback.
"""
from __future__ import annotations

from transfer.tasks.base import Task
from transfer.tasks.causal_lm import CausalLM
from transfer.tasks.classification import Classification
from transfer.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    Classification,
    Regression,
    CausalLM,
)}


def resolve(config, train_ds) -> Task:
  """The task ``config.task`` names (or the data's own, for 'auto'), checked against the dataset it will see."""
  wanted = config.get("task", "auto")
  if wanted != "auto" and wanted not in TASKS:
    raise ValueError(f"config.task: {wanted!r} is not 'auto' or one of {sorted(TASKS)}")
  data_task = getattr(train_ds, "task", None)
  if data_task not in TASKS:
    raise ValueError(f"the training data {train_ds.name} is for task {data_task!r}, which has no implementation; "
                     f"tasks: {sorted(TASKS)}")
  if wanted != "auto" and wanted != data_task:
    raise ValueError(f"config.task={wanted!r}, but the data (config.data.name={config.data.name!r}, "
                     f"{train_ds.name}) are for {data_task!r}: set config.task='auto' or {data_task!r}, or use data "
                     f"for {wanted!r}")
  task = TASKS[data_task](config)
  task.check(config, train_ds)
  return task

