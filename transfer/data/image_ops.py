"""Per-image operations on uint8 pixels: colour conversion, a one-time shrink, and the crops batches are cut from.

Images are shrunk once at load (``shrink``: shorter side to a bound a little above the training resolution, to
keep memory small); crops are boxes on that stored image, each resized to the training resolution in one PIL
resample (antialiased when it shrinks).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Aspect ratios (width / height) a random crop may take before it is resized to a square: a mild stretch.
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_TRIES = 10


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode as RGB. Transparent pixels are laid over white: their own colour is undefined (often black),
  and a cut-out photo or drawing is meant to be seen on a light page. 16-bit and 32-bit grey (``I;16``, ``I``,
  ``F``; 16-bit PNGs and TIFFs) are rescaled from 0-65535 to 0-255 (PIL's own conversion clips them at 255,
  which turns most pixels white); values already within 0-255 are kept."""
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I") or image.mode == "F":
    grey = np.asarray(image, np.float64)
    top = float(grey.max()) if grey.size else 0.0
    if grey.min() < 0 or top > 65535:
      raise ValueError(f"{image.mode} pixels from {grey.min():g} to {top:g}: not 8- or 16-bit grey levels")
    if image.mode.startswith("I;16") or top > 255:
      grey = grey * (255.0 / 65535.0)
    return Image.fromarray(np.round(grey).astype(np.uint8), "L").convert("RGB")
  if "A" in image.getbands() or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def from_array(pixels: np.ndarray) -> Image.Image:
  """A decoded (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array as a PIL image of the matching mode."""
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
    raise ValueError(f"expected uint8 pixels of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                     f"{pixels.dtype} {pixels.shape}")
  return Image.fromarray(pixels, {2: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1] if pixels.ndim == 3 else 2])


def shrink(image: Image.Image, short_side: int) -> Image.Image:
  """Downscales so the shorter side is ``short_side``, keeping the aspect ratio; smaller images are kept as they
  are (crops upscale them at batch time, so nothing is stored bigger than its source)."""
  w, h = image.size
  if min(w, h) <= short_side:
    return image
  scale = short_side / min(w, h)
  size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
  return image.resize(size, Image.BILINEAR, reducing_gap=3.0)


def center_box(width: int, height: int, fraction: float) -> tuple[int, int, int, int]:
  """The central square whose side is ``fraction`` of the shorter side, as (left, top, right, bottom)."""
  side = max(1, round(min(width, height) * fraction))
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def random_box(width: int, height: int, rng: np.random.Generator, min_area: float) -> tuple[int, int, int, int]:
  """An Inception-style random crop: area a uniform fraction in [min_area, 1] of the image, aspect ratio
  log-uniform in ``CROP_ASPECT``, position uniform. After ``CROP_TRIES`` misfits, the central square."""
  log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
  for _ in range(CROP_TRIES):
    area = width * height * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return center_box(width, height, 1.0)


def render(pixels: np.ndarray, box: tuple[int, int, int, int], resolution: int, flip: bool = False) -> np.ndarray:
  """``box`` of a (H, W, 3) uint8 image resized to (resolution, resolution, 3), mirrored left-right if ``flip``."""
  out = np.asarray(Image.fromarray(pixels).resize((resolution, resolution), Image.BILINEAR, box=box))
  return np.ascontiguousarray(out[:, ::-1]) if flip else out
