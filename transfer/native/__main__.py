"""Builds the bf16 matmul extension: ``python -m transfer.native`` (``make`` runs it after installing ``mkl`` and
``mkl-include`` into the virtual environment). Compiles ``bf16_matmul.cc`` against JAX's FFI headers and MKL's
sequential libraries from this environment (``sys.prefix``), into ``transfer/native/_bf16_matmul.so``; exits 1,
saying why, where it cannot."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax

from transfer import native

# MKL's single-dynamic-library-per-layer form: LP64 interface, sequential threading (the extension runs its blocks
# on XLA's own thread pool), core. The wheels ship versioned names only, hence -l: with the full file name.
_MKL_LIBRARIES = ("libmkl_intel_lp64.so", "libmkl_sequential.so", "libmkl_core.so")


def _mkl_libraries(lib: Path) -> list[str]:
  """The versioned MKL library files in ``lib`` (``.so.2`` or ``.so.3``, whichever this MKL ships)."""
  found = []
  for stem in _MKL_LIBRARIES:
    candidates = sorted(lib.glob(stem + ".*"))
    if not candidates:
      raise FileNotFoundError(f"{lib / (stem + '.*')} not found: `pip install mkl mkl-include` into this "
                              f"environment ({sys.prefix})")
    found.append(candidates[-1].name)
  return found


def build(output: Path = native.SOURCE.with_name("_bf16_matmul.so")) -> Path:
  """Compiles the extension to ``output`` (written to a temporary name first: a failed build leaves no library)."""
  prefix = Path(sys.prefix)
  if not (prefix / "include" / "mkl.h").exists():
    raise FileNotFoundError(f"{prefix / 'include' / 'mkl.h'} not found: `pip install mkl-include` into this "
                            f"environment")
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise FileNotFoundError("no C++ compiler (g++ or $CXX) on PATH")
  lib = prefix / "lib"
  partial = output.with_suffix(".partial.so")
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(native.SOURCE),
             "-isystem", jax.ffi.include_dir(), "-I", str(prefix / "include"), "-L", str(lib),
             *(f"-l:{name}" for name in _mkl_libraries(lib)), f"-Wl,-rpath,{lib}", "-lpthread", "-lm",
             "-o", str(partial)]
  subprocess.run(command, check=True)
  partial.replace(output)
  return output


def main() -> int:
  try:
    path = build()
  except (FileNotFoundError, subprocess.CalledProcessError) as e:
    print(f"transfer.native: the bf16 matmul extension was not built: {e}. The project runs without it "
          f"(bf16 matmuls through XLA).", file=sys.stderr)
    return 1
  print(f"transfer.native: built {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
