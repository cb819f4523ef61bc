"""A folder of image files, one subfolder per class (the folder's name is the class name).

Two layouts: ``ROOT/train/CLASS/*.jpg`` with ``ROOT/val/CLASS/*.jpg`` (or ``validation/``, ``test/``, or the names
in ``config.data.train_split`` / ``eval_split``); or ``ROOT/CLASS/*.jpg``, from which a stratified fraction
(``config.data.test_fraction``, by ``split_seed``) is held out for evaluation. Images may sit in nested folders
under their class folder. Files whose extension is not an image type (including ``.gif``: in real collections
GIFs are mostly placeholders and animations) are reported as skipped; hidden files (``.name``) are ignored.
"""
from __future__ import annotations

import os

from transfer.data import warn_if_eval_is_train
from transfer.data.images import ImageSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_FOLDERS = ("val", "validation", "test")
LAYOUT = "ROOT/CLASS/*.jpg, or ROOT/train/CLASS/*.jpg with ROOT/val/CLASS/*.jpg"


def sources(cfg) -> tuple[ImageSource, ImageSource | None]:
  """(train, eval) listings; eval is None for the single-folder layout (the caller holds a fraction out)."""
  root = cfg.get("data_dir")
  if not root:
    raise ValueError(f"config.data.data_dir: set it to the image folder ({LAYOUT})")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.data.data_dir={root!r} is not a folder (expected {LAYOUT})")
  train_dir = os.path.join(root, cfg.get("train_split") or "train")
  if not os.path.isdir(train_dir):
    if cfg.get("train_split"):
      raise FileNotFoundError(f"config.data.train_split={cfg.train_split!r}: there is no folder {train_dir}")
    # The single-folder layout: every subfolder is a class. A split folder here would become a class of its own
    # and mislabel everything, so its presence (or a named eval split) asks for the training folder's name.
    split_like = [e for e in EVAL_FOLDERS if os.path.isdir(os.path.join(root, e))]
    if cfg.get("eval_split") or split_like:
      raise FileNotFoundError(
          f"config.data.data_dir={root!r} has no train/ folder, but " + (
              f"config.data.eval_split={cfg.eval_split!r} is set" if cfg.get("eval_split") else
              f"it has {split_like[0]}/, which would be taken for a class") +
          ": name the training folder in config.data.train_split")
    return listing(root), None
  eval_name = cfg.get("eval_split") or next((e for e in EVAL_FOLDERS if os.path.isdir(os.path.join(root, e))), None)
  if eval_name is None:
    raise FileNotFoundError(f"{root} has a {os.path.basename(train_dir)}/ folder but none of {list(EVAL_FOLDERS)} "
                            "next to it: name the evaluation folder in config.data.eval_split")
  eval_dir = os.path.join(root, eval_name)
  if not os.path.isdir(eval_dir):
    raise FileNotFoundError(f"config.data.eval_split={eval_name!r}: there is no folder {eval_dir}")
  warn_if_eval_is_train(train_dir, eval_dir, "eval_split", paths=True)
  train = listing(train_dir)
  return train, listing(eval_dir, train.class_names)


def listing(directory: str, class_names: list[str] | None = None) -> ImageSource:
  """The image files under ``directory/CLASS/``, sorted. ``class_names`` (an evaluation split): the training
  classes, which fix the label ids; a class folder not among them is an error, a missing one is allowed (the loader
  warns that the class goes unmeasured). A training class folder without image files is an error: its class could
  never be learnt."""
  training = class_names is None
  entries = sorted(os.scandir(directory), key=lambda e: e.name)
  folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
  rejected = [(e.path, "not inside a class folder") for e in entries if e.is_file() and not e.name.startswith(".")]
  if not folders:
    raise ValueError(f"{directory}: no class folders (expected {LAYOUT})")
  if class_names is None:
    class_names = folders
  else:
    extra = [f for f in folders if f not in class_names]
    if extra:
      raise ValueError(f"{directory}: class folder(s) {extra} are not among the training classes {class_names}")
  paths, labels = [], []
  for label, name in enumerate(class_names):
    found = 0
    for parent, subfolders, files in os.walk(os.path.join(directory, name)):
      subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
      for file in sorted(f for f in files if not f.startswith(".")):
        path = os.path.join(parent, file)
        if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
          paths.append(path)
          labels.append(label)
          found += 1
        else:
          rejected.append((path, f"not an image file type ({', '.join(IMAGE_EXTENSIONS)})"))
    if training and not found:
      raise ValueError(f"{os.path.join(directory, name)}: a class folder without image files "
                       f"({', '.join(IMAGE_EXTENSIONS)})")

  def read(rows):
    for i in rows:
      yield paths[i], paths[i], labels[i]

  return ImageSource(directory, len(paths), list(class_names), read, rejected)
