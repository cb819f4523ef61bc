"""The whole config checked once, before any data is read or anything compiled, and the command line's lengths.

``validate(config)`` checks the type and range of every field ``transfer/config_base.py`` defines (and that no
other field is set: a misspelt field in a config file would otherwise be silently ignored). It reports every
problem at once, each naming its field, so a bad value fails in a second instead of after data loading or XLA
compilation, or never (a negative ``checkpoint.every_steps`` used to mean "every 2").

The command line (``python -m transfer.train``) gets two more things here:

- ``--config.FIELD=None`` clears a field, and ``--config.FIELD=[...]`` replaces a list field (the rule lists:
  ``--config.sharding_rules='[(".*", "tensor")]'``) with a Python literal (``split_value_overrides`` and
  ``set_values``): ml_collections parses a value by the field's type, so it rejects ``None`` for the float
  placeholders (``total_epochs``) and cannot override a list at all. A literal is read with ``ast.literal_eval``:
  never run.
- ``resolve_lengths``: a length given on the command line replaces the config file's. Setting ``total_steps``
  where the file sets ``total_epochs`` clears ``total_epochs`` with a printed note (the last one said wins), and
  the same for ``schedule.warmup_steps`` / ``schedule.warmup_epochs``.
"""
from __future__ import annotations

import ast
import difflib
import math
import re
from collections.abc import Mapping
from typing import Callable, Iterable

# A length is given in steps or in epochs, never both: (steps field, epochs field).
LENGTH_PAIRS = (("total_steps", "total_epochs"), ("schedule.warmup_steps", "schedule.warmup_epochs"))
AUTO = "auto"
_VALUE_OVERRIDE = re.compile(r"^-{1,2}config\.([A-Za-z0-9_.]+)=(None|\[.*)$", re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------------------------
def split_value_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, object]]]:
  """(argv without its ``--config.PATH=None`` and ``--config.PATH=[...]`` arguments, their (PATH, value) pairs in
  order). Only the exact spelling ``None`` counts, so a string field's value 'none' (``--config.data.augment=none``)
  passes through unchanged; a value starting with ``[`` must be a whole Python list literal."""
  kept, values = [], []
  for arg in argv:
    match = _VALUE_OVERRIDE.match(arg)
    if not match:
      kept.append(arg)
      continue
    path, text = match.groups()
    if text == "None":
      values.append((path, None))
      continue
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"--config.{path}={text}: not a Python list literal ({type(e).__name__}: "
                       f"{getattr(e, 'msg', e)}); in a shell, quote the whole list: --config.{path}='[...]'") from None
    if not isinstance(value, list):
      raise ValueError(f"--config.{path}={text}: expected a list, got a {type(value).__name__}")
    values.append((path, value))
  return kept, values


def field_holder(config, path: str, flag: str):
  """(the ConfigDict that holds ``path``'s last part, that part); a missing field is an error naming ``flag``."""
  parts = path.split(".")
  node, where = config, "config"
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else f"; its fields: {known}" if known else ""
      raise ValueError(f"{flag}: {where} has no field {part!r}{hint}")
    if i < len(parts) - 1:
      node, where = node[part], f"{where}.{part}"
  return node, parts[-1]


def set_values(config, values: Iterable[tuple[str, object]]) -> None:
  """Sets each ``config.PATH`` to its value (``split_value_overrides``'s pairs); an unknown field is an error, and
  so is a list for a field that does not hold one."""
  for path, value in values:
    flag = f"--config.{path}=" + ("None" if value is None else "[...]")
    node, leaf = field_holder(config, path, flag)
    if value is not None and not isinstance(node[leaf], (list, tuple)):
      raise ValueError(f"{flag}: config.{path} is not a list field (it holds {node[leaf]!r}): give its value "
                       f"without brackets")
    node[leaf] = value


def _get(config, path: str, default=None):
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def resolve_lengths(config, overridden: Iterable[str], log: Callable[[str], None] = print) -> None:
  """The command line's length replaces the config file's: for each (steps, epochs) pair of ``LENGTH_PAIRS``, a
  field the command line set (``overridden``: its override paths) clears the other if only the file set it,
  with a note. Both set on the command line is an error: there is no telling which was meant."""
  overridden = set(overridden)
  for pair in LENGTH_PAIRS:
    given = [f for f in pair if f in overridden and _get(config, f) is not None]
    if len(given) == 2:
      raise ValueError(f"the command line sets both --config.{pair[0]}={_get(config, pair[0])!r} and "
                       f"--config.{pair[1]}={_get(config, pair[1])!r}: a length is in steps or in epochs; give one")
    if not given:
      continue
    other = pair[1] if given[0] == pair[0] else pair[0]
    old = _get(config, other)
    if old is not None:
      node, leaf = field_holder(config, other, f"config.{other}")
      node[leaf] = None
      log(f"note: --config.{given[0]}={_get(config, given[0])!r} replaces the config file's {other}={old!r}, "
          f"now None")


# ----------------------------------------------------------------------------------------------------------------
# The whole config.
# ----------------------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_MISSING = object()


class _Checker:
  """Collects one message per bad field; fields the config does not have are skipped (their readers' defaults)."""

  def __init__(self, config):
    self.config, self.errors = config, []

  def has(self, path: str) -> bool:
    return _get(self.config, path, _MISSING) is not _MISSING

  def value(self, path: str):
    return _get(self.config, path)

  def fail(self, path: str, expected: str, hint: str = "") -> None:
    self.errors.append(f"config.{path}={self.value(path)!r}: expected {expected}" + (f" ({hint})" if hint else ""))

  def integer(self, path: str, minimum: int, *, maximum: int | None = None, optional: bool = False,
              auto: bool = False, hint: str = "") -> None:
    if not self.has(path):
      return
    value = self.value(path)
    if (value is None and optional) or (auto and value == AUTO):
      return
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
      bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
      self.fail(path, f"{repr(AUTO) + ' or ' if auto else ''}an integer {bound}{' (or None)' if optional else ''}",
                hint)

  def number(self, path: str, low: float, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False, optional: bool = False, auto: bool = False, hint: str = "") -> None:
    if not self.has(path):
      return
    value = self.value(path)
    if (value is None and optional) or (auto and value == AUTO):
      return
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
      if high == math.inf:
        bound = f"{'>' if low_open else '>='} {low:g}"
      else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
      self.fail(path, f"{repr(AUTO) + ' or ' if auto else ''}a number {bound}{' (or None)' if optional else ''}",
                hint)

  def choice(self, path: str, choices, *, optional: bool = False, what: str = "") -> None:
    if not self.has(path):
      return
    value = self.value(path)
    if (value is None and optional) or value in choices:
      return
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
    head = f"config.{path}: unknown {what} {value!r}; available:" if what else f"config.{path}: {value!r} is not one of"
    self.errors.append(f"{head} {list(choices)}" + (f"; did you mean {close[0]!r}?" if close else ""))

  def boolean(self, path: str) -> None:
    if self.has(path) and not isinstance(self.value(path), bool):
      self.fail(path, "True or False")

  def text(self, path: str, *, optional: bool = True) -> None:
    if not self.has(path):
      return
    value = self.value(path)
    if (value is None and optional) or (isinstance(value, str) and value):
      return
    self.fail(path, f"a non-empty string{' (or None)' if optional else ''}")


def _unknown_fields(reference, config, prefix: str = "") -> list[str]:
  """One message for each of ``config``'s fields that ``reference`` (``config_base.base()``) does not define."""
  unknown = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      unknown.append(f"config.{path}: not a config field" + (f"; did you mean {prefix}{close[0]}?" if close else
                     f"; the fields here are {sorted(reference.keys())}") + " (every field: transfer/config_base.py)")
    elif hasattr(reference[key], "keys") and hasattr(config[key], "keys"):
      unknown += _unknown_fields(reference[key], config[key], f"{path}.")
  return unknown


def _check_param_rules(config, errors: list[str]) -> None:
  """Each entry a (regex, dict) pair; the regex compiles; the dict holds only known rule fields of their type."""
  if "param_rules" not in config:
    return
  from transfer import optim, rules
  param_rules = config.param_rules
  if not isinstance(param_rules, (list, tuple)):
    errors.append(f"config.param_rules={param_rules!r}: expected a list of (regex, dict) pairs, e.g. "
                  f"[('head/.*', dict(load=False)), ('.*', {{}})]")
    return
  try:
    rules.compile_rules(param_rules, what="config.param_rules")
  except ValueError as e:
    example = "; each entry is a (regex, dict) pair, e.g. ('backbone/.*', dict(lr_mult=0.1))"
    errors.append(f"{e}{example if 'pair' in str(e) else ''}")
    return
  for i, (regex, fields) in enumerate(param_rules):
    where = f"config.param_rules[{i}] ({regex!r})"
    if fields is None:
      continue
    if not isinstance(fields, Mapping) and not hasattr(fields, "keys"):
      errors.append(f"{where}: its value {fields!r} is not a dict; a rule's dict holds some of "
                    f"{sorted(optim.RULE_FIELDS)}, e.g. dict(freeze=True)")
      continue
    unknown = sorted(set(fields.keys()) - set(optim.RULE_FIELDS))
    if unknown:
      errors.append(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(optim.RULE_FIELDS)}")
    for key in ("lr_mult", "wd_mult"):
      if key in fields and not (_is_number(fields[key]) and fields[key] >= 0):
        errors.append(f"{where}: {key}={fields[key]!r}: expected a number >= 0")
    for key in ("freeze", "load"):
      if key in fields and not isinstance(fields[key], bool):
        errors.append(f"{where}: {key}={fields[key]!r}: expected True or False")
    if fields.get("lora") is not None:
      from transfer.models import lora
      try:
        lora.parse(fields["lora"], where)
      except ValueError as e:
        errors.append(str(e))


def _check_mesh(config, errors: list[str]) -> None:
  from transfer import sharding
  if "mesh" in config:
    free = []
    for axis in sharding.MESH_AXES:
      size = config.mesh.get(axis, 1)
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        errors.append(f"config.mesh.{axis}={size!r}: expected a positive int, or -1 for the remaining devices")
      elif size == -1:
        free.append(axis)
    if len(free) > 1:
      errors.append(f"config.mesh: only one axis may be -1 (the remaining devices), got {', '.join(free)}")
  if "sharding_rules" in config:
    if not isinstance(config.sharding_rules, (list, tuple)):
      errors.append(f"config.sharding_rules={config.sharding_rules!r}: expected a list of (regex, value) pairs, e.g. "
                    "[('.*', 'fsdp')]")
      return
    try:
      sharding.check_rules(config.sharding_rules)
    except ValueError as e:
      errors.append(str(e))


def _check_best_metric(config, check: _Checker) -> None:
  """Model selection only on a validation split: the best checkpoint by an eval/... metric would be chosen on the
  split that is then reported; a val/... metric needs data.val_fraction > 0."""
  metric, val = check.value("checkpoint.best_metric"), check.value("data.val_fraction")
  if not isinstance(metric, str) or metric == "auto" or not isinstance(val, (int, float)):
    return
  if metric.startswith("eval/"):
    check.errors.append(f"config.checkpoint.best_metric={metric!r} would choose the checkpoint on the eval split, "
                        f"which is then reported: set config.data.val_fraction (e.g. 0.1) and use "
                        f"'val/{metric[len('eval/'):]}' (or 'auto')")
  elif metric.startswith("val/") and not val:
    check.errors.append(f"config.checkpoint.best_metric={metric!r} needs a validation split: set "
                        f"config.data.val_fraction (e.g. 0.1)")


def validate(config) -> None:
  """Raises ValueError listing every field of ``config`` whose type or value is wrong, each named
  ``config.FIELD=value: expected ...``. Cheap (no data, no model): call it before any work."""
  from transfer import config_base, hyper_rule, models, native, tasks
  from transfer.data import SOURCES
  from transfer.data.images import AUGMENTATIONS
  from transfer.models import efficientnet_lite
  from transfer.models.classifier import TEXT_POOLINGS
  check = _Checker(config)
  check.errors += _unknown_fields(config_base.base(), config)

  check.integer("seed", 0, maximum=2 ** 63 - 1, hint="seeds the init, dropout and data order")
  check.choice("task", ["auto", *sorted(tasks.TASKS)])
  check.choice("dropout_rng_impl", ("rbg", "threefry"))

  # Model.
  check.choice("model.name", models.NAMES, what="model")
  check.text("model.pretrained")
  check.text("model.architecture")
  check.number("model.width", 0, low_open=True, optional=True)
  check.number("model.depth", 0, low_open=True, optional=True)
  check.number("model.dropout", 0, 1, high_open=True, hint="a probability")
  check.number("model.drop_path", 0, 1, high_open=True, hint="a probability")
  check.number("model.bn_momentum", 0, 1)
  check.choice("model.backbone_mode", ("auto", "train", "inference"))
  check.choice("model.dtype", sorted(models.DTYPES))
  check.choice("model.bf16_matmul", native.MODES)
  check.choice("model.remat", models.REMAT_POLICIES)
  check.choice("model.pooling", TEXT_POOLINGS)
  check.integer("model.posemb_grid", 1, optional=True)
  check.choice("model.padding", sorted(efficientnet_lite.PADDINGS), optional=True)
  norm = check.value("model.input_norm")
  if check.has("model.input_norm") and norm not in (None, AUTO):
    try:
      models.input_normalization(None, norm)   # the family only matters for 'auto'
    except ValueError as e:
      check.errors.append(str(e))

  # Data.
  check.choice("data.name", sorted(SOURCES), what="dataset")
  check.integer("data.train_per_class", 1, optional=True)
  check.number("data.test_fraction", 0, 1, low_open=True, high_open=True)
  check.number("data.val_fraction", 0, 1, high_open=True, hint="0: no validation split")
  check.integer("data.split_seed", 0, maximum=2 ** 32 - 1)
  check.choice("data.augment", AUGMENTATIONS)
  check.number("data.crop_min_area", 0, 1, low_open=True, hint="a fraction of the image's area")
  check.number("data.eval_crop", 0, 1, low_open=True, hint="a fraction of the shorter side")
  check.boolean("data.strict")
  check.boolean("data.download")
  for field in ("train_file", "eval_file", "pair_field", "tfds_name", "data_dir", "train_split", "eval_split"):
    check.text(f"data.{field}")
  for field in ("text_field", "label_field", "prompt_field", "response_field"):
    check.text(f"data.{field}", optional=False)
  labels = check.value("data.labels")
  if labels is not None and (not isinstance(labels, (list, tuple)) or not labels or len(set(labels)) < len(labels)):
    check.fail("data.labels", "a list of distinct class names (or None: the sorted distinct labels)")
  check.integer("data.max_length", 2, hint="tokens per example, [CLS] and [SEP] included")
  check.integer("data.pad_to_multiple_of", 0, hint="0: every batch at max_length")
  check.integer("data.train_examples", 1, optional=True)
  if check.value("data.name") == "text_files":
    for field in ("train_file", "eval_file"):
      if check.has(f"data.{field}") and check.value(f"data.{field}") is None:
        check.errors.append(f"config.data.{field} is not set: data.name='text_files' reads a .tsv, .csv or .jsonl "
                            "file with a header")

  # Batches, length, loss.
  check.integer("batch_size", 1, hint="examples per optimizer step")
  check.integer("grad_accum_steps", 1, hint="micro-batches per step; 1: none")
  batch, accum = check.value("batch_size"), check.value("grad_accum_steps")
  if _is_int(batch) and _is_int(accum) and batch >= 1 and accum >= 1 and batch % accum:
    check.errors.append(f"config.batch_size={batch} is not divisible by config.grad_accum_steps={accum}")
  check.integer("eval_batch_size", 1, hint="examples per evaluation batch")
  for path, (kind, minimum, optional) in hyper_rule.FIELDS.items():
    if kind is int:
      check.integer(path, minimum, optional=optional, auto=True)
    else:
      check.number(path, minimum, optional=optional, auto=True)
  check.number("total_epochs", 0, low_open=True, optional=True)
  check.number("schedule.warmup_epochs", 0, optional=True)
  for steps, epochs in LENGTH_PAIRS:
    if check.has(steps) and check.value(steps) is not None and check.value(epochs) is not None:
      check.errors.append(f"config.{steps}={check.value(steps)!r} and config.{epochs}={check.value(epochs)!r} are "
                          f"both set: set only one (on the command line, the one given replaces the file's)")
  if check.has("total_steps") and check.value("total_steps") is None and check.value("total_epochs") is None:
    check.errors.append("config.total_steps and config.total_epochs are both None: set one (or "
                        "total_steps='auto')")
  total, warmup = check.value("total_steps"), check.value("schedule.warmup_steps")
  if _is_int(total) and _is_int(warmup) and total >= 1 and warmup >= total:
    check.errors.append(f"config.schedule.warmup_steps={warmup} must be shorter than config.total_steps={total}")
  check.number("label_smoothing", 0, 1, high_open=True)
  if check.value("task") == "regression" and _is_number(check.value("label_smoothing")) and \
      check.value("label_smoothing"):
    check.errors.append("config.label_smoothing applies to classes; config.task='regression': set it to 0")

  # Schedule and optimizer.
  check.number("schedule.lr", 0, hint="the peak learning rate")
  check.choice("schedule.decay", ("cosine", "linear", "constant"))
  check.choice("optimizer.name", ("adamw", "sgd"))
  check.number("optimizer.b1", 0, 1, high_open=True)
  check.number("optimizer.b2", 0, 1, high_open=True)
  check.number("optimizer.eps", 0, low_open=True)
  check.number("optimizer.momentum", 0, 1, high_open=True, hint="0: plain SGD")
  check.boolean("optimizer.nesterov")
  check.number("optimizer.weight_decay", 0)
  check.number("optimizer.grad_clip_norm", 0, hint="0: no clipping")
  check.choice("optimizer.mu_dtype", ("float32", "bfloat16"))
  _check_param_rules(config, check.errors)
  check.number("layer_decay", 0, 1, hint="0: off; e.g. 0.8")

  # Devices: the mesh's sizes and the sharding rules' shape (whether they fit the device count and the parameters
  # is checked once both are known, before compiling: transfer/sharding.py).
  _check_mesh(config, check.errors)

  # Feature cache, logging, checkpoints.
  check.choice("feature_cache", ("auto", "on", "off"))
  check.text("feature_cache_dir")
  check.integer("log_every", 1, hint="steps between metrics.jsonl rows")
  check.integer("eval_every", 0, hint="steps between evaluations; 0: only at the end")
  check.integer("checkpoint.every_steps", 0, hint="steps between checkpoints; 0: only at the end")
  check.integer("checkpoint.keep_last", 1, hint="the last checkpoint is always kept")
  check.text("checkpoint.best_metric")
  _check_best_metric(config, check)
  check.choice("checkpoint.best_mode", ("auto", "max", "min"))
  check.integer("fault.kill_at_step", 1, optional=True)
  check.integer("fault.nan_at_step", 1, optional=True)

  if check.errors:
    many = len(check.errors) > 1
    raise ValueError((f"{len(check.errors)} config problems:\n  " if many else "") + "\n  ".join(check.errors))
