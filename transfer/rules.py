"""The one mechanism for per-parameter decisions.

A rule list is an ordered sequence of ``(regex, value)`` pairs. A parameter's path is its keys joined by ``/``
(``backbone/stem/conv/kernel``); the first regex that matches the *whole* path (``re.fullmatch``) decides. The
same lists pick what is frozen, learning-rate and weight-decay multipliers and what is loaded from a checkpoint
(see ``transfer.optim.param_specs``), and later LoRA targets and shardings.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, Any]:
  """Nested dict -> ``{'a/b/c': leaf}``."""
  return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{'a/b/c': leaf}`` -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def compile_rules(rules: Iterable[Sequence], *, what: str) -> list[tuple[re.Pattern, Any]]:
  """Validates ``[(regex, value), ...]``; a bad entry is an error naming ``what`` and its position."""
  compiled = []
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"{what}[{i}] must be a (regex, value) pair, got {rule!r}")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ValueError(f"{what}[{i}]: invalid regex {rule[0]!r}: {e}") from None
  return compiled


def first_match(compiled: Sequence[tuple[re.Pattern, Any]], path: str) -> tuple[int | None, Any]:
  """(index, value) of the first rule whose regex fully matches ``path``; (None, None) if none does."""
  for i, (pattern, value) in enumerate(compiled):
    if pattern.fullmatch(path):
      return i, value
  return None, None


def assign(rules: Iterable[Sequence], paths: Iterable[str], *, what: str,
           required: bool = True) -> dict[str, tuple[int | None, Any]]:
  """Maps every path to ``(rule index, value)``; with ``required`` an uncovered path is an error."""
  compiled = compile_rules(rules, what=what)
  out = {p: first_match(compiled, p) for p in paths}
  uncovered = sorted(p for p, (i, _) in out.items() if i is None)
  if required and uncovered:
    shown = "\n  ".join(uncovered[:20]) + ("\n  ..." if len(uncovered) > 20 else "")
    regexes = ", ".join(repr(p.pattern) for p, _ in compiled) or "(none)"
    raise ValueError(f"{what}: no rule covers {len(uncovered)} parameter(s):\n  {shown}\n"
                     f"rules in order: {regexes}. Add a rule (e.g. ('.*', {{}}) as the last) to cover them.")
  return out
