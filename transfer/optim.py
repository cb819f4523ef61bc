"""Where every parameter's learning rate, weight decay, frozen-ness and loading is decided.

``param_specs`` applies ``config.param_rules`` (first match wins, see ``transfer.rules``) and the optional
layer-wise decay, giving one ``ParamSpec`` per parameter path. Everything downstream reads those specs:
``split_trainable`` keeps frozen parameters out of the gradient and the optimizer entirely (no moments, no
backward pass), ``make_optimizer`` builds an ``optax.partition`` with one group per distinct (lr, wd) multiplier,
and the trainer's checkpoint loader asks ``spec.load``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
import optax

from transfer import rules as rules_lib
from transfer.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  rule: int           # index into config.param_rules
  lr_mult: float      # multiplies the scheduled learning rate
  wd_mult: float      # multiplies config.optimizer.weight_decay
  freeze: bool        # no gradient, no optimizer state
  load: bool          # taken from the pretrained checkpoint (False: keeps its fresh initialisation)
  lora: lora_lib.LoraSpec | None = None   # a kernel with a LoRA adapter (then frozen itself)
  adapter: bool = False                   # a LoRA adapter's lora_a or lora_b: its kernel's rule, trained


RULE_FIELDS = {"lr_mult": 1.0, "wd_mult": 1.0, "freeze": False, "load": True, "lora": None}


def rule_values(param_rules) -> list[tuple[str, dict]]:
  """Fills defaults into each rule's dict; an unknown field is an error naming the rule."""
  out = []
  for i, rule in enumerate(param_rules):
    regex, fields = rule
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(RULE_FIELDS))
    if unknown:
      raise ValueError(f"config.param_rules[{i}] ({regex!r}): unknown field(s) {unknown}; "
                       f"valid fields: {sorted(RULE_FIELDS)}")
    out.append((regex, {**RULE_FIELDS, **fields}))
  return out


def layer_depths(paths, layer_regexes) -> tuple[dict[str, int], int]:
  """Depth of each path for layer-wise lr decay: ``layer_regexes`` is ordered ``[(regex, depth), ...]``.

  ``depth`` is an int, or the string ``'group+K'`` meaning the first regex group (a block number) plus K.
  Paths that match nothing (the new head) get the maximum depth, i.e. no decay.
  """
  compiled = rules_lib.compile_rules(layer_regexes, what="model layer_regexes")
  depths = {}
  for p in paths:
    for pattern, depth in compiled:
      m = pattern.fullmatch(p)
      if m:
        depths[p] = int(m.group(1)) + int(depth[6:]) if isinstance(depth, str) else int(depth)
        break
  top = max(depths.values(), default=0) + 1
  return {p: depths.get(p, top) for p in paths}, top


def param_specs(param_rules, paths, *, layer_decay: float = 0.0, layer_regexes=()) -> dict[str, ParamSpec]:
  """One ``ParamSpec`` per path: the single place a parameter's lr, wd, freezing and loading are decided.

  LoRA (``transfer/models/lora.py``): a kernel whose rule has ``lora`` is frozen, and its adapters
  (``.../lora_a``, ``.../lora_b``) take that rule's lr and wd, train, and are never loaded from a checkpoint."""
  values = rule_values(param_rules)
  adapters = [p for p in paths if lora_lib.is_adapter(p)]
  # An adapter follows its kernel's rule (and depth), whatever rule its own path would match.
  owner = {p: lora_lib.kernel_of(p) for p in adapters}
  assigned = rules_lib.assign(values, [p for p in paths if p not in owner], what="config.param_rules")
  depths, top = layer_depths(paths, layer_regexes) if layer_decay else ({}, 0)
  depths = {**depths, **{p: depths[k] for p, k in owner.items() if k in depths}}
  specs = {}
  for p, (i, v) in assigned.items():
    lr = float(v["lr_mult"]) * (float(layer_decay) ** (top - depths[p]) if layer_decay else 1.0)
    lora = lora_lib.parse(v["lora"], f"config.param_rules[{i}] ({values[i][0]!r})")
    if lora is not None:
      where = f"config.param_rules[{i}] ({values[i][0]!r})"
      if bool(v["freeze"]):
        raise ValueError(f"{where}: lora with freeze=True trains nothing; the kernel under an adapter is frozen "
                         "anyway, drop freeze")
      if not p.endswith("/kernel"):
        raise ValueError(f"{where}: LoRA adapts Dense and convolution kernels, and {p} is not one (a bias, "
                         "scale or embedding); narrow the regex, e.g. to '.../kernel'")
      if p[:-len("kernel")] + "lora_a" not in owner:
        raise ValueError(f"{where}: {p} is a kernel of a layer that takes no LoRA adapter here (a depthwise or "
                         "custom layer); adapters go on nn.Dense, nn.Conv and BiT's StdConv kernels")
    specs[p] = ParamSpec(rule=i, lr_mult=lr, wd_mult=float(v["wd_mult"]), freeze=bool(v["freeze"]) or bool(lora),
                         load=bool(v["load"]), lora=lora)
  for p, kernel in owner.items():
    spec = specs.get(kernel)
    if spec is None or spec.lora is None:
      raise ValueError(f"{p}: an adapter whose kernel {kernel} no LoRA rule targets (the model was built with "
                       "other rules than config.param_rules)")
    lr = spec.lr_mult   # the kernel's, layer decay included
    specs[p] = ParamSpec(rule=spec.rule, lr_mult=lr, wd_mult=spec.wd_mult, freeze=False, load=False, adapter=True)
  return specs


def load_decider(param_rules) -> Callable[[str], bool]:
  """``path -> load?`` for every variable collection; paths no rule covers (e.g. BN statistics) are loaded."""
  compiled = rules_lib.compile_rules(rule_values(param_rules), what="config.param_rules")

  def should_load(path: str) -> bool:
    if lora_lib.is_adapter(path):   # adapters start as peft's: A random, B zero
      return False
    index, fields = rules_lib.first_match(compiled, path)
    return True if index is None else bool(fields["load"])
  return should_load


def split_trainable(flat_params: Mapping[str, Any], specs: Mapping[str, ParamSpec]):
  """(trainable, frozen) flat dicts."""
  trainable = {p: v for p, v in flat_params.items() if not specs[p].freeze}
  frozen = {p: v for p, v in flat_params.items() if specs[p].freeze}
  return trainable, frozen


# ----------------------------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------------------------
def frozen_batch_stats(specs: Mapping[str, ParamSpec], stats_paths) -> frozenset[str]:
  """The BatchNorm statistics (flat ``batch_stats`` paths, e.g. ``backbone/stem_bn/mean``) whose running averages
  stay as loaded: those of layers whose every parameter (scale, bias) a rule freezes. So statistics follow their
  layer's rule: a frozen stem keeps its ImageNet statistics while the blocks after it fine-tune. (A BatchNorm
  without scale and bias has nothing to freeze: in training mode its statistics update.)"""
  frozen = set()
  for path in stats_paths:
    layer = path.rsplit("/", 1)[0] + "/"
    owned = [spec for p, spec in specs.items() if p.startswith(layer) and "/" not in p[len(layer):]]
    if owned and all(spec.freeze for spec in owned):
      frozen.add(path)
  return frozenset(frozen)


def steps_of(cfg, field: str, steps_per_epoch: int) -> int | None:
  """Reads ``cfg.<field>_steps`` or ``cfg.<field>_epochs`` (exactly one may be set)."""
  steps, epochs = cfg.get(f"{field}_steps"), cfg.get(f"{field}_epochs")
  if steps is not None and epochs is not None:
    raise ValueError(f"config: set only one of {field}_steps and {field}_epochs")
  if epochs is not None:
    return int(math.ceil(float(epochs) * steps_per_epoch))
  return None if steps is None else int(steps)


def make_schedule(cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then 'cosine' (to 0), 'linear' (to 0) or 'constant' at ``cfg.lr``."""
  warmup = steps_of(cfg, "warmup", steps_per_epoch) or 0
  if warmup >= total_steps and total_steps > 0:
    raise ValueError(f"config.schedule: warmup ({warmup} steps) must be shorter than training ({total_steps})")
  lr, decay = float(cfg.lr), cfg.decay
  rest = max(total_steps - warmup, 1)
  tails = {"cosine": optax.cosine_decay_schedule(lr, rest),
           "linear": optax.linear_schedule(lr, 0.0, rest),
           "constant": optax.constant_schedule(lr)}
  if decay not in tails:
    raise ValueError(f"config.schedule.decay: {decay!r} is not one of {sorted(tails)}")
  if not warmup:
    return tails[decay]
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), tails[decay]], [warmup])


# ----------------------------------------------------------------------------------------------------------------
# The partitioned optimizer.
# ----------------------------------------------------------------------------------------------------------------
def _base(cfg) -> tuple[optax.GradientTransformation, bool]:
  """The moment-keeping part of the update, and whether weight decay goes before it (L2) or after (decoupled)."""
  mu_dtype = jnp.dtype(cfg.get("mu_dtype", "float32"))   # Adam's second moment stays float32: it squares
  if cfg.name == "sgd":
    return (optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov, accumulator_dtype=mu_dtype) if cfg.momentum
            else optax.identity()), True
  if cfg.name == "adamw":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype), False
  raise ValueError(f"config.optimizer.name: {cfg.name!r} is not one of ['adamw', 'sgd']")


def group_label(spec: ParamSpec) -> str:
  return f"lr{spec.lr_mult:.6g}_wd{spec.wd_mult:.6g}"


def make_optimizer(cfg, specs: Mapping[str, ParamSpec], schedule: optax.Schedule,
                   to_tree: Callable[[dict], Any]) -> optax.GradientTransformation:
  """Gradient clipping, then ``optax.partition`` over the trainable parameters, one group per multiplier pair.

  ``to_tree`` turns a flat ``{path: value}`` dict into the same structure as the trainable parameters.
  """
  trainable = {p: s for p, s in specs.items() if not s.freeze}
  groups = {}
  for spec in trainable.values():
    base, wd_first = _base(cfg)
    wd = float(cfg.weight_decay) * spec.wd_mult
    decay = [optax.add_decayed_weights(wd)] if wd else []
    lr_mult = spec.lr_mult
    scale = optax.scale_by_learning_rate(lambda step, m=lr_mult: schedule(step) * m)
    groups[group_label(spec)] = optax.chain(*(decay + [base] if wd_first else [base] + decay), scale)
  labels = to_tree({p: group_label(s) for p, s in trainable.items()})
  clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.get("grad_clip_norm") else []
  return optax.chain(*clip, optax.partition(groups, labels))


def rules_table(param_rules, specs: Mapping[str, ParamSpec], shapes: Mapping[str, tuple], *, lr: float,
                weight_decay: float) -> str:
  """The table printed at start: what each rule took and what it decided."""
  adapted = any(s.adapter for s in specs.values())
  rows = [("#", "regex", "tensors", "params", "lr", "wd", "frozen", "load") + (("lora",) if adapted else ())]
  for i, (regex, _) in enumerate(param_rules):
    taken = [p for p, s in specs.items() if s.rule == i and not s.adapter]
    adapters = [p for p, s in specs.items() if s.rule == i and s.adapter]
    loras = sorted({specs[p].lora.describe() for p in taken if specs[p].lora})
    lora_txt = (f"{','.join(loras)}: {len(adapters) // 2} adapters, "
                f"{sum(int(np.prod(shapes[p])) for p in adapters):,} params") if loras else "-"
    trained = [p for p in taken + adapters if not specs[p].freeze]   # frozen parameters have no lr or wd
    n = sum(int(np.prod(shapes[p])) for p in taken)
    lrs = sorted({lr * specs[p].lr_mult for p in trained})
    lr_txt = "-" if not lrs else (f"{lrs[0]:.3g}" if len(lrs) == 1 else f"{lrs[0]:.3g}..{lrs[-1]:.3g}")
    wds = sorted({weight_decay * specs[p].wd_mult for p in trained})
    wd_txt = "-" if not wds else ",".join(f"{w:.3g}" for w in wds)
    frozen = {specs[p].freeze for p in taken}
    load = {specs[p].load for p in taken}
    rows.append((str(i), regex, str(len(taken)), f"{n:,}", lr_txt, wd_txt,
                 "/".join(map(str, sorted(frozen))) or "-", "/".join(map(str, sorted(load))) or "-")
                + ((lora_txt,) if adapted else ()))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def count(flat: Mapping[str, Any]) -> int:
  return int(sum(int(np.prod(np.shape(v))) for v in flat.values()))

