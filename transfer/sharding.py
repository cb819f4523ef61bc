"""Where every array of the train state lives on the device mesh: ``config.mesh`` and ``config.sharding_rules``.

The mesh has three named axes (``MESH_AXES``): ``data`` (plain data parallelism: the batch is split, the state
replicated), ``fsdp`` (the batch is split over it as well, and each parameter is split over it too, gathered
just in time by the compiler: ZeRO-3 / fully sharded data parallelism) and ``tensor`` (the attention heads and
the MLP's hidden units of one layer split over devices: Megatron-style tensor parallelism).

``config.sharding_rules`` is one more ``(regex, value)`` list over parameter paths (``transfer.rules``: the
first rule whose regex matches the whole path decides). A value is

- ``'replicate'``: every device holds the whole parameter;
- ``'fsdp'``: the parameter's largest dimension that the ``fsdp`` axis size divides is split over ``fsdp``
  (replicated when no dimension is divisible, which the table at start shows; a no-op while ``fsdp`` is 1);
- ``'tensor'``: the family's tensor-parallel layout (``Family.tensor_parallel``: q/k/v and MLP-in kernels split
  over their output units, attention-out and MLP-out kernels over their input units, the other dimension over
  ``fsdp``) for the parameters the layout names, ``'fsdp'`` for the rest (embeddings, norms, the head);
- an explicit per-dimension spec, one entry per dimension: ``None``, an axis name, or a tuple of axis names,
  e.g. ``(None, 'tensor')``. Every named axis must exist, and must divide the dimension it splits.

Optimizer state follows its parameter (a moment is sharded as the parameter it belongs to), step counters and
keys are replicated, and BatchNorm statistics are replicated (they are small). The batch is split over ``data``
and ``fsdp`` together, so ``batch_size`` (per micro-batch) must be a multiple of their product.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transfer import rules as rules_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
NAMED_VALUES = ("replicate", "fsdp", "tensor")


# ----------------------------------------------------------------------------------------------------------------
# The mesh.

def mesh_shape(mesh_cfg: Mapping[str, Any], n_devices: int) -> dict[str, int]:
  """``config.mesh`` with its -1 resolved: ``{axis: size}`` in ``MESH_AXES`` order, multiplying to ``n_devices``."""
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axis {unknown} (the axes are {', '.join(MESH_AXES)})")
  sizes = {axis: mesh_cfg.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"config.mesh.{axis}={size!r} must be a positive int, or -1 for the remaining devices")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1 (the remaining devices), got {', '.join(free)}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if n_devices % fixed:
      raise ValueError(f"config.mesh: {_shown(sizes)} cannot fill {n_devices} devices: the fixed axes' product "
                       f"{fixed} does not divide {n_devices}")
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(f"config.mesh: {_shown(sizes)} multiplies to {math.prod(sizes.values())} devices, but there "
                     f"are {n_devices} (set one axis to -1 to take the remaining devices)")
  return sizes


def _shown(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence | None = None) -> Mesh:
  """The device mesh ``config.mesh`` describes over ``devices`` (default: all of them, every process's), laid out
  by ``jax.make_mesh`` so that the inner axes (tensor, then fsdp) sit on the closest devices of a TPU slice."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler (GSPMD) propagates shardings from the state's and the batch's; the models need no
  # sharding annotations of their own (jax.make_mesh's default, explicit axes, would ask every op for one).
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over ``data`` x ``fsdp``; replicated over ``tensor``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh (scalars, metrics, a frozen backbone's weights for extraction)."""
  return NamedSharding(mesh, P())


def batch_ways(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def describe(mesh: Mesh) -> str:
  return f"{_shown(dict(mesh.shape))} ({mesh.size} {mesh.devices.flat[0].platform} devices)"


# ----------------------------------------------------------------------------------------------------------------
# Parameters: one PartitionSpec each, from the rules.

def check_rules(sharding_rules) -> None:
  """Each rule's value is a named value or a per-dimension spec over known axes: the field's own shape, checked
  by config_check before anything runs (whether the specs fit the parameters and use the mesh is checked once
  both are known, in ``param_partition_specs``)."""
  compiled = rules_lib.compile_rules(sharding_rules, what="config.sharding_rules")
  for i, (pattern, value) in enumerate(compiled):
    where = f"config.sharding_rules[{i}] ({pattern.pattern!r})"
    if isinstance(value, str):
      if value not in NAMED_VALUES:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, NAMED_VALUES))} or a "
                         "per-dimension spec such as (None, 'tensor')")
    elif isinstance(value, (tuple, list)):
      for entry in value:
        for axis in _axes_of(entry, where):
          if axis not in MESH_AXES:
            raise ValueError(f"{where}: unknown mesh axis {axis!r} in {tuple(value)} (the axes are "
                             f"{', '.join(MESH_AXES)})")
    else:
      raise ValueError(f"{where}: {value!r} is not 'replicate', 'fsdp', 'tensor' or a per-dimension spec")


def _axes_of(entry, where: str) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
    return tuple(entry)
  raise ValueError(f"{where}: a dimension's entry must be None, an axis name or a tuple of axis names, "
                   f"got {entry!r}")


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """The largest dimension ``fsdp`` divides, split over 'fsdp' (the first such on ties); replicated if none."""
  if fsdp == 1:
    return P()
  candidates = [(size, -d) for d, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, neg_dim = max(candidates)
  return P(*[("fsdp" if d == -neg_dim else None) for d in range(len(shape))])


def param_partition_specs(sharding_rules, shapes: Mapping[str, tuple], mesh_axes: Mapping[str, int],
                          tensor_layout: Sequence[tuple[str, tuple]] = ()) -> dict[str, tuple[int, P]]:
  """``{path: (rule index, PartitionSpec)}`` for every parameter (flat paths); a path no rule covers, or a spec
  that does not fit a parameter (its length, or an axis size that does not divide the dimension), is an error
  naming the parameter, its shape and the mesh."""
  check_rules(sharding_rules)
  assigned = rules_lib.assign(sharding_rules, list(shapes), what="config.sharding_rules")
  layout = rules_lib.compile_rules(tensor_layout, what="the family's tensor_parallel layout")
  out = {}
  for path, (i, value) in assigned.items():
    shape = tuple(shapes[path])
    if value == "replicate":
      spec = P()
    elif value == "fsdp":
      spec = fsdp_spec(shape, mesh_axes["fsdp"])
    elif value == "tensor":
      _, dims = rules_lib.first_match(layout, path)
      spec = P(*dims) if dims is not None else fsdp_spec(shape, mesh_axes["fsdp"])
    else:
      spec = P(*[tuple(e) if isinstance(e, list) else e for e in value])
    out[path] = (i, _checked(spec, shape, path, i, mesh_axes))
  # An fsdp or tensor axis of more than one device that no parameter is split over would only hold copies.
  used = {a for _, spec in out.values() for e in spec for a in _axes_of(e, "")}
  for axis in ("fsdp", "tensor"):
    if mesh_axes.get(axis, 1) > 1 and axis not in used:
      why = ("the model family has no tensor-parallel layout, and no explicit spec names 'tensor'" if axis == "tensor"
             else "no rule gives 'fsdp' a parameter with a dimension it divides")
      raise ValueError(f"config.mesh.{axis}={mesh_axes[axis]} but no parameter is split over {axis!r} by "
                       f"config.sharding_rules ({why}): shard over it, or set config.mesh.{axis}=1")
  return out


def _checked(spec: P, shape: tuple, path: str, rule: int, mesh_axes: Mapping[str, int]) -> P:
  mesh_txt = _shown(mesh_axes)
  if len(spec) > len(shape):
    raise ValueError(f"config.sharding_rules[{rule}] gives {path} (shape {shape}) the spec {tuple(spec)}, which "
                     f"has {len(spec)} entries for {len(shape)} dimensions (mesh {mesh_txt})")
  for d, entry in enumerate(spec):
    axes = _axes_of(entry, f"config.sharding_rules[{rule}]")
    ways = math.prod(mesh_axes[a] for a in axes)
    if shape[d] % ways:
      raise ValueError(f"config.sharding_rules[{rule}] splits dimension {d} of {path} (shape {shape}) over "
                       f"{'x'.join(axes)} = {ways} devices, which does not divide {shape[d]} (mesh {mesh_txt})")
  return spec


# ----------------------------------------------------------------------------------------------------------------
# The whole train state.

def state_shardings(state: Mapping[str, Any], mesh: Mesh, param_specs: Mapping[str, P]) -> dict:
  """A tree of NamedShardings matching ``state`` (the trainer's dict): ``trainable`` and ``frozen`` by their
  paths' specs; in ``opt_state`` an array shaped like the parameter its tree path ends in (Adam's mu and nu under
  ``.../mu/backbone/...``) follows that parameter; everything else whole (counts, scalars, keys)."""
  whole = replicated(mesh)
  shapes = {p: tuple(np.shape(v)) for key in ("trainable", "frozen")
            for p, v in rules_lib.flatten(state.get(key) or {}).items()}

  def follow(key_path, leaf) -> NamedSharding:
    tail = []
    for k in reversed(key_path):   # the trailing dict keys spell the parameter's path
      if not isinstance(k, jax.tree_util.DictKey):
        break
      tail.append(str(k.key))
    path = "/".join(reversed(tail))
    same = path in param_specs and shapes.get(path) == tuple(np.shape(leaf))
    return NamedSharding(mesh, param_specs[path]) if same else whole

  out = {}
  for key, value in state.items():
    if key in ("trainable", "frozen", "opt_state"):
      out[key] = jax.tree_util.tree_map_with_path(follow, value)
    else:
      out[key] = jax.tree.map(lambda _: whole, value)
  return out


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` under ``shardings`` (the largest shard of each array)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(tuple(np.shape(leaf)))
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


# ----------------------------------------------------------------------------------------------------------------
# The table printed at start.

def sharding_table(sharding_rules, specs: Mapping[str, tuple[int, P]], shapes: Mapping[str, tuple],
                   mesh_axes: Mapping[str, int]) -> str:
  """One row per (rule, resulting spec): how many parameters, how many values, and one example path; the
  per-parameter listing goes to WORKDIR/shardings.txt (``listing``)."""
  groups: dict[tuple[int, P], list[str]] = {}
  for path, (i, spec) in specs.items():
    groups.setdefault((i, spec), []).append(path)
  rows = [("#", "regex", "spec", "tensors", "params", "per device", "e.g.")]
  for (i, spec), paths in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
    n = sum(int(np.prod(shapes[p])) for p in paths)
    ways = math.prod(math.prod(mesh_axes[a] for a in _axes_of(e, "")) for e in spec)
    rows.append((str(i), str(sharding_rules[i][0]), spec_text(spec), str(len(paths)), f"{n:,}",
                 "all" if ways == 1 else f"1/{ways}", sorted(paths)[0]))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def spec_text(spec: P) -> str:
  if not any(e is not None for e in spec):
    return "replicated"
  return "(" + ", ".join("-" if e is None else e if isinstance(e, str) else "x".join(e) for e in spec) + ")"


def listing(specs: Mapping[str, tuple[int, P]], shapes: Mapping[str, tuple]) -> str:
  return "".join(f"{path}  {tuple(shapes[path])}  rule {i}  {spec_text(spec)}\n"
                 for path, (i, spec) in sorted(specs.items()))
