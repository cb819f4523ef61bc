"""Where a compiled JAX step spends its time: per-op durations from ``jax.profiler``, each op put in a category by
what the optimised HLO says it computes (a fusion by the ops inside it).

Used by ``bench_train_step.py --profile`` (the JAX rows then carry ``op_profile``: seconds per step and shares
by category, and the ops that take longest). Categories, first match wins:

- ``matmul``: a dot (alone, or in a fusion, or a library call: YNNPACK, oneDNN);
- ``convolution``;
- ``collective``: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute;
- ``random``: rng-bit-generator (dropout bits with ``dropout_rng_impl='rbg'``);
- ``reduction``: reduce or reduce-window inside (norm statistics, pooling, the loss's sums);
- ``transpose/copy``: only data movement inside (transpose, copy, reshape, broadcast, slice, pad, concatenate):
  the layout changes the CPU backend inserts, among them the transposed operands of weight-gradient matmuls;
- ``elementwise``: the rest (activations, normalisation arithmetic, the optimizer's update).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

MOVES = {"transpose", "copy", "convert", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
         "pad", "concatenate", "parameter", "constant", "tuple", "get-tuple-element", "iota", "reverse"}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "all-reduce-start",
               "all-gather-start", "collective-permute-start"}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def parse_hlo(text: str) -> tuple[dict[str, tuple[set[str], set[str]]], dict[str, tuple[str, list[str], str]]]:
  """(computation -> (opcodes in it, computations it calls), instruction -> (opcode, computations it calls, the
  rest of its line))."""
  computations: dict[str, tuple[set[str], set[str]]] = {}
  instructions: dict[str, tuple[str, list[str], str]] = {}
  current = None
  for line in text.splitlines():
    if header := _HEADER.match(line):
      current = header.group(1)
      computations[current] = (set(), set())
      continue
    if line.strip() == "}":
      current = None
      continue
    if current is None or not (m := _INSTRUCTION.match(line)):
      continue
    name, opcode, rest = m.groups()
    calls = _CALLS.findall(rest)
    computations[current][0].add(opcode)
    computations[current][1].update(calls)
    instructions[name] = (opcode, calls, rest)
  return computations, instructions


def categorise(opcode: str, ops: set[str], rest: str = "") -> str:
  """The category (module docstring) of an instruction with ``opcode`` whose called computations hold ``ops``;
  ``rest``, the remainder of its HLO line, names a custom call's target."""
  every = ops | {opcode}
  target = re.search(r'custom_call_target="([^"]*)"', rest)
  if "dot" in every or (target and re.search(r"onednn|matmul|gemm", target.group(1), re.I)):
    return "matmul"
  if "convolution" in every or (target and "conv" in target.group(1).lower()):
    return "convolution"
  if every & COLLECTIVES:
    return "collective"
  if "rng-bit-generator" in every:
    return "random"
  if every & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduction"
  if every <= MOVES | {"fusion"}:
    return "transpose/copy"
  return "elementwise"


def categories(text: str) -> dict[str, str]:
  """Instruction name -> category, for every instruction of the optimised HLO ``text``."""
  computations, instructions = parse_hlo(text)

  def inside(names, seen: set[str]) -> set[str]:
    ops: set[str] = set()
    for c in names:
      if c in seen or c not in computations:
        continue
      seen.add(c)
      ops |= computations[c][0] | inside(computations[c][1], seen)
    return ops

  return {name: categorise(opcode, inside(calls, set()), rest) for name, (opcode, calls, rest) in instructions.items()}


def op_seconds(trace_dir: str, module: str) -> dict[str, float]:
  """Total seconds per HLO op of ``module`` (a prefix of the jitted function's module name) in the trace."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  with gzip.open(sorted(paths)[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ops = sorted((e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})
                and str(e["args"].get("hlo_module", "")).startswith(module)),
               key=lambda e: (e["pid"], e["tid"], e["ts"], -e.get("dur", 0.0)))
  # Self time: an op that runs others inside it (a ``call`` of an outlined computation) is counted without them,
  # so each microsecond is counted once, at the op that did the work.
  totals: dict[str, float] = collections.Counter()
  stack: list[dict] = []
  for e in ops:
    while stack and (stack[-1]["pid"], stack[-1]["tid"]) == (e["pid"], e["tid"]) and \
        e["ts"] >= stack[-1]["ts"] + stack[-1].get("dur", 0.0):
      stack.pop()
    if stack and (stack[-1]["pid"], stack[-1]["tid"]) != (e["pid"], e["tid"]):
      stack = []
    if stack:   # inside the op on top of the stack: its time is this op's, not the parent's
      totals[stack[-1]["args"]["hlo_op"]] -= e.get("dur", 0.0) / 1e6
    totals[e["args"]["hlo_op"]] += e.get("dur", 0.0) / 1e6   # microseconds
    stack.append(e)
  return {k: max(v, 0.0) for k, v in totals.items()}


def profile(run: Callable[[], object], hlo_text: str, module: str, steps: int, top: int = 8) -> dict:
  """Runs ``run`` (one step; its result is waited for) ``steps`` times under the profiler and returns seconds
  per step by category, their shares, and the ``top`` ops (name, category, share)."""
  import jax
  with tempfile.TemporaryDirectory(prefix="op_profile_") as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(run())
    seconds = op_seconds(tmp, module)
  kinds = categories(hlo_text)
  by_kind: dict[str, float] = collections.Counter()
  for name, s in seconds.items():
    by_kind[kinds.get(name, "elementwise")] += s
  total = sum(seconds.values()) or 1.0
  return {"steps": steps, "op_seconds_per_step": total / steps,
          "shares": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
          "top": [(name, kinds.get(name, "elementwise"), s / total)
                  for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:top]]}
