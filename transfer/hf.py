"""Reading Hugging Face checkpoint folders offline: ``config.json`` plus weights, never the network.

``resolve`` turns a local folder or a hub id into a folder (hub ids only from a local hub cache); ``read_folder``
reads it into ``(config dict, {name: numpy array})``. Weights may be safetensors (preferred: no pickle at all) or
``pytorch_model.bin`` (read by the restricted unpickler in ``transfer.torch_pickle``), single or sharded.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

# In the order they are looked for: safetensors before pickles, a single file before an index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")


def read_weights_file(path: str) -> dict[str, np.ndarray]:
  """``{name: array}`` of one weight file: ``.safetensors`` by its own reader, anything else (``.bin``, ``.pth``)
  through the restricted unpickler, which runs no pickled code."""
  if path.endswith(".safetensors"):
    import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy, which safetensors.numpy needs for them)
    from safetensors.numpy import load_file
    return load_file(path)
  from transfer import torch_pickle
  return torch_pickle.load_state_dict(path)


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
  """Loads every shard named in the index once; index and shards must agree key for key."""
  folder = os.path.dirname(index_path)
  with open(index_path) as f:
    index = json.load(f)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path}: no 'weight_map' (tensor name -> shard file)")
  by_shard: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_shard.setdefault(shard, []).append(key)
  missing_files = sorted(s for s in by_shard if not os.path.isfile(os.path.join(folder, s)))
  if missing_files:
    raise FileNotFoundError(f"{index_path} names shard(s) that are not in {folder}: {', '.join(missing_files)}")
  out: dict[str, np.ndarray] = {}
  for shard, keys in sorted(by_shard.items()):
    tensors = read_weights_file(os.path.join(folder, shard))
    absent = sorted(set(keys) - set(tensors))
    unlisted = sorted(set(tensors) - set(keys))
    if absent or unlisted:
      raise ValueError(f"{index_path} and shard {shard} disagree: "
                       + "; ".join(f"{what}: {', '.join(ks[:20])}" + (" ..." if len(ks) > 20 else "")
                                   for what, ks in (("in the index but not in the shard", absent),
                                                    ("in the shard but not in the index", unlisted)) if ks))
    out.update(tensors)
  return out


def read_folder(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(config, state_dict)`` from a Hugging Face model folder (as written by ``save_pretrained``)."""
  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")
  with open(config_path) as f:
    config = json.load(f)
  for name in WEIGHT_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      return config, (_load_sharded(file) if name.endswith(".index.json") else read_weights_file(file))
  raise FileNotFoundError(f"{path}: no weights; looked for {', '.join(WEIGHT_FILES)}")


def hub_cache_dir() -> str:
  """The hub cache the way huggingface_hub finds it: $HF_HUB_CACHE, else $HF_HOME/hub, else the default."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
  return os.path.join(home, "hub")


def resolve(source: str, cache_dir: str | None = None) -> str:
  """A folder path: ``source`` itself if it is a folder, else the cached snapshot of hub id ``source``.

  Only a local cache laid out like the hub's is consulted (``models--org--name/refs/main`` holds the revision,
  ``snapshots/<revision>/`` the files); nothing is ever downloaded.
  """
  source = os.fspath(source)
  if os.path.isdir(source):
    return source
  if os.path.exists(source):
    raise FileNotFoundError(f"{source} is a file; expected a Hugging Face model folder (config.json + weights)")
  if not _HUB_ID.fullmatch(source):
    raise FileNotFoundError(f"{source}: no such folder (and not a hub id like 'org/name')")
  cache = os.fspath(cache_dir) if cache_dir is not None else hub_cache_dir()
  repo = os.path.join(cache, "models--" + source.replace("/", "--"))
  hint = (f"Nothing is downloaded at run time. On a machine with network run `huggingface-cli download {source}` "
          f"(and copy the cache here, or point $HF_HUB_CACHE at it), or pass a local model folder instead.")
  ref = os.path.join(repo, "refs", "main")
  if not os.path.isfile(ref):
    raise FileNotFoundError(f"hub id {source!r} was not found in the Hugging Face cache {cache} "
                            f"(looked for {ref}). {hint}")
  with open(ref) as f:
    revision = f.read().strip()
  snapshot = os.path.join(repo, "snapshots", revision)
  if not revision or not os.path.isdir(snapshot):
    raise FileNotFoundError(f"hub id {source!r}: {ref} names revision {revision!r} but {snapshot} does not exist "
                            f"in the Hugging Face cache {cache}. {hint}")
  return snapshot
