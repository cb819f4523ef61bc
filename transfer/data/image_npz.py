"""Images and class ids from ``.npz`` files (``numpy.savez``): ``config.data.train_file`` and, optionally,
``eval_file`` (without it a stratified ``test_fraction`` of train is held out).

Each file holds ``image`` (N, H, W, 3) uint8 (grey (N, H, W) or (N, H, W, 1) and RGBA (N, H, W, 4) are converted to
RGB), ``label`` (N,) integer class ids, and optionally ``class_names`` (C,) strings (default: "0", "1", ...).
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from transfer.data import warn_if_eval_is_train
from transfer.data.images import ImageSource

LAYOUT = ("'image' (N, H, W, 3) uint8 (or grey (N, H, W) / (N, H, W, 1), RGBA (N, H, W, 4)), 'label' (N,) integer "
          "class ids, optionally 'class_names' (C,) strings")
CHANNELS = (1, 3, 4)


def sources(cfg) -> tuple[ImageSource, ImageSource | None]:
  if not cfg.get("train_file"):
    raise ValueError(f"config.data.train_file: set it to an .npz file holding {LAYOUT}")
  train = read(cfg.train_file, "config.data.train_file")
  if not cfg.get("eval_file"):
    return train, None
  warn_if_eval_is_train(cfg.train_file, cfg.eval_file, "eval_file", paths=True)
  return train, read(cfg.eval_file, "config.data.eval_file", train.class_names)


def _arrays(path: str) -> dict[str, np.ndarray]:
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e}); expected arrays {LAYOUT}") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: a single array ({archive.dtype} {archive.shape}), not an .npz archive of named "
                     f"arrays; expected {LAYOUT} (numpy.savez(path, image=..., label=...))")
  with archive:
    missing = [k for k in ("image", "label") if k not in archive.files]
    if missing:
      raise ValueError(f"{path}: no array {missing[0]!r} (the file has {sorted(archive.files)}); expected {LAYOUT}")
    out = {}
    for key in ("image", "label", "class_names"):
      if key in archive.files:
        try:
          out[key] = archive[key]
        except ValueError:
          raise ValueError(f"{path}: array {key!r} holds Python objects; store plain numbers or strings") from None
  return out


def read(path: str, field: str, class_names: list[str] | None = None) -> ImageSource:
  """One file's split; ``class_names``: the training file's, which an evaluation file must agree with."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}={path!r} does not exist")
  arrays = _arrays(path)
  image, label = arrays["image"], arrays["label"]
  if image.dtype != np.uint8:
    raise ValueError(f"{path}: array 'image' is {image.dtype}; expected uint8 pixels 0-255 (floats in [0, 1]: "
                     "np.round(x * 255).astype(np.uint8))")
  if image.ndim == 4 and image.shape[1] in CHANNELS and image.shape[-1] not in CHANNELS:
    raise ValueError(f"{path}: array 'image' has shape {image.shape}, channels first (N, C, H, W); expected "
                     "(N, H, W, C): image.transpose(0, 2, 3, 1)")
  if not (image.ndim == 3 or (image.ndim == 4 and image.shape[-1] in CHANNELS)):
    raise ValueError(f"{path}: array 'image' has shape {image.shape}; expected {LAYOUT}")
  if label.ndim == 2:
    raise ValueError(f"{path}: array 'label' has shape {label.shape}; expected (N,) class ids (one-hot rows: "
                     "label.argmax(1))")
  if label.ndim != 1 or not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f"{path}: array 'label' is {label.dtype} {label.shape}; expected (N,) integer class ids")
  if len(label) != len(image):
    raise ValueError(f"{path}: array 'label' has {len(label)} rows but 'image' has {len(image)}")
  if not len(label):
    raise ValueError(f"{path}: arrays 'image' and 'label' are empty")
  if label.min() < 0:
    raise ValueError(f"{path}: array 'label' holds {label.min()}; class ids start at 0")
  names = _class_names(path, arrays, int(label.max()) + 1)
  if class_names is not None:
    if "class_names" in arrays and names != class_names:
      raise ValueError(f"{path}: array 'class_names' {names} differs from the training file's {class_names}")
    names = class_names

  def read_rows(rows):
    for i in rows:
      yield f"{path}:image[{i}]", image[i], int(label[i])

  return ImageSource(path, len(label), names, read_rows)


def _class_names(path: str, arrays: dict, needed: int) -> list[str]:
  if "class_names" not in arrays:
    return [str(i) for i in range(needed)]
  names = arrays["class_names"]
  if names.ndim != 1 or names.dtype.kind not in "US":
    raise ValueError(f"{path}: array 'class_names' is {names.dtype} {names.shape}; expected (C,) strings")
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
  if len(names) < needed:
    raise ValueError(f"{path}: array 'label' holds class id {needed - 1} but 'class_names' names only "
                     f"{len(names)} classes")
  return names
