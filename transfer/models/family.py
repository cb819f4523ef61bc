"""What a model family tells the rest of the project, in one record.

Each family module (``efficientnet_lite.py``, ``bert.py``, ...) ends with ``FAMILY = Family(...)``, and
``transfer/models/__init__.py`` lists those records: adding a family is its own file plus one line there. The
trainer, the loader and the probe ask the record, never the family's name, so no family-specific branch lives
outside its own file.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from transfer.convert import ConversionError, KeyRow, _listing


# The two pixel conventions image checkpoints are trained with, as (mean, std) in pixel units.
IMAGENET_NORMALIZATION = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))   # torchvision, DeiT, DINO, most of timm
INCEPTION_NORMALIZATION = (127.5, 127.5)                                        # [-1, 1]: Google's ViT and BiT, TF lite


def refuse_override(cfg, field: str, why: str) -> None:
  """A ``config.model`` size override the family does not take is an error naming it, never ignored."""
  if cfg.get(field):
    raise ValueError(f"config.model.{field}={cfg.get(field)}: {why}")


def hf_architecture(cfg) -> tuple[dict, str]:
  """``(config.json contents, its path)`` for a Hugging Face-style family: from ``config.model.architecture``,
  else ``config.model.pretrained``. Text models take their shapes from there, not from their name."""
  from transfer import pretrained
  source = cfg.get("architecture") or cfg.get("pretrained")
  if not source:
    raise ValueError(f"config.model: a {cfg.name!r} model needs model.pretrained or model.architecture (a folder, "
                     "hub id or short name whose config.json gives the architecture)")
  return pretrained.hf_config(source)


def text_example(with_types: bool) -> Callable[[], dict]:
  """A one-row token batch (8 tokens) that fixes the input shapes for ``init``."""
  def example() -> dict:
    batch = {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32)}
    if with_types:
      batch["token_type_ids"] = np.zeros((1, 8), np.int32)
    return batch
  return example


def image_example() -> dict:
  return {"image": np.zeros((1, 32, 32, 3), np.uint8)}


def keep_checkpoint(flat, model_shapes, *, source_name: str):
  return flat


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  - ``name``: the family's id (``config.model.name`` picks one of ``variants``; the family itself when it is
    Hugging Face-style, e.g. ``bert``, whose shapes come from a config.json).
  - ``inputs``: ``'image'`` (uint8 ``image`` batches, normalised by the classifier) or ``'text'`` (token batches).
  - ``kind``: ``'encoder'`` (features for a head), or ``'decoder'`` (also next-token logits: the causal-LM task).
  - ``variants``: names users type -> the family's own settings for each.
  - ``backbone(cfg, dtype)``: ``config.model`` -> the backbone module.
  - ``convert(state, *, cfg, hf_config, source_name)``: a checkpoint's ``{key: array}`` in any layout the family
    knows (its key tables) -> flat ``{collection/path: array}``; a layout it does not know is an error. It also
    settles the ``config.model`` (``cfg``) fields that the checkpoint decides by itself (a ViT's pooling and
    position grid): set where unset, an error naming the field where they disagree, never a silent guess.
  - ``layer_regexes(backbone)``: ``[(regex, depth)]`` for layer-wise learning-rate decay (``transfer.optim``);
    defined in the family's own module, beside the backbone's class, which is how a backbone finds its family.
  - ``example_batch()``: one input row that fixes the shapes for ``init``.
  - ``input_norm``: images: the ``(mean, std)`` in pixel units of the family's usual checkpoints.
  - ``hf_model_types``: the ``config.json`` ``model_type`` values this family reads.
  - ``fit_checkpoint(flat, model_shapes, source_name)``: adapts a converted checkpoint to the configured model's
    shapes where that is sound (a ViT's position table resampled to another grid).
  - ``pooling``: text: the pooling a classifier on this family uses when ``config.model.pooling`` is unset.
  - ``causal_lm(cfg, dtype)``: decoders: the backbone with its next-token head (the causal-LM task's model).
  - ``to_hf(flat, *, hf_config, source_name)``: decoders: the inverse of ``convert``, giving ``(config.json,
    Hugging Face state dict)`` (``transfer/hf_export.py``).
  - ``upstream_head``: a regex over converted paths that belong to the checkpoint's own task head (a decoder's
    LM head), dropped when the model being built has no such parameter (a classifier on a decoder).
  - ``to_hf_classifier(flat, *, hf_config, class_names, pooling)``: text encoders: a classifier's params as
    ``(config.json, state dict)`` of the transformers sequence-classification class (``transfer/export.py``).
  - ``hf_weight(path, *, hf_config)``: Hugging Face-style families: ``(state-dict key, conv1d)`` of our param
    ``path`` in the transformers model (``conv1d``: stored (in, out), GPT-2's Conv1D), for PEFT adapters' names.
  - ``to_timm(flat, *, cfg, num_classes)``: images: the inverse of ``convert`` for timm, giving ``(timm model name,
    create_model kwargs, state dict {timm key: float32 np.ndarray})`` for a classifier's variables: ``flat`` as
    ``transfer.rules.flatten(variables)`` gives them (``params/backbone/...``, ``params/head/{kernel,bias}``,
    ``batch_stats/...``; LoRA adapters merged first, ``transfer.models.lora.merge``), ``cfg`` the run's
    ``config.model``, ``num_classes`` the head's width. ``timm.create_model(name, pretrained=False,
    num_classes=num_classes, **kwargs)`` then takes the state dict with ``load_state_dict(sd, strict=True)``;
    the kwargs hold what the name alone does not say (a ViT's image size and pooling, a ResNet's width) and
    ``pretrained_cfg_overlay``: the input mean/std the model was trained with, for timm's data config.
    BatchNorm step counters (``num_batches_tracked``) are int64 zeros, as PyTorch stores them. A configuration
    timm cannot build exactly is a ValueError naming the ``config.model`` field; a variable without a timm key,
    or a timm key left without a variable, is an error listing them (``timm_state_dict``).
  - ``tensor_parallel``: ``[(regex over param paths, per-dimension spec)]``, the layout ``config.sharding_rules``'
    value ``'tensor'`` gives (``transfer/sharding.py``): the kernels that feed attention heads or MLP hidden units
    split over ``tensor`` on their output dimension, the kernels that read them on their input dimension (one
    all-reduce per sublayer), the other dimension over ``fsdp``. Empty for families without such layers.
  - ``cpu_library_fusions``: the kinds of YNNPACK library fusion XLA's CPU backend may make in this family's
    programs (``transfer.models.layers.compiler_options``), chosen by measurement; ``None``: XLA's default.
  """
  name: str
  inputs: str
  variants: Mapping[str, Any]
  backbone: Callable[..., Any]
  convert: Callable[..., dict]
  layer_regexes: Callable[[Any], list]
  example_batch: Callable[[], dict]
  kind: str = "encoder"
  input_norm: tuple | None = None
  hf_model_types: tuple[str, ...] = ()
  fit_checkpoint: Callable[..., dict] = keep_checkpoint
  pooling: str = "cls"
  causal_lm: Callable[..., Any] | None = None
  to_hf: Callable[..., tuple[dict, dict]] | None = None
  to_hf_classifier: Callable[..., tuple[dict, dict]] | None = None
  hf_weight: Callable[..., tuple[str, bool]] | None = None
  to_timm: Callable[..., tuple[str, dict, dict]] | None = None
  upstream_head: str = ""
  tensor_parallel: Sequence[tuple[str, tuple]] = ()
  cpu_library_fusions: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.inputs not in ("image", "text"):
      raise ValueError(f"family {self.name}: inputs must be 'image' or 'text', got {self.inputs!r}")
    if self.kind not in ("encoder", "decoder"):
      raise ValueError(f"family {self.name}: kind must be 'encoder' or 'decoder', got {self.kind!r}")
    if (self.kind == "decoder") != (self.causal_lm is not None):
      raise ValueError(f"family {self.name}: a decoder (and only a decoder) has a causal_lm builder")
    if self.inputs == "image" and self.input_norm is None:
      raise ValueError(f"family {self.name}: an image family needs input_norm")


# ---------------------------------------------------------------------------------------------------------------
# Export to timm: what the image families' ``to_timm`` share. Each family keeps its own export table (our path regex
# -> timm key, transform), written beside the key table it inverts.

def torch_conv_weight(kernel: np.ndarray) -> np.ndarray:
  """HWIO -> OIHW; a depthwise (kh, kw, 1, C) kernel becomes PyTorch's grouped (C, 1, kh, kw)."""
  return np.transpose(kernel, (3, 2, 0, 1))


def torch_linear_weight(kernel: np.ndarray) -> np.ndarray:
  """A Dense kernel (in, out) -> ``nn.Linear``'s (out, in)."""
  return np.transpose(kernel)


def batchnorm_export_rows(ours: str, theirs: str) -> list[KeyRow]:
  """flax BatchNorm ``backbone/{ours}`` (scale/bias in params, mean/var in batch_stats) -> PyTorch's
  ``{theirs}.{weight,bias,running_mean,running_var}`` (``with_batch_counters`` adds the step counter).
  ``ours`` is a regex whose groups ``theirs`` may use (``\\1``)."""
  return [(rf"params/backbone/{ours}/scale", theirs + ".weight", None),
          (rf"params/backbone/{ours}/bias", theirs + ".bias", None),
          (rf"batch_stats/backbone/{ours}/mean", theirs + ".running_mean", None),
          (rf"batch_stats/backbone/{ours}/var", theirs + ".running_var", None)]


def with_batch_counters(state: dict) -> dict:
  """Adds PyTorch's ``num_batches_tracked`` beside each BatchNorm's running mean: an int64 0, since flax keeps
  no step count (PyTorch reads it only with ``momentum=None``)."""
  counters = {k[:-len("running_mean")] + "num_batches_tracked": np.zeros((), np.int64)
              for k in state if k.endswith(".running_mean")}
  return {**state, **counters}


def classifier_shapes(backbone, num_classes: int) -> dict[str, tuple]:
  """``{collection/path: shape}`` of an ImageClassifier on ``backbone`` with a ``num_classes`` head: what an
  export must hold, from an abstract init (nothing allocated)."""
  import jax

  from transfer import rules
  from transfer.models.classifier import ImageClassifier
  model = ImageClassifier(backbone=backbone, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image_example()))
  return {k: tuple(v.shape) for k, v in rules.flatten(shapes).items()}


def timm_input_overlay(cfg, **extra) -> dict:
  """``create_model``'s ``pretrained_cfg_overlay``: ``config.model``'s input mean and std in timm's [0, 1] units (a
  custom ``input_norm`` as much as the family's usual one), so timm's data config normalises as the run did."""
  from transfer import models
  mean, std = models.input_normalization(models.family(cfg.name), cfg.get("input_norm", "auto"))
  per_channel = lambda v: tuple(float(c) / 255.0 for c in (v if isinstance(v, (tuple, list)) else (v,) * 3))
  return {"pretrained_cfg_overlay": dict(mean=per_channel(mean), std=per_channel(std), **extra)}


def timm_state_dict(flat: Mapping[str, Any], table: Sequence[KeyRow], *, model_shapes: Mapping[str, tuple],
                    what: str) -> dict[str, np.ndarray]:
  """``flat`` renamed and reshaped through ``table`` (first matching row wins) into a float32 state dict.

  Strict both ways, so nothing is dropped or left at timm's init: ``flat`` must hold exactly ``model_shapes``
  (the variables of the network ``config.model`` describes), each with a row. A variable without a row, one the
  network does not have, a missing one (named with the timm key it would fill) or a mis-shaped one is an error
  listing them all."""
  compiled = [(re.compile(pattern), target, fn) for pattern, target, fn in table]

  def timm_key(path):
    for pattern, target, fn in compiled:
      if m := pattern.fullmatch(path):
        return m.expand(target), fn
    return None, None

  unmapped, unexpected, mismatched, out, origin = [], [], [], {}, {}
  for path, value in flat.items():
    key, fn = timm_key(path)
    if key is None:
      unmapped.append(path)
    elif path not in model_shapes:
      unexpected.append(f"{path} (-> {key})")
    elif tuple(np.shape(value)) != tuple(model_shapes[path]):
      mismatched.append(f"{path}: {tuple(np.shape(value))} vs the network's {tuple(model_shapes[path])}")
    elif key in out:
      raise ConversionError(f"{what}: {origin[key]} and {path} both map to timm key {key}")
    else:
      array = np.asarray(value, np.float32)
      out[key], origin[key] = np.ascontiguousarray(fn(array) if fn else array), path
  unmapped += [p for p in model_shapes if timm_key(p)[0] is None and p not in flat]   # a table without its row
  missing = [f"{p} (-> {timm_key(p)[0]})" for p in model_shapes if p not in flat and timm_key(p)[0] is not None]
  if unmapped or unexpected or mismatched or missing:
    hint = (" LoRA adapters must be merged into their kernels first (transfer.models.lora.merge)."
            if any(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in unmapped) else "")
    parts = [_listing(title, sorted(lines)) for title, lines in (
        ("variables with no timm key", unmapped), ("variables config.model's network does not have", unexpected),
        ("missing variables, whose timm keys would be left unfilled", missing), ("shape mismatch", mismatched))
        if lines]
    raise ConversionError(f"{what}: the variables do not fit the network config.model describes.{hint}\n"
                          + "\n".join(parts))
  return out
