"""Key-table pieces shared by the image families: PyTorch conv and BatchNorm rows, and picking a checkpoint's layout.

A family may load checkpoints written in several layouts (torchvision/timm state dicts, Google's ``.npz`` files);
each layout has its own explicit key table, and ``choose_layout`` decides which one applies from marker keys,
so a file in an unknown layout fails at once with its own key names instead of a long list of unmatched keys.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from transfer.convert import ConversionError, KeyRow


def torch_conv_kernel(w: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO; for depthwise (C, 1, kh, kw) this gives flax's (kh, kw, 1, C) grouped layout."""
  return np.transpose(w, (2, 3, 1, 0))


def torch_linear_kernel(w: np.ndarray) -> np.ndarray:
  """(out, in) -> (in, out); a 1x1 conv used as a classifier, (out, in, 1, 1), counts as a linear layer."""
  if w.ndim == 4:
    if w.shape[2:] != (1, 1):
      raise ConversionError(f"expected a linear or 1x1 conv weight, got shape {w.shape}")
    w = w[:, :, 0, 0]
  return np.transpose(w)


def torch_batchnorm_rows(source: str, target: str) -> list[KeyRow]:
  """BatchNorm2d's five entries -> flax scale/bias (params) and mean/var (batch_stats); the step counter is dropped.

  ``target`` is the module path under ``backbone/`` (may hold ``\\1``-style groups of ``source``)."""
  return [(source + r'\.weight', f'params/backbone/{target}/scale', None),
          (source + r'\.bias', f'params/backbone/{target}/bias', None),
          (source + r'\.running_mean', f'batch_stats/backbone/{target}/mean', None),
          (source + r'\.running_var', f'batch_stats/backbone/{target}/var', None),
          (source + r'\.num_batches_tracked', None, None)]


def choose_layout(state: Mapping[str, np.ndarray], markers: Mapping[str, str], *, family: str,
                  source_name: str) -> str:
  """The one layout in ``markers`` (name -> regex a key of that layout fully matches) that ``state`` is in.

  No match, or several, is an error naming the layouts looked for and some of the file's own keys."""
  found = [name for name, marker in markers.items() if any(re.fullmatch(marker, k) for k in state)]
  if len(found) == 1:
    return found[0]
  expected = "; ".join(f"{name} (a key like {marker!r})" for name, marker in markers.items())
  keys = sorted(state)
  shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
  what = "matches several" if found else "is in none"
  raise ConversionError(f"{source_name} {what} of the {family} checkpoint layouts: {expected}. "
                        f"Its keys: {shown or '(none)'}")
