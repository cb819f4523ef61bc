"""Classification: one logit per class, softmax cross-entropy (label smoothing, mixup's soft targets), accuracy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from transfer.tasks.base import Task, masked_sum


class Classification(Task):
  name = "classification"
  best_metric = "eval/accuracy"
  batch_fields = ("label",)
  mixes_labels = True    # mixup may blend its labels

  def __init__(self, config):
    super().__init__(config)
    self.smoothing = float(config.get("label_smoothing", 0.0))

  def describe(self, train_ds) -> str:
    return f"{len(train_ds.class_names)} classes"

  def loss(self, logits, batch):
    """``label``: (B,) class ids, or (B, K) soft targets (mixup), smoothed by ``config.label_smoothing``."""
    labels = batch["label"]
    targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, logits.shape[-1])
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, self.smoothing)).mean()

  def eval_outputs(self, logits, batch):
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": masked_sum(loss, mask), "correct": masked_sum(correct, mask), "count": mask.sum()}, {}

  def metrics(self, sums, rows, eval_ds):
    return {"eval/accuracy": sums["correct"] / sums["count"], "eval/loss": sums["loss"] / sums["count"]}

  @staticmethod
  def predictions(logits: np.ndarray, class_names) -> list[dict]:
    """One ``{label, probabilities}`` per row: the predicted class name and each class's probability."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
    return [{"label": class_names[int(p.argmax())],
             "probabilities": {name: float(v) for name, v in zip(class_names, p)}} for p in probs]
