"""Feature extraction done once: a frozen backbone's features over a dataset, cached on disk.

When every backbone parameter is frozen and the backbone runs in inference mode, it is a fixed function of the
input, so running it every epoch is wasted work. The trainer then extracts the features of each split once (one
forward pass), stores them under a key made of everything that determines them (model and data config, split, a
digest of the backbone's weights and BatchNorm statistics, and a digest of the split's decoded inputs and labels),
and trains the head alone on them. A second run with the same key reuses them; an edited file, a photo moved to
another class folder or a re-converted checkpoint gives a new key.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from transfer import distributed, models, rules
from transfer import sharding as sharding_lib
from transfer.data import ArrayDataset


def digest(flat: dict[str, np.ndarray]) -> str:
  """sha1 over names, shapes, dtypes and bytes: a different checkpoint gives a different cache key."""
  h = hashlib.sha1()
  for name in sorted(flat):
    value = np.ascontiguousarray(flat[name])
    h.update(f"{name}:{value.shape}:{value.dtype}".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def data_digest(dataset) -> str:
  """sha1 over a split's decoded inputs (images one by one, or the token arrays) and its labels, in row order:
  the cache must not pair stored features with other rows or labels when the files behind a config change."""
  h = hashlib.sha1()
  rows = dataset.images if hasattr(dataset, "images") else [dataset.inputs[k] for k in sorted(dataset.inputs)]
  for value in [*rows, dataset.labels]:
    value = np.ascontiguousarray(value)
    h.update(f"{value.shape}:{value.dtype}".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def cache_key(*parts) -> str:
  return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def extract(apply_fn: Callable, dataset: ArrayDataset, batch_size: int, sharding, desc: str) -> np.ndarray:
  """``apply_fn(batch) -> (B, D)`` over every example once (padded last batch), as float32 (N, D)."""
  out = []
  n_batches = -(-len(dataset) // batch_size)
  for batch in tqdm(dataset.eval_batches(batch_size), total=n_batches, desc=desc, dynamic_ncols=True,
                    disable=distributed.progress_disabled()):
    mask = batch.pop("mask")
    batch.pop("label")
    feats = np.asarray(distributed.to_host(apply_fn(jax.device_put(batch, sharding))), np.float32)
    out.append(feats[mask > 0])
  return np.concatenate(out)


def cached(directory: str, key: str, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
  """(features, whether they came from the cache); written to a temporary file and renamed, so a killed run
  never leaves a partial cache entry behind. With several processes, process 0 decides whether the entry exists
  and writes it; all of them extract (``compute`` is collective) or read it."""
  path = os.path.join(directory, f"{key}.npy")
  if distributed.broadcast(np.bool_(os.path.exists(path))):
    return np.load(path), True
  features = compute()
  if not distributed.is_main():
    return features, False
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, features)
  os.replace(tmp, path)
  return features, False


def extract_or_reuse(config, workdir: str, params: dict, batch_stats, splits: dict[str, ArrayDataset], sharding,
                     batch_size: int) -> dict[str, tuple[np.ndarray, bool]]:
  """``{split: (features (N, D), reused)}`` of the backbone in ``params`` (flat, inference mode) over each split.

  The one place both the trainer and ``transfer.probe`` get features from, so they share cache entries: directory
  ``config.feature_cache_dir`` or ``WORKDIR/features``, key = model and data config, split, backbone digest
  (parameters and BatchNorm statistics), data digest."""
  backbone = {p: v for p, v in params.items() if p.startswith("backbone/")}
  variables = {"params": rules.unflatten(backbone), "batch_stats": batch_stats}
  feature_model = models.build(config.model, None)   # the classifier without its head: pooled features
  # The weights are an argument (not constants baked into the program, which XLA would fold and copy), placed
  # once on every device of the batch's mesh; the batch is split over all of them.
  forward = jax.jit(lambda v, batch: feature_model.apply(v, batch, train=False),
                    compiler_options=models.compiler_options(config.model))
  placed = jax.device_put(variables, None if sharding is None else sharding_lib.replicated(sharding.mesh))
  apply_fn = lambda batch: forward(placed, batch)
  weights = digest({**backbone, **{f"batch_stats/{k}": v for k, v in rules.flatten(batch_stats or {}).items()}})
  directory = config.get("feature_cache_dir") or os.path.join(workdir, "features")
  out = {}
  for split, ds in splits.items():
    key = cache_key(config.model.to_dict(), config.data.to_dict(), split, weights, data_digest(ds))
    feats, hit = cached(directory, key, lambda: extract(apply_fn, ds, batch_size, sharding, desc=f"features {split}"))
    if distributed.is_main():
      print(f"features: {split} {feats.shape} {'reused from' if hit else 'extracted to'} {directory}/{key}.npy",
            flush=True)
    out[split] = (feats, hit)
  return out
