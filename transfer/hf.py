"""Reading Hugging Face checkpoint folders offline: ``config.json`` plus weights, never the network.

``resolve`` turns a local folder or a hub id into a folder (hub ids only from a local hub cache); ``read_folder``
reads it into ``(config dict, {name: numpy array})``. Weights may be safetensors (preferred: no pickle at all) or
``pytorch_model.bin`` (read by the restricted unpickler in ``transfer.torch_pickle``), single or sharded.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

# In the order they are looked for: safetensors before pickles, a single file before an index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")


# safetensors dtype -> numpy dtype name (the ml_dtypes ones need that package, which ships with jax).
SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32", "I32": "int32",
    "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own cap on the JSON header


def _safetensors_dtype(name: str) -> np.dtype:
  numpy_name = SAFETENSORS_DTYPES[name]
  if hasattr(np, numpy_name):  # safetensors is little-endian
    return np.dtype("<" + np.dtype(numpy_name).str[1:])
  import ml_dtypes
  return np.dtype(getattr(ml_dtypes, numpy_name))


def check_safetensors(path: str, max_tensor_bytes: int | None = None) -> tuple[int, dict[str, tuple]]:
  """Validates a safetensors file's header against the file before anything it declares is allocated.

  Returns ``(start of the data section, {name: (numpy dtype, shape, begin, end)})`` with offsets relative to that
  start. Raises ValueError naming the file (and tensor) when the header length is past the file or above
  MAX_SAFETENSORS_HEADER, the header is not a JSON object, a dtype is unknown, a tensor's byte range is outside the
  data section or disagrees with its shape and dtype, tensors overlap or leave gaps (the format indexes every byte),
  or a tensor or the data section exceeds the byte limit (``torch_pickle.tensor_byte_limit``).
  """
  from transfer.torch_pickle import tensor_byte_limit
  limit = tensor_byte_limit(max_tensor_bytes)

  def bad(message, name=None):
    return ValueError(f"{path}: not a readable safetensors file: " + (f"tensor {name!r}: " if name else "") + message)

  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"{size} bytes, too short for the 8-byte header length")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8:
      raise bad(f"header length {header_len} runs past the end of the file ({size} bytes)")
    if header_len > MAX_SAFETENSORS_HEADER:
      raise bad(f"header length {header_len} is above the {MAX_SAFETENSORS_HEADER}-byte cap")
    raw = f.read(header_len)

  duplicates = []

  def no_duplicates(pairs):  # json.loads would keep the last of two tensors with one name
    keys = [k for k, _ in pairs]
    duplicates.extend(k for k in set(keys) if keys.count(k) > 1)
    return dict(pairs)

  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
  except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, and ints longer than Python parses
    raise bad(f"header is not JSON ({type(e).__name__}: {e})") from None
  if duplicates:
    raise bad(f"header names {sorted(duplicates)[:5]} more than once")
  if not isinstance(header, dict):
    raise bad(f"header is a JSON {type(header).__name__}, expected an object")
  metadata = header.pop("__metadata__", None)
  if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise bad("__metadata__ is not an object of strings")
  data_start = 8 + header_len
  data_size = size - data_start
  if data_size > limit:
    raise bad(f"its data section of {data_size} bytes is above the limit of {limit} bytes (raise it with "
              f"max_tensor_bytes= or $TRANSFER_MAX_TENSOR_BYTES if the file is trusted)")
  tensors: dict[str, tuple] = {}
  for name, info in header.items():
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise bad("expected an object with dtype, shape and data_offsets", name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
      raise bad(f"unsupported dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})", name)
    dims_ok = isinstance(shape, list) and len(shape) <= 64 and all(
        type(n) is int and 0 <= n < 2**63 for n in shape)
    if not dims_ok:
      raise bad(f"shape {shape!r:.100} is not a list of at most 64 non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
      raise bad(f"data_offsets {offsets!r:.100} is not [begin, end]", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
      raise bad(f"data_offsets [{begin}, {end}] are not within the data section of {data_size} bytes", name)
    dt = _safetensors_dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes != end - begin:
      raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span "
                f"{end - begin}", name)
    tensors[name] = (dt, tuple(shape), begin, end)
  covered = 0
  for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
    if begin != covered:
      what = "overlaps the tensor before it" if begin < covered else f"leaves bytes [{covered}, {begin}) unused"
      raise bad(f"data_offsets [{begin}, {end}] {what}", name)
    covered = end
  if covered != data_size:
    raise bad(f"the tensors cover {covered} of the data section's {data_size} bytes")
  return data_start, tensors


def read_safetensors(path: str, max_tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
  """``{name: array}`` (writable copies) of a safetensors file, read only after ``check_safetensors`` passed."""
  data_start, tensors = check_safetensors(path, max_tensor_bytes)
  out = {}
  with open(path, "rb") as f:
    for name, (dt, shape, begin, end) in tensors.items():
      array = np.empty(shape, dt)
      f.seek(data_start + begin)
      if f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
        raise ValueError(f"{path}: tensor {name!r}: file ended early (changed while being read?)")
      out[name] = array
  return out


def read_weights_file(path: str, *, max_tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
  """``{name: array}`` of one weight file: ``.safetensors`` after its header is validated, anything else
  (``.bin``, ``.pth``) through the restricted unpickler, which runs no pickled code. Either refuses a malformed or
  hostile file with a ValueError naming it before allocating what it declares; ``max_tensor_bytes`` caps tensor
  sizes (default ``torch_pickle.tensor_byte_limit()``)."""
  if path.endswith(".safetensors"):
    return read_safetensors(path, max_tensor_bytes)
  from transfer import torch_pickle
  return torch_pickle.load_state_dict(path, max_tensor_bytes=max_tensor_bytes)


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
