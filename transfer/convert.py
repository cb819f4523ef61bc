"""Checkpoint conversion: explicit key tables and a strict diff against the model's own variables.

Two steps, both strict:
1. ``apply_key_table`` renames a foreign state dict (PyTorch names) into Flax variable paths
   (``params/backbone/stem/conv/kernel``, ``batch_stats/...``); every source key must be claimed by a table row.
2. ``merge_pretrained`` puts converted arrays into freshly initialised variables; every model variable must be
   loaded and every loaded array must land, unless the ``load`` rule for its path says otherwise.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

# A key-table row: (source regex, target template with \1-style groups or None to drop, transform or None).
KeyRow = tuple[str, "str | None", "Callable[[np.ndarray], np.ndarray] | None"]


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending key."""


def _listing(title: str, keys: Sequence[str], limit: int = 25) -> str:
  shown = "\n    ".join(keys[:limit]) + ("\n    ..." if len(keys) > limit else "")
  return f"  {title} ({len(keys)}):\n    {shown}"


def apply_key_table(source: Mapping[str, np.ndarray], table: Sequence[KeyRow], *,
                    source_name: str) -> dict[str, np.ndarray]:
  """Renames ``source`` keys through ``table`` (first matching row wins; rows with target None drop the key)."""
  compiled = [(re.compile(pattern), target, fn) for pattern, target, fn in table]
  out, unmatched, origin = {}, [], {}
  for key, value in source.items():
    for pattern, target, fn in compiled:
      m = pattern.fullmatch(key)
      if m:
        break
    else:
      unmatched.append(key)
      continue
    if target is None:
      continue
    new_key = m.expand(target)
    if new_key in out:
      raise ConversionError(f"{source_name}: keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
    value = np.asarray(value)
    out[new_key], origin[new_key] = (fn(value) if fn else value), key
  if unmatched:
    raise ConversionError(f"{source_name}: the key table has no row for these checkpoint keys "
                          f"(is this the right model family?)\n" + _listing("unmatched keys", sorted(unmatched)))
  return out


def strip_collection(path: str) -> str:
  """``params/head/kernel`` -> ``head/kernel``: rules speak of module paths, whatever the collection."""
  return path.split("/", 1)[1] if "/" in path else path


def merge_pretrained(init: Mapping[str, np.ndarray], loaded: Mapping[str, np.ndarray], *,
                     should_load: Callable[[str], bool], source_name: str
                     ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """Returns (variables, report): ``init`` with every loadable path replaced by the converted array.

  ``init`` and ``loaded`` are flat ``{collection/path: array}``. ``should_load(path)`` gets the path without
  its collection. A missing, unexpected or mis-shaped variable is an error unless ``should_load`` is False.
  Loaded arrays are cast to the initialised variable's dtype.
  """
  missing, unexpected, mismatched = [], [], []
  merged, report = dict(init), {"loaded": [], "kept_init": [], "dropped": []}
  for path, value in init.items():
    if not should_load(strip_collection(path)):
      report["kept_init"].append(path)
    elif path not in loaded:
      missing.append(path)
    elif tuple(loaded[path].shape) != tuple(value.shape):
      mismatched.append(f"{path}: checkpoint {tuple(loaded[path].shape)} vs model {tuple(value.shape)}")
    else:
      merged[path] = np.asarray(loaded[path]).astype(value.dtype)
      report["loaded"].append(path)
  for path in loaded:
    if path not in init:
      (report["dropped"] if not should_load(strip_collection(path)) else unexpected).append(path)
  if missing or unexpected or mismatched:
    parts = [_listing(t, sorted(k)) for t, k in (("missing from checkpoint", missing),
             ("unexpected in checkpoint", unexpected), ("shape mismatch", mismatched)) if k]
    raise ConversionError(f"{source_name} does not fit the model; add a load=False rule for parameters that "
                          f"should start fresh.\n" + "\n".join(parts))
  return merged, report
