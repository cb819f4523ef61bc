"""Image classification data: decoded once to a bounded size on the host, cropped and flipped per batch.

Photos differ in size, so a split is a list of uint8 (H, W, 3) arrays whose shorter side is at most
``ceil(resolution / eval_crop)`` (bigger ones are shrunk once, at load; a JPEG is decoded at reduced scale to begin
with, and files of other formats far larger than needed are reported, since they can only be decoded whole).
Batches are cut at request time: training rows get a random crop and flip from a generator seeded by (seed, step,
row), so batch ``s`` is a pure function of the seed and ``s`` and a resumed run sees the same batches; evaluation
rows get the central crop, with no randomness. The model normalises pixels itself (uint8 in), so nothing here
depends on the model.

Three sources give the same datasets: a folder of image files (``image_folder``), ``.npz`` arrays (``npz``) and
TFDS datasets by name (``tfds_image``). Grey, palette and RGBA images become RGB; files that are not usable images
are skipped and reported, or stop the load with ``config.data.strict``.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps

from transfer.data import eval_rows, holdout_rows, image_ops, train_rows

AUGMENTATIONS = ("crop_flip", "flip", "none")
AUGMENT_STREAM = 0x637270   # keeps the crop generators apart from the data order's (seed, epoch) generators
REPORT_FIRST = 5            # unusable files named in a report
SURVEY_IMAGES = 32          # images measured for the auto rule's resolution
# A file decoded with a shorter side this many times the one stored (64x the pixels) is reported: a JPEG only
# when even its 1/8 draft is that large, other formats (decoded whole) whenever they are.
OVERSIZE = 8
# What PIL raises for a file that is not an image, is truncated or corrupt, or is too large to be safe.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Raw = str | np.ndarray   # a file path, or decoded pixels


class ImageSource(NamedTuple):
  """One split before decoding. ``read(rows)`` yields ``(where, path or pixels, label)`` for those rows; ``where``
  names the image in messages. ``rejected``: ``(where, reason)`` of entries known to be unusable up front."""
  name: str
  count: int
  class_names: list[str]
  read: Callable[[np.ndarray], Iterator[tuple[str, Raw, int]]]
  rejected: Sequence[tuple[str, str]] = ()


class Decoded(NamedTuple):
  images: list[np.ndarray]   # uint8 (H, W, 3)
  labels: np.ndarray         # (N,) int32
  where: list[str]

  def take(self, rows: np.ndarray) -> Decoded:
    return Decoded([self.images[i] for i in rows], self.labels[rows], [self.where[i] for i in rows])


@dataclasses.dataclass
class ImageDataset:
  """Images of different sizes and their class ids, with ``ArrayDataset``'s interface: ``train_batch`` and
  ``eval_batches`` give ``image`` (B, resolution, resolution, 3) uint8 and ``label`` (B,) int32.

  Training rows (``augment``): 'crop_flip', a random crop of ``crop_min_area`` to all of the image's area
  (``image_ops.random_box``) and a coin-flip mirror; 'flip', the evaluation crop and the mirror; 'none', the
  evaluation crop. Evaluation rows: the central square of ``eval_crop`` of the shorter side. ``eval_batches`` is
  also what a feature cache reads, so cached training features come from the evaluation preprocessing, without
  augmentation.
  """
  images: list[np.ndarray]
  labels: np.ndarray
  class_names: list[str]
  name: str
  resolution: int
  augment: str = "crop_flip"
  crop_min_area: float = 0.08
  eval_crop: float = 0.875

  regression = False
  task = "classification"

  def __post_init__(self):
    if not self.images:
      raise ValueError(f"{self.name}: the dataset is empty")
    if len(self.images) != len(self.labels):
      raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f"config.data.augment: {self.augment!r} is not one of {list(AUGMENTATIONS)}")
    for field in ("crop_min_area", "eval_crop"):
      if not 0.0 < getattr(self, field) <= 1.0:
        raise ValueError(f"config.data.{field}={getattr(self, field)}: must be in (0, 1]")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_outputs(self) -> int:
    return len(self.class_names)

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Batch ``step``: the rows ``ArrayDataset`` would draw, each augmented with its own (seed, step, row)
    generator."""
    rows = train_rows(len(self), step, batch_size, seed)
    images = [self._train_view(self.images[r], np.random.default_rng([seed, step, i, AUGMENT_STREAM]))
              for i, r in enumerate(rows)]
    return {"image": np.stack(images), "label": self.labels[rows]}

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every image once, central crop; the last batch is padded and carries ``mask`` 0 on the padding."""
    for rows, mask in eval_rows(len(self), batch_size):
      yield {"image": np.stack([self.eval_view(self.images[r]) for r in rows]), "label": self.labels[rows],
             "mask": mask}

  def subset(self, rows: np.ndarray, name: str) -> ImageDataset:
    """The rows ``rows`` as a dataset of their own (a validation split: ``data.split_validation``)."""
    return dataclasses.replace(self, images=[self.images[i] for i in rows], labels=self.labels[rows], name=name)

  def eval_view(self, pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    return image_ops.render(pixels, image_ops.center_box(w, h, self.eval_crop), self.resolution)

  def _train_view(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.augment == "none":
      return self.eval_view(pixels)
    h, w = pixels.shape[:2]
    box = (image_ops.random_box(w, h, rng, self.crop_min_area) if self.augment == "crop_flip"
           else image_ops.center_box(w, h, self.eval_crop))
    return image_ops.render(pixels, box, self.resolution, flip=bool(rng.random() < 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Decoding: every source's images go through here.
# ----------------------------------------------------------------------------------------------------------------
class DecodedImage(NamedTuple):
  pixels: np.ndarray                 # uint8 (H, W, 3), shorter side at most the asked one
  mode: str                          # the source's PIL mode
  decoded_size: tuple[int, int]      # (width, height) the decoder produced: a JPEG's reduced draft, else full size


def read_image(raw: Raw, short_side: int) -> DecodedImage:
  """A path or decoded pixels -> ``DecodedImage``. A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose
  shorter side still reaches ``short_side`` (PIL's ``draft``); other formats can only be decoded whole, and
  ``decode_source`` reports the files whose decode was far larger than needed. Nothing else is copied at full
  size: the EXIF rotation is applied in place and ``shrink`` resizes in one step."""
  image = image_ops.from_array(raw) if isinstance(raw, np.ndarray) else Image.open(raw)   # a file: header only
  with image:
    mode = image.mode
    image.draft("RGB", (short_side, short_side))
    ImageOps.exif_transpose(image, in_place=True)   # a phone photo's EXIF orientation: upright, as viewers show it
    decoded_size = image.size
    return DecodedImage(np.asarray(image_ops.shrink(image_ops.to_rgb(image), short_side)), mode, decoded_size)


def decode_image(raw: Raw, short_side: int) -> tuple[np.ndarray, str]:
  """A path or decoded pixels -> (uint8 (H, W, 3) with shorter side at most ``short_side``, original mode)."""
  pixels, mode, _ = read_image(raw, short_side)
  return pixels, mode


def decode_source(source: ImageSource, short_side: int, *, strict: bool) -> Decoded:
  """All of ``source``, decoded. Unusable files are skipped with a report that counts them and names the first
  few; with ``strict`` the same report is an error."""
  images, labels, where = [], [], []
  bad, converted, oversize = list(source.rejected), collections.Counter(), []
  for name, raw, label in source.read(np.arange(source.count)):
    try:
      pixels, mode, decoded_size = read_image(raw, short_side)
    except UNREADABLE as e:
      bad.append((name, f"{type(e).__name__}: {e}"))
      continue
    images.append(pixels)
    labels.append(label)
    where.append(name)
    if mode != "RGB":
      converted[mode] += 1
    if isinstance(raw, str) and min(decoded_size) >= OVERSIZE * short_side:
      oversize.append((decoded_size[0] * decoded_size[1], decoded_size, name))
  total = source.count + len(source.rejected)
  if bad:
    listing = "; ".join(f"{w} ({why})" for w, why in bad[:REPORT_FIRST]) + ("; ..." if len(bad) > REPORT_FIRST else "")
    if strict:
      raise ValueError(f"{source.name}: {len(bad)} of {total} files are not usable images (config.data.strict=True): "
                       f"{listing}")
    print(f"data: {source.name}: skipped {len(bad)} of {total} files that are not usable images: {listing} "
          "(config.data.strict=True makes this an error)", flush=True)
  if converted:
    print(f"data: {source.name}: converted {sum(converted.values())} images to RGB (from "
          f"{', '.join(f'{m}: {k}' for m, k in sorted(converted.items()))})", flush=True)
  if oversize:
    area, (width, height), name = max(oversize)
    print(f"warning: {source.name}: {len(oversize)} of {total} files were decoded with a shorter side at least "
          f"{OVERSIZE}x the {short_side} px kept, the largest {name} at {width}x{height} ({area * 3 / 1e6:.0f} MB "
          "as RGB): only JPEGs decode at reduced size; shrinking the files beforehand (or saving them as JPEG) saves "
          "that memory and time", flush=True)
  if not images:
    raise ValueError(f"{source.name}: no usable images (of {total} files)")
  return Decoded(images, np.asarray(labels, np.int32), where)


def typical_short_side(source: ImageSource) -> int:
  """Median shorter side of up to ``SURVEY_IMAGES`` evenly spaced images, from headers where possible."""
  rows = np.unique(np.linspace(0, source.count - 1, min(SURVEY_IMAGES, source.count)).round().astype(np.int64))
  sides = []
  for _, raw, _ in source.read(rows):
    if isinstance(raw, np.ndarray):
      sides.append(min(raw.shape[:2]))
      continue
    try:
      with Image.open(raw) as image:
        sides.append(min(image.size))
    except UNREADABLE:
      continue
  if not sides:
    raise ValueError(f"{source.name}: none of {len(rows)} sampled files is a readable image")
  return int(np.median(sides))


# ----------------------------------------------------------------------------------------------------------------
# Splits and subsets.
# ----------------------------------------------------------------------------------------------------------------
def subset_rows(labels: np.ndarray, *, per_class: int | None, examples: int | None, seed: int) -> np.ndarray:
  """Rows kept for training: the first ``per_class`` of each class, or the first ``examples``, in a permutation
  fixed by ``seed`` (so a 10-per-class subset lies inside the 50-per-class one)."""
  order = np.random.default_rng(seed).permutation(len(labels))
  if per_class and examples:
    raise ValueError("config.data: set only one of train_per_class and train_examples")
  if per_class:
    counts = np.bincount(labels)
    rarest = int(counts[counts > 0].min())
    if not 1 <= per_class <= rarest:
      raise ValueError(f"config.data.train_per_class={per_class}: must be between 1 and {rarest} (the rarest "
                       "class's training images)")
    return np.sort(np.concatenate([order[labels[order] == c][:per_class] for c in np.flatnonzero(counts)]))
  if examples:
    if not 1 <= examples <= len(labels):
      raise ValueError(f"config.data.train_examples={examples}: must be between 1 and {len(labels)}")
    return np.sort(order[:examples])
  return np.arange(len(labels))


# ----------------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------------
def sources(cfg) -> tuple[ImageSource, ImageSource | None]:
  """(train, eval or None) for ``config.data.name``; None: hold out a fraction of train."""
  from transfer.data import image_folder, image_npz, tfds_image
  kinds = {"image_folder": image_folder, "npz": image_npz, "tfds_image": tfds_image}
  return kinds[cfg.name].sources(cfg)


def load(cfg) -> tuple[ImageDataset, ImageDataset]:
  """(train, eval) datasets for ``config.data`` (see ``transfer/config_base.py``)."""
  resolution = cfg.resolution
  if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
    raise ValueError(f"config.data.resolution={resolution!r}: expected a number of pixels ('auto' is resolved by "
                     "the trainer: transfer.hyper_rule)")
  eval_crop = cfg.get("eval_crop", 0.875)
  if not 0.0 < eval_crop <= 1.0:
    raise ValueError(f"config.data.eval_crop={eval_crop}: must be in (0, 1]")
  short_side, strict = math.ceil(resolution / eval_crop), bool(cfg.get("strict", False))
  train_src, eval_src = sources(cfg)
  class_names = train_src.class_names
  if len(class_names) < 2:
    raise ValueError(f"{train_src.name}: only {len(class_names)} class {class_names}; classification needs at "
                     "least 2")
  train = decode_source(train_src, short_side, strict=strict)
  train_name = train_src.name
  if eval_src is None:
    fraction = cfg.get("test_fraction", 0.2)
    kept, held = holdout_rows(train.labels, fraction, cfg.get("split_seed", 0), field="data.test_fraction")
    train, evaluation = train.take(kept), train.take(held)
    train_name, eval_name = f"{train_src.name}[train {1 - fraction:.0%}]", f"{train_src.name}[held-out {fraction:.0%}]"
  else:
    evaluation, eval_name = decode_source(eval_src, short_side, strict=strict), eval_src.name
  for split, d in (("train", train), ("eval", evaluation)):
    bad = (d.labels < 0) | (d.labels >= len(class_names))
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(f"{d.where[i]}: label {d.labels[i]} is not one of the {len(class_names)} classes "
                       f"{class_names[:10]}{' ...' if len(class_names) > 10 else ''} ({split} split)")
  # A class with no evaluation images is trained but never measured: said, with the cause.
  unmeasured = [name for c, name in enumerate(class_names) if not (evaluation.labels == c).any()]
  if unmeasured:
    why = (f"config.data.test_fraction={fraction} held out none of their images: raise it, or add images" if
           eval_src is None else "the evaluation split has none of their images")
    listed = f"{unmeasured[:10]}{f' and {len(unmeasured) - 10} more' if len(unmeasured) > 10 else ''}"
    print(f"warning: {eval_name}: no evaluation images of class(es) {listed} ({why}): accuracy covers the other "
          "classes only", flush=True)
  per_class, examples = cfg.get("train_per_class"), cfg.get("train_examples")
  train = train.take(subset_rows(train.labels, per_class=per_class, examples=examples, seed=cfg.get("split_seed", 0)))
  suffix = f"[{per_class}/class]" if per_class else f"[{examples} examples]" if examples else ""
  options = dict(resolution=resolution, augment=cfg.get("augment", "crop_flip"),
                 crop_min_area=cfg.get("crop_min_area", 0.08), eval_crop=eval_crop)
  return (ImageDataset(train.images, train.labels, class_names, train_name + suffix, **options),
          ImageDataset(evaluation.images, evaluation.labels, class_names, eval_name, **options))
