"""Layers shared by model families."""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transfer import native


# ---------------------------------------------------------------------------------------------------------------
# The gradient barrier. XLA's CPU backend fuses an elementwise chain into each consumer of its result; in a
# backward pass that turns cheap chains into copies that transpose and recompute them for every weight-gradient
# matmul that reads them (a LoRA conv adapter under a frozen, inference-mode EfficientNet spent 0.2 s -> 2.9 s in
# one such fusion). ``gradient_barrier(x)`` is the identity whose backward puts ``lax.optimization_barrier`` on the
# cotangent, so it is materialised once. XLA would drop the barrier before fusion unless the program is compiled
# with ``compiler_options()``. GPU and TPU fuse differently: there it is the plain identity.

@jax.custom_vjp
def _barrier(x):
  return x


_barrier.defvjp(lambda x: (x, None), lambda _, g: (lax.optimization_barrier(g),))


def gradient_barrier(x):
  """``x``, with its cotangent materialised (not fused into consumers) in the backward pass, on CPU."""
  return _barrier(x) if jax.default_backend() == "cpu" else x


# ---------------------------------------------------------------------------------------------------------------
# Compiler options of every jitted program that runs a model (train, eval, features, predict).
#
# XLA's CPU backend hands some ops to the YNNPACK library ("library fusions"). Its default set (single dots,
# single convolutions, reductions with the ops around them) is slower than XLA's own code for most of what our
# families run. Measured on 2 cores, float32 examples/s, XLA's default -> the family's choice
# (experiments/results/library_fusions_2026-12-07.json):
# - convolutions: YNNPACK's are slower in every mode (ResNet-50's full step 2.2 -> 6.2, BiT-R50x1's 2.0 -> 5.8,
#   EfficientNet-Lite0's inference 167 -> 256);
# - reductions: YNNPACK's pay for BatchNorm's per-channel statistics (EfficientNet-Lite0's full step: 19 with
#   XLA's default, 26 with only them, 6.3 with none), not for GroupNorm (BiT's inference: 15 with them, 26 without);
#   in a transformer they take each layer's attention core (QK^T, mask, softmax, AV) as one slow op (MiniLM's
#   inference 16.9 -> 25.5 without, ViT-S/16's 29.8 -> 36.7; full steps unchanged).
# So each family names the kinds it keeps (``Family.cpu_library_fusions``): the BatchNorm CNNs reductions, the
# others none. An ``XLA_FLAGS`` that sets ``xla_cpu_experimental_ynn_fusion_type`` wins over the family's choice.

LIBRARY_FUSIONS = {"dot": "LIBRARY_FUSION_TYPE_DOT", "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
                   "reduce": "LIBRARY_FUSION_TYPE_REDUCE", "individual_dot": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                   "individual_convolution": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
_LIBRARY_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(library_fusions: tuple[str, ...] | None = None) -> dict[str, str] | None:
  """What a jit that runs a model passes as ``compiler_options`` on CPU (None elsewhere): keeps
  ``gradient_barrier``'s and ``remat``'s barriers to fusion, and, given ``library_fusions`` (kinds in
  ``LIBRARY_FUSIONS``; ``()`` for none), the YNNPACK fusions to make; ``None`` leaves XLA's default."""
  unknown = sorted(set(library_fusions or ()) - set(LIBRARY_FUSIONS))
  if unknown:
    raise ValueError(f"library fusions {unknown}: not among {sorted(LIBRARY_FUSIONS)}")
  if jax.default_backend() != "cpu":
    return None
  options = {"xla_disable_hlo_passes": "cse_barrier_expander"}
  if library_fusions is not None and _LIBRARY_FUSION_FLAG not in os.environ.get("XLA_FLAGS", ""):
    options[_LIBRARY_FUSION_FLAG] = ",".join(LIBRARY_FUSIONS[kind] for kind in library_fusions)
  return options


# ---------------------------------------------------------------------------------------------------------------
# The families' projections. ``dense_dot_general`` is the ``dot_general`` of every Dense and attention projection a
# family builds: a bf16 dot goes to the MKL extension (``transfer.native``: AMX tiles, transposes as flags) where
# ``native.routes`` says so (``config.model.bf16_matmul``), and to ``lax.dot_general`` otherwise.

def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """``lax.dot_general``, or the same product on the bf16 extension where ``transfer.native`` routes it."""
  if native.routes(lhs, rhs, dimension_numbers):
    return native.dense_matmul(lhs, rhs, len(dimension_numbers[0][0]), preferred_element_type or lhs.dtype)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Activation sharding. The compiler (GSPMD) places activations by propagating the parameters' and the batch's
# shardings. An embedding table that FSDP splits along its hidden dimension (a vocabulary the fsdp axis does not
# divide: BERT's 30522, GPT-2's 50257) hands that split to the looked-up activations, and from there to the whole
# residual stream, where the batch should be split instead: measured on a 4-layer BERT-base at 512 tokens, FSDP-8
# then held 50% more activation memory than replicated training (5.7 against 3.8 GiB) and computed 10% more. ``batch_sharded(x)`` pins an
# activation to rows over the mesh's batch axes, inside a step traced under ``sharded_activations(mesh)`` (the
# trainer's, when a parameter is split), and is the identity anywhere else.

_ACTIVATION_MESH: list = []


class sharded_activations:   # noqa: N801 - used as a context manager, like a function
  """Within it, ``batch_sharded`` pins activations to ``mesh``'s batch axes (a no-op for ``None``)."""

  def __init__(self, mesh):
    self.mesh = mesh

  def __enter__(self):
    _ACTIVATION_MESH.append(self.mesh)

  def __exit__(self, *exc):
    _ACTIVATION_MESH.pop()


def batch_sharded(x):
  """``x`` (batch first) split over the batch axes (data x fsdp) of the mesh ``sharded_activations`` set, whole
  over the others (tensor parallelism's residual stream); ``x`` itself outside one."""
  mesh = _ACTIVATION_MESH[-1] if _ACTIVATION_MESH else None
  if mesh is None:
    return x
  from jax.sharding import NamedSharding, PartitionSpec
  return lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))


# ---------------------------------------------------------------------------------------------------------------
# Rematerialisation (activation checkpointing) of a family's repeated blocks: ``config.model.remat``.

REMAT_POLICIES = ("none", "block", "dots")
# 'dots': jax's dots_with_no_batch_dims_saveable keeps the outputs of matmuls without batch dimensions, i.e. the
# attention and MLP projections (a Dense contracts features only). The attention einsums (QK^T, probs @ V) batch
# over (N, heads) and are recomputed: they are the (N, heads, L, L) tensors that dominate at long sequences, which
# dots_saveable would keep too.
_NATIVE_PROJECTIONS = jax.checkpoint_policies.save_only_these_names(native.SAVEABLE_NAME)


def save_projections(prim, *args, **params) -> bool:
  """remat='dots': keeps dots without batch dimensions, and the bf16 projections ``transfer.native`` computes in
  place of such a dot (named ``native.SAVEABLE_NAME``)."""
  return bool(jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)
              or _NATIVE_PROJECTIONS(prim, *args, **params))


_CHECKPOINT_POLICIES = {"block": None,   # jax.checkpoint's default: nothing saveable
                        "dots": save_projections}


def remat(block_cls, policy_name: str, *, static_argnums: tuple[int, ...] = ()):
  """``block_cls`` wrapped by ``nn.remat`` for ``config.model.remat`` ('block': only the block's inputs are kept
  for the backward pass, 'dots': its matmul outputs too), or ``block_cls`` itself for 'none'.

  ``static_argnums`` count ``self`` as flax's do (``__call__(self, x, train)``: ``train`` is 2). Python values the
  block branches on (``train``) must be static and passed positionally: keyword arguments are traced. The wrapped
  class keeps the ``name`` it is given, so parameter paths do not change; dropout draws the same masks. On CPU it
  saves memory only under ``compiler_options()``: without them XLA drops remat's CSE barriers and merges the
  recomputation back into the forward pass."""
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat: {policy_name!r} is not one of {REMAT_POLICIES}")
  if policy_name == "none":
    return block_cls
  return nn.remat(block_cls, static_argnums=static_argnums, policy=_CHECKPOINT_POLICIES[policy_name])


def batch_norm_factory(*, train: bool, momentum: float, epsilon: float, dtype: Any):
  """``name -> nn.BatchNorm`` with one family's settings: batch statistics in training, running averages
  otherwise; computation in ``dtype``, scale, bias and statistics in float32 (they land in ``batch_stats``)."""
  return lambda name: nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
                                   param_dtype=jnp.float32, name=name)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF "SAME" padding of one spatial dimension: the odd pixel goes after (bottom/right)."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution with TF "SAME" padding, kernel (k, k, 1, C) like ``nn.Conv`` with groups = C.

  Written as a sum of k*k shifted, strided slices times per-channel weights instead of a grouped convolution:
  XLA's CPU backend runs grouped convolutions about 20x slower (forward) and 4x slower (with gradients) than
  this form, while on GPU/TPU both compile to similar fused loops.
  """
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, channels = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels), jnp.float32)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    (top, bottom), (left, right) = same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        window = lax.slice(x, (0, i, j, 0), (x.shape[0], i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1,
                                              channels), (1, s, s, 1))
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out
