"""Mixup (Zhang et al., 2018) on the host: each training image blended with another of the same batch, and the
labels blended alike into soft targets.

The weight and the partners come from a generator seeded by (seed, step), so a mixed batch, like the batch
itself, is a pure function of the seed and the step.
"""
from __future__ import annotations

import numpy as np

MIXUP_STREAM = 0x6D6978   # keeps mixup's generator apart from the data order's and the crops' generators


def generator(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([seed, step, MIXUP_STREAM])


def mix(batch: dict[str, np.ndarray], alpha: float, num_classes: int, rng: np.random.Generator) -> dict:
  """One weight ``lam ~ Beta(alpha, alpha)`` for the batch and a random partner for each row:
  ``image = lam * image + (1 - lam) * image[partner]`` (rounded back to uint8, the pipeline's pixel type) and
  ``label`` becomes (B, num_classes) float32 ``lam * onehot(label) + (1 - lam) * onehot(label[partner])``."""
  if "image" not in batch:
    raise ValueError(f"config.mixup mixes images; this dataset's batches hold {sorted(batch)}")
  lam = float(rng.beta(alpha, alpha))
  partner = rng.permutation(len(batch["label"]))
  images = batch["image"].astype(np.float32)
  mixed = np.clip(np.round(lam * images + (1.0 - lam) * images[partner]), 0, 255).astype(batch["image"].dtype)
  onehot = np.eye(num_classes, dtype=np.float32)[batch["label"]]
  return {**batch, "image": mixed, "label": lam * onehot + (1.0 - lam) * onehot[partner]}
