"""scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes) as a small offline transfer task."""
from __future__ import annotations

import numpy as np
from PIL import Image

from transfer.data import ArrayDataset


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
  """8x8 grey in [0, 16] -> (resolution, resolution, 3) uint8, bilinear, grey copied to RGB."""
  out = np.empty((len(images), resolution, resolution, 3), np.uint8)
  for i, img in enumerate(images):
    grey = Image.fromarray(np.round(img * (255.0 / 16.0)).astype(np.uint8))
    out[i] = np.asarray(grey.resize((resolution, resolution), Image.BILINEAR))[..., None]
  return out


def load(*, resolution: int, per_class: int | None = None, test_fraction: float = 0.2,
         split_seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
  """A fixed stratified train/test split; ``per_class`` keeps that many training images of each class.

  The subset for ``per_class=k`` is the first k of each class in a permutation fixed by ``split_seed``, so the
  10-shot set is contained in the 50-shot set and the test split never changes.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x, y = digits.images, digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
  if per_class is not None:
    order = np.random.default_rng(split_seed).permutation(len(y_train))
    counts = {int(c): int((y_train == c).sum()) for c in np.unique(y_train)}
    if per_class < 1 or per_class > min(counts.values()):
      raise ValueError(f"config.data.train_per_class={per_class}: must be between 1 and "
                       f"{min(counts.values())} (the rarest class's training images)")
    keep = np.concatenate([order[y_train[order] == c][:per_class] for c in sorted(counts)])
    keep.sort()
    x_train, y_train = x_train[keep], y_train[keep]
  names = [str(d) for d in range(10)]
  suffix = f"[{per_class}/class]" if per_class else ""
  return (ArrayDataset({"image": _resize(x_train, resolution)}, y_train, names, f"digits/train{suffix}"),
          ArrayDataset({"image": _resize(x_test, resolution)}, y_test, names, "digits/test"))
