"""A training run read back from its workdir: its config, its checkpoints, and its model with every variable.

``predict``, ``export``, ``generate`` and ``hf_export`` start here. A checkpoint is read verified (each array
against the SHA-256 the trainer recorded when it saved it), and what a checkpoint does not hold is rebuilt as the
run built it: a LoRA run saves only what trains, a run on cached features only its head, so their base (the
frozen backbone and its BatchNorm statistics) comes from the run's pretrained source or seeded init again and must
equal the digests the run recorded (``WORKDIR/base.json``); a changed base is an error, never a silent swap.
"""
from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np

from transfer import checkpoint as checkpoint_lib
from transfer import models, rules
from transfer.models import lora

LABELS_FILE = "labels.json"   # the task a run learnt and its class names, in head order (written by the trainer)


def listing(paths, limit: int = 6) -> str:
  paths = sorted(paths)
  return ", ".join(paths[:limit]) + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def check_params_fit(flat: dict, expected: dict, what: str) -> None:
  """``flat`` and ``expected`` (``{path: shape}``) hold the same paths with the same shapes, else a ValueError
  listing what is missing, unexpected and mis-shaped."""
  parts = []
  if missing := set(expected) - set(flat):
    parts.append(f"missing {listing(missing)}")
  if unexpected := set(flat) - set(expected):
    parts.append(f"unexpected {listing(unexpected)}")
  if changed := sorted(p for p in set(flat) & set(expected) if tuple(np.shape(flat[p])) != tuple(expected[p])):
    parts.append("mis-shaped " + ", ".join(f"{p} {tuple(np.shape(flat[p]))} (model: {tuple(expected[p])})"
                                           for p in changed[:6]))
  if parts:
    raise ValueError(f"{what}: the parameters do not fit the model: " + "; ".join(parts))


def read_config(workdir) -> ml_collections.ConfigDict:
  """``WORKDIR/config.json`` (the resolved config the trainer wrote)."""
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir {workdir}: no config.json (is it a training run's workdir?)")
  with open(path) as f:
    try:
      return ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}: not a config written by the trainer ({e})") from None


def task_of(config) -> str | None:
  """The task a run learned: the trainer writes it, resolved, to config.json (``task``)."""
  task = config.get("task")
  return None if task == "auto" else task


def write_labels(workdir: str, task: str, class_names) -> None:
  """Records the task and the class names in the head's order (``WORKDIR/labels.json``), for predictions."""
  path = os.path.join(workdir, LABELS_FILE)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump({"task": task, "class_names": list(class_names or [])}, f, indent=1)
  os.replace(tmp, path)


def read_labels(workdir) -> tuple[str, list[str]]:
  """(task, class names) of a run (see ``write_labels``)."""
  path = os.path.join(os.fspath(workdir), LABELS_FILE)
  try:
    with open(path) as f:
      labels = json.load(f)
    return str(labels["task"]), [str(n) for n in labels["class_names"]]
  except FileNotFoundError:
    raise FileNotFoundError(f"--workdir {workdir}: no {LABELS_FILE} (the run's task and class names); runs "
                            "trained before it was written cannot be read back: train again") from None
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a labels record written by the trainer ({e})") from None


def _best_metric(config, workdir) -> tuple[str, str]:
  """(metric, 'min' or 'max') the run ranked its checkpoints by: the trainer writes both, resolved, to config.json."""
  ckpt = config.get("checkpoint", {})
  metric, mode = ckpt.get("best_metric"), ckpt.get("best_mode")
  if not metric or metric == "auto" or mode not in ("min", "max"):
    why = ("the run had no validation split (config.data.val_fraction), so no checkpoint was chosen by a metric"
           if metric is None else f"config.json names no resolved best metric (checkpoint.best_metric={metric!r}, "
           f"best_mode={mode!r})")
    raise ValueError(f"--workdir {workdir}: {why}; use --checkpoint last or a step")
  return metric, mode


def checkpoint_step(workdir, checkpoint="last") -> int:
  """The step of ``checkpoint``: 'last', 'best' (by the run's best metric in metrics.jsonl, among the steps still
  on disk) or a step number that is on disk."""
  workdir = os.fspath(workdir)
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir}: no checkpoint in {directory}")
  if checkpoint == "last":
    return steps[-1]
  if checkpoint == "best":
    metric, mode = _best_metric(read_config(workdir), workdir)
    scores = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(path):
      with open(path) as f:
        for line in f:
          row = json.loads(line) if line.strip() else {}
          if row.get("step") in steps and isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric]):
            scores[row["step"]] = row[metric]   # a resumed run's later row for a step wins
    if not scores:
      raise ValueError(f"--workdir {workdir}: none of the checkpoints (steps {steps}) has a {metric} in "
                       f"metrics.jsonl to pick the best by; use --checkpoint last or a step")
    # The best score; on a tie the later step (as the trainer's best-checkpoint policy keeps).
    return min(scores, key=lambda s: (scores[s] if mode == "min" else -scores[s], -s))
  try:
    step = int(checkpoint)
  except (TypeError, ValueError):
    raise ValueError(f"--checkpoint {checkpoint!r}: use 'last', 'best' or a step number") from None
  if step not in steps:
    raise FileNotFoundError(f"--workdir {workdir}: no checkpoint at step {step}; saved steps: {steps}")
  return step


def _restore_verified(workdir: str, step: int) -> dict:
  """The ``trainable``, ``frozen`` and ``batch_stats`` parts of checkpoint ``step`` as numpy, digests checked."""
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    meta = manager.item_metadata(step)
    tree = getattr(meta, "tree", meta)
    parts = {k: tree[k] for k in ("trainable", "frozen", "batch_stats") if k in tree}   # LoRA: no frozen base
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), parts)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, str(step), "default"),
        args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True))
    digests = manager.metadata(step).custom_metadata.get("array_sha256") or {}
  except Exception as e:   # noqa: BLE001 - Orbax and TensorStore raise many types for unreadable files
    raise ValueError(f"--workdir {workdir}: checkpoint step {step} cannot be read: "
                     f"{checkpoint_lib._first_line(e, 200)}") from None
  finally:
    manager.close()
  got = checkpoint_lib.array_digests(restored)
  if not digests:
    raise ValueError(f"--workdir {workdir}: checkpoint step {step} has no array digests (_CHECKPOINT_METADATA), so "
                     "it cannot be verified")
  if differ := sorted(p for p in got if digests.get(p) != got[p]):
    raise ValueError(f"--workdir {workdir}: checkpoint step {step} is damaged: {len(differ)} arrays read back "
                     f"different from what was saved, e.g. {listing(differ, 3)}")
  return restored


def variables_from_workdir(workdir, checkpoint="last", *, merge_lora: bool = True):
  """(the run's config, flat params ``{module path: array}``, flat BatchNorm statistics, step) of the checkpoint
  ``checkpoint`` picks (see ``checkpoint_step``): trainable and frozen together, with the base a LoRA or
  cached-feature run did not save rebuilt and checked (module docstring). A LoRA run's adapters come merged into
  their kernels (``transfer.models.lora.merge``) unless ``merge_lora`` is False."""
  workdir = os.path.abspath(os.fspath(workdir))
  config = read_config(workdir)
  step = checkpoint_step(workdir, checkpoint)
  restored = _restore_verified(workdir, step)
  trainable = rules.flatten(restored["trainable"] or {})
  frozen = rules.flatten(restored.get("frozen") or {})
  stats = rules.flatten(restored.get("batch_stats") or {})
  if os.path.isfile(os.path.join(workdir, BASE_FILE)):   # the checkpoint holds what trains only
    from transfer import train
    base_params, base_stats = train.rebuild_base(workdir, config, trainable)
    frozen = {**base_params, **frozen}
    stats = stats or base_stats
  if both := set(trainable) & set(frozen):
    raise ValueError(f"--workdir {workdir}: step {step} holds {listing(both, 3)} as both trainable and frozen")
  flat = {k: np.asarray(v) for k, v in {**frozen, **trainable}.items()}
  if merge_lora and any(lora.is_adapter(p) for p in flat):
    flat = lora.merge(flat, lora.targets(config.get("param_rules")))
  return config, flat, {k: np.asarray(v) for k, v in stats.items()}, step


def trainable_paths(workdir, checkpoint="last") -> list[str]:
  """The module paths of the parameters the run trained (its checkpoint's ``trainable`` part), from the metadata."""
  import orbax.checkpoint as ocp
  step = checkpoint_step(workdir, checkpoint)
  manager = ocp.CheckpointManager(os.path.join(os.fspath(workdir), "checkpoints"),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    meta = manager.item_metadata(step)
    return sorted(rules.flatten(getattr(meta, "tree", meta)["trainable"] or {}))
  finally:
    manager.close()


BASE_FILE = "base.json"   # the digests of a base a checkpoint does not hold (written by the trainer)


def classifier_from_workdir(workdir, checkpoint="last"):
  """(config, module, variables, class names, step) of a classification or regression run: the whole model (a
  cached-feature run's backbone re-attached to its head), LoRA merged, checked against the module's shapes."""
  config = read_config(workdir)
  task, class_names = read_labels(workdir)
  if task not in ("classification", "regression"):
    raise ValueError(f"--workdir {workdir} is a {task} run: it has no classifier (use transfer.generate for a "
                     "causal LM)")
  config, flat, stats, step = variables_from_workdir(workdir, checkpoint)
  module = models.build(config.model, len(class_names) or 1)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), models.example_batch(config.model.name)))
  check_params_fit(flat, {k: v.shape for k, v in rules.flatten(shapes.get("params", {})).items()},
                             f"--workdir {workdir} step {step}")
  variables = {"params": rules.unflatten(flat)}
  if stats:
    variables["batch_stats"] = rules.unflatten(stats)
  return config, module, variables, class_names, step
