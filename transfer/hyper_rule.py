"""The auto rule: settings a config leaves at 'auto', picked from the training set's size and its images' size.

In the spirit of BiT-HyperRule (Kolesnikov et al., 2020, "Big Transfer"): a few dataset statistics decide the
schedule, so a new task needs no sweep to get a sound first run. The values are this project's:

- ``data.resolution``: 128 px when the training images are small (median shorter side under 96 px, as CIFAR's
  32, EuroSAT's 64 or digits' 8), else 224 px, the resolution ImageNet models are trained at (BiT goes to 384,
  which costs three times the compute of 224, too much for CPU runs).
- ``total_steps``: by training examples: under 20,000, 500 steps; under 500,000, 10,000; else 20,000 (BiT's
  tiers, taken at the config's batch size: with batches smaller than BiT's 512, fewer passes over the data).
- ``schedule.warmup_steps``: a tenth of the training steps.
- ``mixup``: alpha 0.1 from 20,000 training examples up (large sets can afford the regulariser's slower fit),
  else 0; also 0 when the frozen backbone's features are cached, since mixup blends images (and for text).

The trainer prints each pick with its reason and saves the filled-in config (``config.json``).
"""
from __future__ import annotations

from typing import Callable

AUTO = "auto"
SMALL_IMAGE_SIDE = 96
SMALL_DATASET, LARGE_DATASET = 20_000, 500_000

# Fields that take 'auto' or a number: (number type, smallest value, whether None (unset) is allowed).
FIELDS = {
    "data.resolution": (int, 1, False),
    "total_steps": (int, 1, True),
    "schedule.warmup_steps": (int, 0, True),
    "mixup": (float, 0.0, False),
}


def resolution(median_short_side: int) -> tuple[int, str]:
  if median_short_side < SMALL_IMAGE_SIDE:
    return 128, f"training images' median shorter side {median_short_side} px < {SMALL_IMAGE_SIDE}: small images"
  return 224, f"training images' median shorter side {median_short_side} px >= {SMALL_IMAGE_SIDE}"


def total_steps(train_examples: int) -> tuple[int, str]:
  if train_examples < SMALL_DATASET:
    return 500, f"{train_examples:,} training examples < {SMALL_DATASET:,}"
  if train_examples < LARGE_DATASET:
    return 10_000, f"{train_examples:,} training examples < {LARGE_DATASET:,}"
  return 20_000, f"{train_examples:,} training examples >= {LARGE_DATASET:,}"


def warmup_steps(total: int) -> tuple[int, str]:
  return round(total / 10), f"a tenth of {total} steps"


def mixup(train_examples: int, *, images: bool, features_cached: bool) -> tuple[float, str]:
  if not images:
    return 0.0, "mixup is for image classification"
  if features_cached:
    return 0.0, "the frozen backbone's features are cached; mixup would need the images"
  if train_examples < SMALL_DATASET:
    return 0.0, f"{train_examples:,} training examples < {SMALL_DATASET:,}"
  return 0.1, f"{train_examples:,} training examples >= {SMALL_DATASET:,}"


def apply(config, path: str, choose: Callable[[], tuple[object, str]], log: Callable[[str], None] = print) -> None:
  """If ``config.<path>`` is 'auto', sets it to ``choose()``'s value and logs the pick with its reason; otherwise
  checks that it is a number of the field's kind (or unset, where allowed)."""
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    return
  value = node[leaf]
  if value == AUTO:
    value, why = choose()
    node[leaf] = value
    log(f"auto: {path} = {value} ({why})")
    return
  kind, minimum, optional = FIELDS[path]
  if value is None and optional:
    return
  numeric = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
  if not numeric or value < minimum:
    raise ValueError(f"config.{path}={value!r}: expected 'auto' or {'an integer' if kind is int else 'a number'} "
                     f">= {minimum}{' (or None)' if optional else ''}")
