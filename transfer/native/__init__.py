"""bf16 matmuls on the CPU's matrix units (AMX), through a small ``jax.ffi`` extension on MKL.

XLA's CPU backend computes a bf16 dot as float32 (it converts the operands), so a bf16 model runs no faster than a
float32 one, while PyTorch's bf16 matmuls reach Intel's AMX tiles through oneDNN (about 2,400 against 250-330
GFLOP/s on a Sapphire Rapids core pair). ``bf16_matmul.cc`` calls MKL's ``cblas_gemm_bf16bf16f32`` (bf16 operands,
float32 accumulation and result; AMX where the CPU has it) and ``dense_matmul`` wraps it in a ``custom_vjp`` whose
forward and both backward matmuls call the extension with transpose flags, so no operand is copied to transpose it.

The families' Dense and attention projections take ``layers.dense_dot_general`` as their ``dot_general``; it asks
``routes`` whether a dot goes here. That depends on the mode (``config.model.bf16_matmul``, set per process by the
trainer through ``configure``):

- ``'auto'`` (default): bf16 dots go through the extension when it is built and the CPU has AMX, and the step runs
  on one device (a custom call has no sharding rule); otherwise through XLA, as before, said once per process.
- ``'mkl'``: through the extension whenever it is built, AMX or not (MKL then emulates bf16; for tests and
  measurement); an error if it is not built.
- ``'xla'``: never.

The extension is built by ``python -m transfer.native`` (``make`` runs it) from the ``mkl`` and ``mkl-include``
packages and JAX's FFI headers, into ``transfer/native/_bf16_matmul.so``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

MODES = ("auto", "mkl", "xla")
TARGET = "transfer_bf16_matmul"
# The name a projection's output carries (checkpoint_name): remat's 'dots' policy keeps it, as it
# keeps the dot_general XLA would have run in its place (transfer.models.layers.remat).
SAVEABLE_NAME = "transfer_bf16_projection"
SOURCE = Path(__file__).with_name("bf16_matmul.cc")
# TRANSFER_BF16_MATMUL_LIB points elsewhere (a test's way to see the project run without the extension).
LIBRARY = Path(os.environ.get("TRANSFER_BF16_MATMUL_LIB", Path(__file__).with_name("_bf16_matmul.so")))

_settings = {"mode": "auto", "devices": 1}
_said: set[str] = set()


# ---------------------------------------------------------------------------------------------------------------
# Availability: built, loaded, the CPU's instructions, the mode.

@functools.cache
def cpu_has_amx() -> bool:
  """Whether the CPU has AMX bf16 tiles (Linux's ``amx_bf16`` and ``amx_tile`` flags)."""
  try:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
  except OSError:
    return False
  return {"amx_bf16", "amx_tile"} <= set(flags)


@functools.cache
def load() -> str | None:
  """Loads the extension and registers its FFI target; ``None`` on success, else why it is not available."""
  if not LIBRARY.exists():
    return f"the extension is not built ({LIBRARY} is missing: `make .venv/.native` or `python -m transfer.native`)"
  try:
    library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.TransferBf16Matmul), platform="cpu")
  except (OSError, AttributeError) as e:
    return f"the extension at {LIBRARY} does not load: {e}"
  return None


def configure(mode: str, *, devices: int = 1) -> None:
  """Sets this process's mode (``config.model.bf16_matmul``) for steps traced from now on, over ``devices``."""
  if mode not in MODES:
    raise ValueError(f"config.model.bf16_matmul: {mode!r} is not one of {MODES}")
  if mode == "mkl":
    if (reason := load()) is not None:
      raise ValueError(f"config.model.bf16_matmul='mkl': {reason}")
    if devices > 1:
      raise ValueError(f"config.model.bf16_matmul='mkl': the step is split over {devices} devices and the "
                       f"extension's custom call has no sharding rule; use 'auto' or 'xla'")
  _settings.update(mode=mode, devices=devices)


@contextlib.contextmanager
def mode(name: str, *, devices: int = 1):
  """``configure(name)`` within the block (steps traced inside it), the previous settings after it."""
  previous = dict(_settings)
  configure(name, devices=devices)
  try:
    yield
  finally:
    _settings.update(previous)


def status() -> tuple[bool, str]:
  """Whether bf16 dots on the CPU go through the extension under the current settings, and why (or why not)."""
  name = _settings["mode"]
  if name == "xla":
    return False, "config.model.bf16_matmul='xla'"
  if jax.default_backend() != "cpu":
    return False, f"the backend is {jax.default_backend()}, not the CPU"
  if (reason := load()) is not None:
    return False, reason
  if name == "mkl":
    return True, "config.model.bf16_matmul='mkl'" + ("" if cpu_has_amx() else " (no AMX: MKL emulates bf16)")
  if _settings["devices"] > 1:
    return False, f"the step is split over {_settings['devices']} devices"
  if not cpu_has_amx():
    return False, "this CPU has no AMX (bf16 tiles)"
  return True, "the CPU has AMX"


def say_once(message: str) -> None:
  """Prints ``message`` the first time in this process (on process 0 of several)."""
  if message in _said:
    return
  _said.add(message)
  from transfer import distributed
  if distributed.is_main():
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The matmul: a Dense-shaped dot (trailing axes of x against leading axes of the kernel) on the extension.

def routes(lhs, rhs, dimension_numbers) -> bool:
  """Whether ``lax.dot_general(lhs, rhs, dimension_numbers)`` goes through the extension: both bf16, on the CPU,
  contracting ``lhs``'s trailing axes with ``rhs``'s leading ones (a Dense or DenseGeneral), the mode allowing."""
  if lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16:
    return False
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  count = len(lhs_contract)
  dense_shaped = (not lhs_batch and not rhs_batch and 0 < count < lhs.ndim and count < rhs.ndim
                  and tuple(a % lhs.ndim for a in lhs_contract) == tuple(range(lhs.ndim - count, lhs.ndim))
                  and tuple(rhs_contract) == tuple(range(count)))
  if not dense_shaped:
    return False
  on, why = status()
  if not on and jax.default_backend() != "cpu":
    return False   # GPUs and TPUs compute bf16 dots natively: nothing to say
  say_once(f"transfer: bf16 matmuls run on the MKL extension ({why})" if on else
           f"transfer: bf16 matmuls run through XLA, which computes them in float32 on the CPU ({why}); a bf16 "
           "step is then no faster than a float32 one (0.45-1.2x of it measured, experiments/results/"
           "bench_all_2026-12-07.json)")
  return on


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  """float32 ``op(a) @ op(b)`` of bf16 matrices (2-D) or stacks of them (3-D, batch first), on the extension."""
  if (reason := load()) is not None:   # registers the FFI target on first use
    raise RuntimeError(f"transfer.native.matmul: {reason}")
  batched = a.ndim == 3
  a3, b3 = (a, b) if batched else (a[None], b[None])
  m = a3.shape[2] if transpose_a else a3.shape[1]
  n = b3.shape[1] if transpose_b else b3.shape[2]
  out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((a3.shape[0], m, n), jnp.float32),
                         vmap_method="sequential")(   # under jax.vmap: one call per mapped entry
      a3.astype(jnp.bfloat16), b3.astype(jnp.bfloat16), transpose_a=transpose_a, transpose_b=transpose_b)
  return out if batched else out[0]


@jax.custom_vjp
def _dense2d(x, w):
  return matmul(x, w)


def _dense2d_forward(x, w):
  return matmul(x, w), (x, w)


def _dense2d_backward(saved, g):
  x, w = saved
  g = g.astype(jnp.bfloat16)   # the cotangent at the precision the layer computes in, as XLA's bf16 dot would
  return (matmul(g, w, transpose_b=True).astype(x.dtype),    # dx = g W^T
          matmul(x, g, transpose_a=True).astype(w.dtype))    # dW = x^T g, accumulated in float32


_dense2d.defvjp(_dense2d_forward, _dense2d_backward)


def dense_matmul(x, kernel, contracting: int, out_dtype):
  """``x``'s last ``contracting`` axes against ``kernel``'s first ones (``lax.dot_general`` as Dense computes it),
  on the extension, result in ``out_dtype``."""
  batch_shape, inner = x.shape[:x.ndim - contracting], x.shape[x.ndim - contracting:]
  out_shape = kernel.shape[contracting:]
  x2 = x.reshape(math.prod(batch_shape), math.prod(inner))
  w2 = kernel.reshape(math.prod(inner), math.prod(out_shape))
  out = _dense2d(x2, w2).astype(out_dtype).reshape(*batch_shape, *out_shape)
  return checkpoint_name(out, SAVEABLE_NAME)

