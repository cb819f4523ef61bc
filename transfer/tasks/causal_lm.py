"""Causal language modelling: next-token cross-entropy on the target tokens; eval loss and perplexity per token.

The data (``transfer/data/lm_text.py``) say which tokens are targets: ``loss_mask[:, t]`` 1 means token t is
predicted from the logits at t - 1 (a prompt is context, its response the target). The model's outputs are the
next-token logits (N, L, V).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from transfer.tasks.base import Task


def token_losses(logits, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``(loss, weight)``, each (N, L - 1): the cross-entropy of ``logits[:, t - 1]`` against ``input_ids[:, t]`` for
  t = 1 .. L - 1, and 1.0 where that token is a target (``loss_mask`` and ``attention_mask`` both 1), else 0.0. The
  loss is 0 where the weight is 0, so padding can never carry a non-finite value into a sum."""
  weight = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
  return jnp.where(weight > 0, loss, 0.0), weight


class CausalLM(Task):
  name = "causal_lm"
  best_metric = "eval/loss"
  best_mode = "min"
  batch_fields = ("loss_mask",)

  def check(self, config, train_ds) -> None:
    if config.get("label_smoothing", 0.0):
      raise ValueError(f"config.label_smoothing={config.label_smoothing} applies to class labels; the causal_lm "
                       "task predicts tokens: set it to 0")
    mixup = config.get("mixup", 0.0)
    if mixup not in (0, "auto", None):
      raise ValueError(f"config.mixup={mixup} blends images and their class labels; the causal_lm task has "
                       "neither: set it to 0")
    if "loss_mask" not in train_ds.inputs:
      raise ValueError(f"{train_ds.name}: causal-LM data need a 'loss_mask' input marking the target tokens")

  def describe(self, train_ds) -> str:
    return f"next-token prediction, {int(np.sum(train_ds.inputs['loss_mask'])):,} target tokens"

  def build_model(self, model_cfg, train_ds):
    from transfer import models
    return models.build_lm(model_cfg)

  def loss(self, logits, batch):
    """The mean cross-entropy over the batch's target tokens (0 for a batch with none)."""
    loss, weight = token_losses(logits, batch)
    return loss.sum() / jnp.maximum(weight.sum(), 1.0)

  def eval_outputs(self, logits, batch):
    """Summed token loss and target count over the real rows: every target token of the split counts once."""
    loss, weight = token_losses(logits, batch)
    real = batch["mask"][:, None].astype(jnp.float32)
    return {"loss": (loss * real).sum(), "tokens": (weight * real).sum()}, {}

  def metrics(self, sums, rows, eval_ds):
    if not sums["tokens"]:
      raise ValueError(f"{eval_ds.name}: the evaluation data have no target tokens")
    loss = sums["loss"] / sums["tokens"]
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss))}
