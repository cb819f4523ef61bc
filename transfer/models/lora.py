"""LoRA adapters (Hu et al., 2021) on any Dense or convolution kernel, chosen by the parameter rules.

A rule ``("backbone/.*/(query|value)/kernel", dict(lora=dict(rank=8, alpha=16)))`` puts an adapter beside every
kernel whose path it is the first rule to match: the layer computes ``base(x) + s * B(A(dropout(x)))`` with
``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora=True``). The adapters are ordinary parameters named
``lora_a`` and ``lora_b`` in the layer's scope (``backbone/.../query/lora_a``), so checkpoints, the optimizer's
partition and the rules table treat them like any other parameter; the kernel under them is frozen.

No model file knows about LoRA: the top-level modules (``ImageClassifier``, ``TextClassifier``, ``CausalLM``) run
their body under ``adapting(self.adapters, ...)``, a Flax method interceptor that adds the adapter path to each
targeted ``nn.Dense``, ``nn.DenseGeneral`` (attention projections with a heads axis) and ``nn.Conv``. A layer that transforms its kernel before use (BiT's weight-standardised
``StdConv``) reads it through a ``kernel_value`` method instead; there the adapter adapts the raw kernel,
``W + s * A B``, before the transformation, so that merging is exact (the price: that layer's step computes a
kernel-sized gradient, and adapter dropout, which needs the input path, is refused).

Initialisation as ``peft``: A Kaiming-uniform (``a = sqrt(5)``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B zeros, so
the adapted model's outputs at step 0 are the base model's exactly. Convolutions as ``peft``'s Conv2d LoRA: A is a
convolution with the base kernel's size, stride, padding and dilation into ``rank`` channels, B a 1x1 convolution
(a matrix) to the output channels. Adapters are stored in float32 whatever the layer computes in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import linear as flax_linear

from transfer import rules as rules_lib
from transfer.models import layers

ADAPTER_NAMES = ("lora_a", "lora_b")
LORA_FIELDS = {"rank": None, "alpha": None, "dropout": 0.0, "rslora": False}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def describe(self) -> str:
    return f"r{self.rank} a{self.alpha:g}" + (f" drop{self.dropout:g}" if self.dropout else "") + (
        " rs" if self.rslora else "")


def parse(value, where: str) -> LoraSpec | None:
  """A rule's ``lora`` field (None, or a dict of rank, alpha, dropout, rslora) -> ``LoraSpec``; ``where`` names
  the rule in errors."""
  if value is None:
    return None
  if isinstance(value, LoraSpec):
    return value
  if hasattr(value, "to_dict"):   # a ConfigDict
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f"{where}: lora must be a dict like dict(rank=8, alpha=16), got {value!r}")
  unknown = sorted(set(value) - set(LORA_FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown lora field(s) {unknown}; valid: {sorted(LORA_FIELDS)}")
  fields = {**LORA_FIELDS, **value}
  rank, alpha, dropout, rslora = fields["rank"], fields["alpha"], fields["dropout"], fields["rslora"]
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"{where}: lora rank must be an integer >= 1, got {rank!r}")
  if alpha is None:
    alpha = rank   # scale 1
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not alpha >= 0:
    raise ValueError(f"{where}: lora alpha must be a number >= 0, got {alpha!r}")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"{where}: lora dropout must be in [0, 1), got {dropout!r}")
  if not isinstance(rslora, bool):
    raise ValueError(f"{where}: lora rslora must be True or False, got {rslora!r}")
  return LoraSpec(int(rank), float(alpha), float(dropout), rslora)


def targets(param_rules) -> tuple[tuple[str, LoraSpec | None], ...]:
  """The rules as ``((regex, LoraSpec or None), ...)``, hashable, for a module field; () when no rule has LoRA.
  Every rule is kept so that first-match-wins is the same here as in ``transfer.optim.param_specs``."""
  pairs = tuple((regex, parse((fields or {}).get("lora"), f"config.param_rules[{i}] ({regex!r})"))
                for i, (regex, fields) in enumerate(param_rules or ()))
  return pairs if any(spec for _, spec in pairs) else ()


def spec_for(kernel_path: str, adapters) -> LoraSpec | None:
  """The LoRA spec of the first rule matching ``kernel_path`` (None: no adapter there)."""
  _, spec = rules_lib.first_match(_compiled(adapters), kernel_path)
  return spec


@functools.lru_cache(maxsize=64)   # adapters is a hashable tuple; every layer of a trace asks again
def _compiled(adapters):
  return rules_lib.compile_rules(adapters, what="config.param_rules")


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def kernel_of(adapter_path: str) -> str:
  """``.../query/lora_a`` -> ``.../query/kernel``: an adapter follows its kernel's rule."""
  return adapter_path.rsplit("/", 1)[0] + "/kernel"


# ---------------------------------------------------------------------------------------------------------------
# The interceptor.

_A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")   # Kaiming-uniform with a = sqrt(5)


def _A_INIT_GENERAL(n_in: int):
  """The same law for A of shape (*in, r): fan-in is the product of the ``n_in`` input dimensions."""
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)


def _conv_geometry(module):
  """(kernel_size, strides, padding, lhs_dilation, rhs_dilation) of a 2-D convolution layer, or None."""
  if not isinstance(module, nn.Conv):
    return None
  size = tuple(module.kernel_size)
  path = "/".join(module.path) + "/kernel"
  if len(size) != 2:
    raise ValueError(f"LoRA on {path}: only 2-D convolutions take adapters (kernel size {size})")
  if module.feature_group_count != 1:
    raise ValueError(f"LoRA on {path}: a grouped or depthwise convolution (feature_group_count="
                     f"{module.feature_group_count}) has no low-rank adapter here; exclude it from the rule")
  as_pair = lambda v: (v, v) if v is None or isinstance(v, int) else tuple(v)
  padding = flax_linear.canonicalize_padding(module.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(f"LoRA on {path}: padding {padding!r} is not supported (SAME, VALID or explicit pairs)")
  strides, lhs, rhs = (tuple(1 if s is None else s for s in as_pair(v))
                       for v in (module.strides or 1, module.input_dilation or 1, module.kernel_dilation or 1))
  return size, strides, padding, lhs, rhs


def _adapter_delta(module, x, spec: LoraSpec, kernel_path: str, train: bool):
  """``s * B(A(dropout(x)))`` for a Dense or conv layer, creating ``lora_a``/``lora_b`` in its scope."""
  dtype = getattr(module, "dtype", None) or jnp.float32
  if spec.dropout and train:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - spec.dropout, x.shape)
    x = jnp.where(keep, x / (1 - spec.dropout), 0).astype(x.dtype)
  x = jnp.asarray(x, dtype)
  out_features = module.features
  geometry = _conv_geometry(module)
  if isinstance(module, nn.DenseGeneral):   # attention projections: A (*in, r), B (r, *out), as the kernel splits
    if module.batch_dims:
      raise ValueError(f"LoRA on {kernel_path}: a DenseGeneral with batch_dims has no adapter here")
    axes = tuple(a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis))
    in_dims = tuple(x.shape[a] for a in axes)
    out_dims = (out_features,) if isinstance(out_features, int) else tuple(out_features)
    _check_rank(spec, kernel_path, int(np.prod(in_dims)), int(np.prod(out_dims)))
    a = module.param("lora_a", _A_INIT_GENERAL(len(in_dims)), (*in_dims, spec.rank), jnp.float32)
    b = module.param("lora_b", nn.initializers.zeros, (spec.rank, *out_dims), jnp.float32)
    h = jax.lax.dot_general(x, a.astype(dtype), ((axes, tuple(range(len(axes)))), ((), ())))
    return jnp.tensordot(h, b.astype(dtype), axes=1) * jnp.asarray(spec.scale, dtype)
  if geometry is None:   # Dense: (..., in) @ A (in, r) @ B (r, out)
    in_features = x.shape[-1]
    _check_rank(spec, kernel_path, in_features, out_features)
    a = module.param("lora_a", _A_INIT, (in_features, spec.rank), jnp.float32)
    b = module.param("lora_b", nn.initializers.zeros, (spec.rank, out_features), jnp.float32)
    h = jnp.dot(x, a.astype(dtype))
  else:
    size, strides, padding, lhs, rhs = geometry
    in_features = x.shape[-1]
    _check_rank(spec, kernel_path, in_features * size[0] * size[1], out_features)
    a = module.param("lora_a", _A_INIT, (*size, in_features, spec.rank), jnp.float32)
    b = module.param("lora_b", nn.initializers.zeros, (spec.rank, out_features), jnp.float32)
    h = jax.lax.conv_general_dilated(x, a.astype(dtype), strides, padding, lhs_dilation=lhs, rhs_dilation=rhs,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.dot(h, b.astype(dtype)) * jnp.asarray(spec.scale, dtype)


def _check_rank(spec: LoraSpec, path: str, fan_in: int, fan_out: int) -> None:
  if spec.rank > min(fan_in, fan_out):
    raise ValueError(f"LoRA on {path}: rank {spec.rank} is above the kernel's smaller side "
                     f"(fan-in {fan_in}, fan-out {fan_out}); a low-rank adapter needs rank <= {min(fan_in, fan_out)}")


def _adapted_kernel(module, kernel, spec: LoraSpec, kernel_path: str):
  """``kernel + s * A B`` (weight space), for layers that read their kernel through ``kernel_value``."""
  if spec.dropout:
    raise ValueError(f"LoRA on {kernel_path}: this layer transforms its kernel (weight standardisation), so its "
                     f"adapter adapts the kernel itself and cannot drop out inputs; set dropout=0 for it")
  *window, fan_in, fan_out = kernel.shape
  _check_rank(spec, kernel_path, fan_in * int(np.prod(window)), fan_out)
  a = module.param("lora_a", _A_INIT, (*window, fan_in, spec.rank), jnp.float32)
  b = module.param("lora_b", nn.initializers.zeros, (spec.rank, fan_out), jnp.float32)
  return kernel + jnp.tensordot(a, b, axes=1) * spec.scale


@contextlib.contextmanager
def adapting(adapters, *, train: bool):
  """Runs the enclosed module calls with adapters on the layers ``adapters`` (``targets(rules)``) select."""
  if not adapters:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    weight_space = context.method_name == "kernel_value"
    if not weight_space and (context.method_name != "__call__" or
                             not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))):
      return next_fun(*args, **kwargs)
    kernel_path = "/".join(module.path) + "/kernel"
    spec = spec_for(kernel_path, adapters)
    y = next_fun(*args, **kwargs)
    if spec is None:
      return y
    if weight_space:
      return _adapted_kernel(module, y, spec, kernel_path)
    y = y + _adapter_delta(module, args[0], spec, kernel_path, train).astype(y.dtype)
    # A conv adapter's output cotangent is materialised, not fused into the transposed copy its weight-gradient
    # matmuls read (an EfficientNet-Lite0 LoRA step, batch 32 at 224 px: 22.9 s -> 6.1 s). Dense adapters go
    # without: MiniLM's LoRA step measured 9% slower with it.
    return layers.gradient_barrier(y) if isinstance(module, nn.Conv) else y

  with nn.intercept_methods(interceptor):
    yield


# ---------------------------------------------------------------------------------------------------------------
# Merging: the adapters folded into their kernels.

def merge(flat_params: Mapping[str, np.ndarray], adapters) -> dict[str, np.ndarray]:
  """Flat params of an adapted model -> the base model's, each ``kernel + s * A B`` in float32 (conv kernels:
  ``A (h, w, in, r)`` times ``B (r, out)``). ``adapters`` is ``targets(config.param_rules)``."""
  out = {p: v for p, v in flat_params.items() if not is_adapter(p)}
  for path in sorted(p for p in flat_params if p.endswith("/lora_a")):
    kernel_path = kernel_of(path)
    spec = spec_for(_without_collection(kernel_path), adapters)
    if spec is None or kernel_path not in flat_params:
      raise ValueError(f"{path}: an adapter whose kernel {kernel_path} no LoRA rule of this run targets")
    a = np.asarray(flat_params[path], np.float32)
    b = np.asarray(flat_params[path[:-len("lora_a")] + "lora_b"], np.float32)
    kernel = np.asarray(flat_params[kernel_path])
    delta = np.tensordot(a, b, axes=([a.ndim - 1], [0])) * np.float32(spec.scale)
    out[kernel_path] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
  return out


def _without_collection(path: str) -> str:
  return path[len("params/"):] if path.startswith("params/") else path
