"""``python -m transfer.plan``: what each device will hold when a config trains, from the compiler, before any run.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m transfer.plan \\
      --config configs/minilm_sst2.py --config.mesh.data=1 --config.mesh.fsdp=8 --config.model.remat=block

The trainer's own train step (``transfer.train.sharded_steps``: the same rules, optimizer, shardings and compiler
options) is compiled for ``config.mesh`` on abstract values: nothing is allocated, no data is read, no weights are
loaded (``model.pretrained`` only gives the architecture), so a 1B-parameter model can be planned for 8 devices on
a laptop by simulating them. The figures are XLA's ``memory_analysis`` of the partitioned program, per device:

- ``state``: parameters, optimizer state and the rest of the train state, under the sharding rules;
- ``arguments``, ``outputs``, ``aliased`` (the donated state, updated in place) and ``temporaries`` (activations
  kept for the backward pass, gradients, gathered parameters);
- ``peak`` = arguments + outputs - aliased + temporaries: what the step needs at once;
- ``flops``: the step's floating-point operations per device (``cost_analysis``), for utilisation estimates.

Simulated CPU devices plan for the device kind the mesh will run on only as far as XLA's CPU and TPU/GPU
compilers agree on what to keep live; layouts and fusion differ, so treat the figures as close estimates.
"""
from __future__ import annotations

import copy
import json
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transfer import config_check, models, optim, rules, sharding, tasks, train

IMAGE_RESOLUTION = 224   # when config.data.resolution is 'auto' (the trainer picks it from the images)


def task_of(config: ml_collections.ConfigDict) -> tasks.Task:
  """``config.task``; 'auto': causal LM for an ``lm_text`` dataset, else classification (no data is read)."""
  name = config.get("task", "auto")
  if name == "auto":
    name = "causal_lm" if config.data.name == "lm_text" else "classification"
  return tasks.TASKS[name](config)


def abstract_batch(config: ml_collections.ConfigDict, task: tasks.Task, rows: int) -> dict:
  """One training batch of ``rows`` as shapes and dtypes: the family's inputs (images at ``data.resolution``,
  tokens at ``data.max_length``) and the task's fields."""
  fam = models.family(config.model.name)
  if fam.inputs == "image":
    side = config.data.get("resolution", "auto")
    side = IMAGE_RESOLUTION if side in (None, "auto") else int(side)
    batch = {"image": jax.ShapeDtypeStruct((rows, side, side, 3), jnp.uint8)}
    length = None
  else:
    length = int(config.data.max_length)
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in fam.example_batch()}
  for field in task.batch_fields:
    shape = (rows, length) if field == "loss_mask" else (rows,)
    batch[field] = jax.ShapeDtypeStruct(shape, jnp.float32 if task.name == "regression" else jnp.int32)
  return batch


def plan(config: ml_collections.ConfigDict, *, num_outputs: int = 2) -> dict:
  """The per-device memory (bytes) and FLOPs of ``config``'s train step on ``config.mesh`` over this process's
  devices (see the module docstring). ``num_outputs``: the classifier head's width (no data is read)."""
  config = copy.deepcopy(config)
  config_check.validate(config)
  if models.family(config.model.name).inputs == "text":   # a Hugging Face-style family: its config.json's shapes
    config.model.architecture = config.model.get("architecture") or config.model.get("pretrained")
  config.model.pretrained = None
  task = task_of(config)
  model = models.with_adapters(task.build_model(config.model, types.SimpleNamespace(num_outputs=num_outputs)),
                               config.param_rules)
  example = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype)
             for k, v in abstract_batch(config, task, 1).items() if k not in task.batch_fields}
  variables = jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.PRNGKey(0), example)
  params = rules.flatten(variables["params"])
  batch_stats = variables.get("batch_stats", {})

  made = {}

  def initial_state(params, batch_stats):
    made["specs"], made["backbone_train"], made["schedule"], made["tx"], state = train.init_optimization(
        config, model, params, batch_stats, jax.random.PRNGKey(0), total_steps=1000, steps_per_epoch=100)
    return state

  state = jax.eval_shape(initial_state, params, batch_stats)
  frozen_stats = (optim.frozen_batch_stats(made["specs"], list(rules.flatten(state["batch_stats"])))
                  if made["backbone_train"] else frozenset())
  mesh = sharding.make_mesh(config.mesh)
  step, _, state_sharding, _ = train.sharded_steps(
      config, model, task, mesh, state, made["tx"], made["schedule"], backbone_train=made["backbone_train"],
      accum=int(config.get("grad_accum_steps", 1)), frozen_stats=frozen_stats)
  batch_size = int(config.batch_size)
  if batch_size % sharding.batch_ways(mesh):
    raise ValueError(f"config.batch_size={batch_size} must be divisible by the {sharding.batch_ways(mesh)} ways the "
                     f"batch is split (config.mesh data x fsdp: {sharding.describe(mesh)})")
  compiled = step.lower(state, abstract_batch(config, task, batch_size)).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "model": config.model.name,
      "mesh": dict(mesh.shape),
      "devices": mesh.size,
      "remat": config.model.get("remat", "none"),
      "dtype": config.model.get("dtype", "float32"),
      "batch_size": batch_size,
      "params": optim.count(params),
      "trainable_params": optim.count(rules.flatten(state["trainable"])),
      "state_bytes": sharding.per_device_bytes(state, state_sharding),
      "state_bytes_replicated": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)),
      "arguments": int(memory.argument_size_in_bytes),
      "outputs": int(memory.output_size_in_bytes),
      "aliased": int(memory.alias_size_in_bytes),
      "temporaries": int(memory.temp_size_in_bytes),
      "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
  }
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def main(argv=None) -> int:
  """Prints the plan as a table and, with ``--out``, writes it as JSON."""
  from absl import flags
  define = lambda: (flags.DEFINE_integer("num_outputs", 2, "the classifier head's width"),
                    flags.DEFINE_string("out", None, "also write the figures to this JSON file"))
  try:
    config, _ = train.command_line_config(sys.argv if argv is None else argv, define)
  except train.CommandLineError as e:
    print(f"error in the command line: {e}", file=sys.stderr)
    return 2
  if config is None:
    print("usage: python -m transfer.plan --config configs/NAME.py[:ARGS] [--config.mesh.fsdp=8 ...]", file=sys.stderr)
    return 2
  try:
    figures = plan(config, num_outputs=flags.FLAGS.num_outputs)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"
  print(f"{figures['model']}: {figures['params']:,} parameters ({figures['trainable_params']:,} trained), batch "
        f"{figures['batch_size']}, mesh {sharding.describe(sharding.make_mesh(config.mesh))}, remat "
        f"{figures['remat']}, {figures['dtype']}; per device:")
  for key in ("state", "arguments", "outputs", "aliased", "temporaries", "peak"):
    print(f"  {key:<12} {gib(figures[key + '_bytes'] if key == 'state' else figures[key])}")
  print(f"  {'flops':<12} {figures['flops']:.4g} per step")
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "w") as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
