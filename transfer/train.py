"""The trainer: ``python -m transfer.train --config configs/NAME.py[:ARGS] --workdir DIR [--config.FIELD=V]``
(several processes, one per host: the same command on each, plus ``--coordinator HOST:PORT --num_processes N
--process_id I`` unless the environment gives them; see ``transfer/distributed.py``).

Reads top to bottom: setup, data, model and pretrained weights, parameter rules and optimizer, devices and
steps, restore-or-start, the loop, results. Relaunching with the same workdir resumes from the last checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import re
import resource
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from transfer import (config_check, convert, data, distributed, hyper_rule, models, native, optim, rules, runs, sharding,
                      tasks)
from transfer import checkpoint as checkpoint_lib
from transfer import features as features_lib
from transfer import metrics as metrics_lib
from transfer import workdir_lock
from transfer.checkpoint import Checkpointer
from transfer.data import mixup
from transfer.models import layers
from transfer.models import lora


def log(msg: str) -> None:
  """Progress for the user: printed by process 0 (the only one, unless the launch has several)."""
  if distributed.is_main():
    print(msg, flush=True)


def _check_workdir(workdir: str) -> None:
  """Creates the workdir, checks that it can be written, and takes its lock (``transfer.workdir_lock``: one run per
  workdir; a second launch fails here, naming the run that holds it)."""
  error = None
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")   # per process: two launches cannot race on it
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    error = PermissionError(f"--workdir {workdir!r} cannot be written: {e.strerror}")
  if error is None and distributed.is_main():   # a multi-process run holds it on process 0
    try:
      workdir_lock.acquire(workdir, log)   # one run per workdir, until the end of the loop (or main's exit)
    except OSError as e:
      error = e
  distributed.fail_together(error)   # several processes: one's failure here stops all of them, each saying why


def _check_dropout_rng(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A run with checkpoints resumes with the dropout generator it started with (config.json written before this
  field existed: threefry); another one would draw other masks from the same step on."""
  directory, path = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "config.json")
  if not (os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory)) and os.path.exists(path)):
    return
  with open(path) as f:
    recorded = json.load(f).get("dropout_rng_impl", "threefry")
  if recorded != config.dropout_rng_impl:
    raise ValueError(f"config.dropout_rng_impl={config.dropout_rng_impl!r}: the run in --workdir {workdir} started "
                     f"with {recorded!r} ({path}); resume with --config.dropout_rng_impl={recorded}, or use a new "
                     f"workdir")


def init_variables(config: ml_collections.ConfigDict, num_outputs: int | None, example: dict, *, build=None):
  """(model, params as a flat dict, batch_stats, dropout rng): fresh init, then the pretrained checkpoint merged
  in wherever the ``load`` rules allow (strict diff: see ``transfer.convert.merge_pretrained``).

  ``example`` is a batch (one row is enough) that fixes the input shapes. ``build(config.model)`` makes the
  module (default: a classifier with ``num_outputs`` outputs). Reading the checkpoint first lets it settle the
  ``config.model`` fields it decides (a ViT's pooling and position grid) before the module is built."""
  source_name = f"config.model.pretrained={config.model.get('pretrained')!r}"
  if config.model.get("pretrained"):
    from transfer.pretrained import convert_checkpoint
    flat_pretrained = convert_checkpoint(config.model, source_name=source_name)
  model = models.with_adapters((build or (lambda cfg: models.build(cfg, num_outputs)))(config.model),
                               config.param_rules)
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  example = {k: v[:1] for k, v in example.items() if k in models.family(config.model.name).example_batch()}
  variables = jax.jit(lambda r: model.init(r, example, train=False))(init_rng)
  flat_vars = {k: np.asarray(v) for k, v in rules.flatten(variables).items()}
  if config.model.get("pretrained"):
    fam = models.family(config.model.name)
    flat_pretrained = fam.fit_checkpoint(flat_pretrained, {k: np.shape(v) for k, v in flat_vars.items()},
                                         source_name=source_name)
    if fam.upstream_head:   # the checkpoint's own task head (a decoder's LM head), when this model has none
      upstream = re.compile(fam.upstream_head)
      flat_pretrained = {k: v for k, v in flat_pretrained.items() if k in flat_vars or not upstream.fullmatch(k)}
    flat_vars, report = convert.merge_pretrained(flat_vars, flat_pretrained,
                                                 should_load=optim.load_decider(config.param_rules),
                                                 source_name=source_name)
    log(f"pretrained: loaded {len(report['loaded'])} tensors from {config.model.pretrained!r}; fresh: "
        f"{report['kept_init'] or 'none'}; checkpoint tensors not used: {len(report['dropped'])}")
  params = {k[len("params/"):]: v for k, v in flat_vars.items() if k.startswith("params/")}
  batch_stats = rules.unflatten({k[len("batch_stats/"):]: v for k, v in flat_vars.items()
                                 if k.startswith("batch_stats/")})
  return model, params, batch_stats, dropout_rng


def init_optimization(config: ml_collections.ConfigDict, model, params: dict, batch_stats, rng, *,
                      total_steps: int, steps_per_epoch: int, abstract_opt_state: bool = False):
  """(specs, backbone_train, schedule, tx, state): the rules' decisions, the partitioned optimizer, the start.

  ``abstract_opt_state``: the optimizer state as shapes only (``jax.eval_shape``), for ``place_state`` to make
  on the mesh; otherwise it is made here, on the default device."""
  specs = optim.param_specs(config.param_rules, list(params), layer_decay=config.get("layer_decay", 0.0),
                            layer_regexes=models.layer_regexes(model))
  trainable, frozen = optim.split_trainable(params, specs)
  if not trainable:
    raise ValueError("config.param_rules freeze every parameter: nothing to train")
  backbone_train = backbone_trains(config, trainable)
  schedule = optim.make_schedule(config.schedule, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, specs, schedule, rules.unflatten)
  trainable, frozen = rules.unflatten(trainable), rules.unflatten(frozen)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen,
           "batch_stats": batch_stats, "rng": rng,
           "opt_state": jax.eval_shape(tx.init, trainable) if abstract_opt_state else tx.init(trainable),
           "nonfinite_step": jnp.zeros((), jnp.int32)}   # see make_steps: the non-finite guard
  return specs, bool(backbone_train), schedule, tx, state


def backbone_trains(config: ml_collections.ConfigDict, trainable_paths) -> bool:
  """``config.model.backbone_mode``: 'train', 'inference' or 'auto' (= 'train' if a backbone parameter trains).

  LoRA adapters do not count: a backbone whose only trainable parameters are adapters stays in inference mode
  (BatchNorm keeps its running statistics, the encoder's own dropout and stochastic depth are off; the adapters'
  dropout is the regulariser). ``backbone_mode='train'`` gives batch statistics and dropout with adapters too."""
  mode = config.model.get("backbone_mode", "auto")
  if mode not in ("auto", "train", "inference"):
    raise ValueError(f"config.model.backbone_mode: {mode!r} is not 'auto', 'train' or 'inference'")
  if mode == "auto":
    return any(p.startswith("backbone/") and not lora.is_adapter(p) for p in trainable_paths)
  return mode == "train"


def use_feature_cache(config: ml_collections.ConfigDict, specs: dict) -> bool:
  """``config.feature_cache``: 'on', 'off' or 'auto' (= the backbone is fixed: every backbone parameter frozen and
  the backbone in inference mode). 'on' with a backbone that is not fixed is an error: the cache would be wrong."""
  choice = config.get("feature_cache", "auto")
  if choice not in ("auto", "on", "off"):
    raise ValueError(f"config.feature_cache: {choice!r} is not 'auto', 'on' or 'off'")
  trainable = [p for p, s in specs.items() if not s.freeze]
  fixed = not backbone_trains(config, trainable) and not any(p.startswith("backbone/") for p in trainable)
  if choice == "on" and not fixed:
    raise ValueError("config.feature_cache='on' needs a fixed backbone: every backbone/ parameter frozen by "
                     "config.param_rules (no LoRA adapters) and config.model.backbone_mode 'auto' or 'inference'")
  return fixed and choice != "off"


def cache_features(config, workdir: str, params: dict, batch_stats, splits: dict, batch_sharding, batch_size: int):
  """Extracts (or reloads) every split's features; returns the head-only model, its params and the feature
  datasets, by split name."""
  feats = features_lib.extract_or_reuse(config, workdir, params, batch_stats, splits, batch_sharding, batch_size)
  out = {split: data.ArrayDataset({"features": feats[split][0]}, ds.labels, ds.class_names, ds.name, task=ds.task)
         for split, ds in splits.items()}
  head = models.FeatureClassifier(num_classes=splits["train"].num_outputs, dropout=config.model.get("dropout", 0.0))
  head_params = {p: v for p, v in params.items() if not p.startswith("backbone/")}
  return head, head_params, out


def dropout_key(rng: jax.Array, impl: str) -> jax.Array:
  """The key the model's dropout draws from: ``rng`` itself (threefry), or an ``impl`` key seeded by its bits.
  'rbg' derives keys (Flax's per-layer fold_in) by threefry, cheap scalar work, and draws the masks with XLA's
  RngBitGenerator, which on CPU is a vectorised kernel where threefry's bits lower to rolled loops."""
  if impl == "threefry":
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=impl)


def make_steps(model, tx: optax.GradientTransformation, schedule: optax.Schedule, task: tasks.Task, *,
               backbone_train: bool, accum: int = 1, frozen_stats: frozenset = frozenset(),
               dropout_rng_impl: str = "rbg"):
  """(train_step, eval_step): pure functions of (state, batch) for the caller to jit with its shardings.

  The ``task`` gives the loss (``task.loss(outputs, batch)``) and the eval sums (``task.eval_outputs``); the
  model's outputs are cast to float32 first.

  ``state`` holds ``trainable`` and ``frozen`` params separately: only ``trainable`` is differentiated and frozen
  ones enter under ``stop_gradient``, so XLA drops every backward computation that only frozen weights need.
  ``frozen_stats``: flat ``batch_stats`` paths whose running averages the step keeps (``optim.frozen_batch_stats``:
  the statistics of frozen layers). ``dropout_rng_impl``: the generator of the dropout bits
  (``config.dropout_rng_impl``); the state's key stays threefry either way, so checkpoints do not depend on it.

  Non-finite guard: ``state['nonfinite_step']`` (0 while all is well) records the first step whose loss or
  gradient norm is not finite, and from then on the step leaves the state as it was. The check costs no host
  sync; the loop reads the flag where it syncs anyway (log rows, saves) and stops before a save.
  """

  def loss_fn(trainable, frozen, batch_stats, batch, rng):
    params = rules.unflatten({**rules.flatten(trainable), **rules.flatten(jax.lax.stop_gradient(frozen))})
    outputs, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                    backbone_train=backbone_train,
                                    rngs={"dropout": dropout_key(rng, dropout_rng_impl)},
                                    mutable=["batch_stats"] if backbone_train else [])
    return task.loss(outputs.astype(jnp.float32), batch), new_vars.get("batch_stats", batch_stats)

  def train_step(state, batch):
    """One optimizer step; with grad_accum_steps > 1 the batch is split into interleaved micro-batches."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(state["trainable"], state["frozen"], state["batch_stats"], batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, i_mb):
        loss_sum, grad_sum, bs = carry
        i, mb = i_mb
        (loss, bs), g = grad_fn(state["trainable"], state["frozen"], bs, mb, jax.random.fold_in(rng, i))
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, g), bs), None

      zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
      (loss, grads, batch_stats), _ = jax.lax.scan(body, (0.0, zeros, state["batch_stats"]),
                                                   (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    if frozen_stats:   # frozen layers keep their statistics (chosen per path at trace time)
      old, new = rules.flatten(state["batch_stats"]), rules.flatten(batch_stats)
      batch_stats = rules.unflatten({k: old[k] if k in frozen_stats else v for k, v in new.items()})
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_state = {**state, "trainable": optax.apply_updates(state["trainable"], updates), "opt_state": opt_state,
                 "batch_stats": batch_stats, "step": state["step"] + 1}
    # The guard: a non-finite step, or any step after one, changes nothing but the step count and the flag.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state["nonfinite_step"] == 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {**new_state, **{k: keep(new_state[k], state[k]) for k in ("trainable", "opt_state", "batch_stats")},
                 "nonfinite_step": jnp.where((state["nonfinite_step"] == 0) & ~ok, state["step"] + 1,
                                             state["nonfinite_step"])}
    return new_state, {"train/loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}

  def eval_step(state, batch):
    params = rules.unflatten({**rules.flatten(state["trainable"]), **rules.flatten(state["frozen"])})
    outputs = model.apply({"params": params, "batch_stats": state["batch_stats"]}, batch, train=False)
    return task.eval_outputs(outputs.astype(jnp.float32), batch)

  return train_step, eval_step


def sharded_steps(config: ml_collections.ConfigDict, model, task: tasks.Task, mesh, state: dict, tx, schedule, *,
                  backbone_train: bool, accum: int = 1, frozen_stats: frozenset = frozenset()):
  """(jitted train step, jitted eval step, the state's shardings, ``{param path: (rule, PartitionSpec)}``).

  ``state`` may be abstract (``jax.eval_shape``'s): ``transfer.plan`` compiles the same steps without allocating
  anything. The train step donates the state (updated in place); both steps take the model's compiler options
  (``models.compiler_options``); the batch is split over the mesh's data and fsdp axes."""
  flat = {**rules.flatten(state["trainable"]), **rules.flatten(state["frozen"])}
  shard_specs = sharding.param_partition_specs(config.sharding_rules, {p: tuple(np.shape(v)) for p, v in flat.items()},
                                               dict(mesh.shape), models.tensor_parallel_layout(model))
  state_sharding = sharding.state_shardings(state, mesh, {p: spec for p, (_, spec) in shard_specs.items()})
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  train_step, eval_step = make_steps(model, tx, schedule, task, backbone_train=backbone_train, accum=accum,
                                     frozen_stats=frozen_stats, dropout_rng_impl=config.dropout_rng_impl)
  if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:   # parameters split: keep activations split by rows
    train_step, eval_step = (_tracing_in(mesh, step) for step in (train_step, eval_step))
  options = models.compiler_options(config.model)
  p_train_step = jax.jit(train_step, in_shardings=(state_sharding, batch), out_shardings=(state_sharding, replicated),
                         donate_argnums=0, compiler_options=options)
  p_eval_step = jax.jit(eval_step, in_shardings=(state_sharding, batch), out_shardings=replicated,
                        compiler_options=options)
  return p_train_step, p_eval_step, state_sharding, shard_specs


def _tracing_in(mesh, step):
  """``step`` traced under ``layers.sharded_activations(mesh)``: the families pin their residual stream's rows
  to the mesh's batch axes (``layers.batch_sharded``)."""
  def traced(state, batch):
    with layers.sharded_activations(mesh):
      return step(state, batch)
  return traced


def place_state(state: dict, state_sharding: dict, tx: optax.GradientTransformation) -> dict:
  """The initial state on the mesh: host arrays go straight to their shards, and the optimizer state (shapes only,
  see ``init_optimization``) is made on the devices by a jit with its shardings as outputs, so no device ever
  holds a whole copy of a state that the rules split."""
  trainable = jax.device_put(state["trainable"], state_sharding["trainable"])
  opt_state = jax.jit(tx.init, out_shardings=state_sharding["opt_state"])(trainable)
  rest = {k: v for k, v in state.items() if k not in ("trainable", "opt_state")}
  return {**jax.device_put(rest, {k: state_sharding[k] for k in rest}), "trainable": trainable,
          "opt_state": opt_state}


# ================================================================================================================
# LoRA runs checkpoint what trains, cached-feature runs their head: the base is rebuilt from its source and checked
# against the digests recorded in WORKDIR/base.json (transfer/runs.py reads runs back the same way).
# ================================================================================================================
def is_lora_run(state) -> bool:
  return any(lora.is_adapter(p) for p in rules.flatten(state["trainable"]))


def checkpointed(state: dict, *, backbone_train: bool) -> dict:
  """What a checkpoint holds: the whole state, or for a LoRA run the trainable state only (adapters, head,
  optimizer, step, RNG; BatchNorm statistics too when the backbone trains them), a small fraction of the model."""
  if not is_lora_run(state):
    return state
  base = {"frozen"} | (set() if backbone_train else {"batch_stats"})
  return {k: v for k, v in state.items() if k not in base}


def base_digests(frozen: dict, batch_stats) -> dict[str, str]:
  """SHA-256 of each array of a base (nested frozen parameters; BatchNorm statistics when they stay fixed, else
  None), keyed ``frozen/...`` and ``batch_stats/...``."""
  base = {"frozen": frozen, **({} if batch_stats is None else {"batch_stats": batch_stats})}
  return checkpoint_lib.array_digests(distributed.to_host(base))


def _changed(recorded: dict[str, str], digests: dict[str, str]) -> list[str]:
  return sorted(p for p in set(recorded) | set(digests) if recorded.get(p) != digests.get(p))


def _read_base_record(workdir: str) -> dict:
  path = os.path.join(workdir, runs.BASE_FILE)
  try:
    with open(path) as f:
      recorded = json.load(f)
    return {"source": recorded.get("source"), "sha256": dict(recorded["sha256"])}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"--workdir {workdir}: this run's checkpoints do not hold its base model, and the record of "
                     f"the base they were trained on ({path}) cannot be read ({e}); start a new workdir") from None


def check_base(workdir: str, digests: dict[str, str], source: str, *, resumed: bool) -> None:
  """Records the base's digests for a new run (``WORKDIR/base.json``, written atomically); on resume, a base that
  differs from the recorded one is a ValueError naming the source and the arrays that changed."""
  path = os.path.join(workdir, runs.BASE_FILE)
  if not resumed:
    if not distributed.is_main():
      return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"source": source, "sha256": digests}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return
  recorded = _read_base_record(workdir)
  if differ := _changed(recorded["sha256"], digests):
    raise ValueError(f"--workdir {workdir}: the base model under this run's trained parameters changed: {source} "
                     f"now gives {len(differ)} of {len(recorded['sha256'])} arrays different from the base the "
                     f"checkpoints were trained on ({recorded['source']}; {path}), e.g. {', '.join(differ[:3])}. "
                     "Restore that base, or start a new workdir")


def rebuild_base(workdir: str, config: ml_collections.ConfigDict, trainable: dict) -> tuple[dict, dict]:
  """(frozen parameters, BatchNorm statistics), flat, of a run whose checkpoints hold ``trainable`` (flat) only:
  rebuilt as the run built them (its pretrained source, or the seeded init) and checked against base.json."""
  if config.get("task") == "causal_lm":
    build, num_outputs = models.build_lm, None
  else:
    build, num_outputs = None, int(np.shape(trainable["head/bias"])[0])
  _, params, batch_stats, _ = init_variables(config, num_outputs, models.example_batch(config.model.name),
                                             build=build)
  frozen = {p: v for p, v in params.items() if p not in trainable}
  recorded = _read_base_record(workdir)["sha256"]
  stats_recorded = any(k.startswith("batch_stats/") for k in recorded)
  digests = base_digests(rules.unflatten(frozen), batch_stats if stats_recorded else None)
  if differ := _changed(recorded, digests):
    raise ValueError(f"--workdir {workdir}: the base model under this run's trained parameters changed since it "
                     f"was trained: {len(differ)} arrays differ from {os.path.join(workdir, runs.BASE_FILE)}, e.g. "
                     f"{', '.join(differ[:3])}")
  return frozen, rules.flatten(batch_stats) if stats_recorded else {}


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not distributed.is_main():
    return
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the job ``config`` describes in ``workdir``; returns the contents of results.json."""
  t_start = time.time()
  # ==============================================================================================================
  # Setup: the config checked whole (transfer/config_check.py) before anything is read, compiled or written; the
  # workdir. Fields left at 'auto' are filled in below (transfer/hyper_rule.py), on a copy, and config.json is
  # written again with the picks.
  # ==============================================================================================================
  config_check.validate(config)
  _check_workdir(workdir)
  _check_dropout_rng(config, workdir)
  # Several processes (transfer/distributed.py): each runs this same program on its own devices; all must hold
  # the same config, and every check above has passed everywhere before process 0 writes.
  distributed.agree("the config", config.to_json_best_effort(sort_keys=True))
  distributed.barrier("transfer.train: setup checked")
  config = copy.deepcopy(config)
  save_config(config, workdir)

  # ==============================================================================================================
  # Data and task (transfer/tasks: the loss, eval metrics and best metric).
  # ==============================================================================================================
  if data.is_image_source(config.data.name):   # 'auto' (the default) by the images' size, printed with its reason
    hyper_rule.apply(config, "data.resolution",
                     lambda: hyper_rule.resolution(data.typical_image_side(config.data)), log)
    log(f"data: images at {config.data.resolution} px")
  train_ds, eval_ds = data.build(config.data, config.model, config.get("task", "auto"))
  task = tasks.resolve(config, train_ds)
  val_ds = None   # model selection's split, carved from train (config.data.val_fraction); eval is measured once
  if config.data.get("val_fraction"):
    train_ds, val_ds = data.split_validation(train_ds, float(config.data.val_fraction), int(config.data.split_seed))
  config.task = task.name   # config.json says the task the run learnt, not 'auto'
  if distributed.is_main():
    runs.write_labels(workdir, task.name, getattr(train_ds, "class_names", None))
  batch_size, accum = int(config.batch_size), int(config.get("grad_accum_steps", 1))
  if batch_size > len(train_ds):
    raise ValueError(f"config.batch_size={batch_size} is larger than the training set {train_ds.name} "
                     f"({len(train_ds)} examples): lower it, or use more data")
  if batch_size % accum:
    raise ValueError(f"config.batch_size={batch_size} is not divisible by config.grad_accum_steps={accum}")
  steps_per_epoch = max(1, len(train_ds) // batch_size)
  hyper_rule.apply(config, "total_steps", lambda: hyper_rule.total_steps(len(train_ds)), log)
  total_steps = optim.steps_of(config, "total", steps_per_epoch)
  if not total_steps:
    raise ValueError("config: set total_steps or total_epochs (> 0)")
  hyper_rule.apply(config, "schedule.warmup_steps", lambda: hyper_rule.warmup_steps(total_steps), log)
  val_note = f", validation {val_ds.name} {len(val_ds)}" if val_ds is not None else ""
  log(f"data: train {train_ds.name} {len(train_ds)} examples{val_note}, eval {eval_ds.name} {len(eval_ds)}; task "
      f"{task.name}, {task.describe(train_ds)}; {total_steps} steps of batch {batch_size} "
      f"({total_steps / steps_per_epoch:.1f} epochs)")

  # ==============================================================================================================
  # Model and pretrained weights.
  # ==============================================================================================================
  example = train_ds.train_batch(0, 1, 0)
  model, params, batch_stats, dropout_rng = init_variables(config, train_ds.num_outputs, example,
                                                           build=lambda cfg: task.build_model(cfg, train_ds))

  # ==============================================================================================================
  # Devices (transfer/sharding.py): the mesh, each parameter's sharding by config.sharding_rules, the batch split
  # over the data and fsdp axes. Everything is checked here, before anything compiles. With several processes the
  # mesh spans every process's devices; each process puts its own rows of the (same) global batch on its own.
  # ==============================================================================================================
  mesh = sharding.make_mesh(config.mesh)
  sharded = sharding.batch_sharding(mesh)
  n_dev, ways = mesh.size, sharding.batch_ways(mesh)
  eval_batch_size = int(config.eval_batch_size)
  for field, size in (("batch_size", batch_size // accum), ("eval_batch_size", eval_batch_size)):
    if size % ways:
      raise ValueError(f"config.{field} (per micro-batch {size}) must be divisible by the {ways} ways the batch is "
                       f"split (config.mesh data x fsdp: {sharding.describe(mesh)})")
  log(f"mesh: {sharding.describe(mesh)}")
  # bf16 matmuls on the MKL extension (transfer/native: AMX tiles) or through XLA; the steps traced below follow it.
  native.configure(config.model.get("bf16_matmul", "auto"), devices=n_dev)

  # ==============================================================================================================
  # Parameter rules: each parameter's lr, wd, freezing and loading (transfer.optim.param_specs), shown as a table.
  # ==============================================================================================================
  specs = optim.param_specs(config.param_rules, list(params), layer_decay=config.get("layer_decay", 0.0),
                            layer_regexes=models.layer_regexes(model))
  log("parameter rules (first match wins):\n" + optim.rules_table(
      config.param_rules, specs, {p: np.shape(v) for p, v in params.items()}, lr=config.schedule.lr,
      weight_decay=config.optimizer.weight_decay))

  # ==============================================================================================================
  # Feature cache: a frozen backbone in inference mode runs once over the data; the head trains on its features.
  # ==============================================================================================================
  cache, images = use_feature_cache(config, specs), "image" in example
  hyper_rule.apply(config, "mixup", lambda: hyper_rule.mixup(len(train_ds), images=images and task.mixes_labels,
                                                              features_cached=cache), log)
  mixup_alpha = float(config.get("mixup", 0.0))
  if mixup_alpha and (not task.mixes_labels or not images or cache):
    raise ValueError(f"config.mixup={mixup_alpha} blends images and their class labels, but " + (
        f"the {task.name} task has no class labels to blend" if not task.mixes_labels else
        "the inputs are not images" if not images else
        "the frozen backbone's features are cached (one per image): set config.feature_cache='off' to run the "
        "backbone on blended images, or config.mixup=0"))
  cached_backbone_params, cached_base = 0, {}
  if cache:
    cached_base = base_digests(rules.unflatten({p: v for p, v in params.items() if p.startswith("backbone/")}),
                               batch_stats)
    cached_backbone_params = optim.count({p: v for p, v in params.items() if p.startswith("backbone/")})
    splits = {"train": train_ds, "eval": eval_ds, **({"val": val_ds} if val_ds is not None else {})}
    model, params, splits = cache_features(config, workdir, params, batch_stats, splits, sharded, eval_batch_size)
    batch_stats, train_ds, eval_ds, val_ds = {}, splits["train"], splits["eval"], splits.get("val")

  # ==============================================================================================================
  # The partitioned optimizer and the initial train state.
  # ==============================================================================================================
  specs, backbone_train, schedule, tx, state = init_optimization(config, model, params, batch_stats, dropout_rng,
                                                                 total_steps=total_steps,
                                                                 steps_per_epoch=steps_per_epoch,
                                                                 abstract_opt_state=True)
  stats_paths = list(rules.flatten(state["batch_stats"]))
  frozen_stats = optim.frozen_batch_stats(specs, stats_paths) if backbone_train else frozenset()
  mode_note = f"; backbone in {'training' if backbone_train else 'inference'} mode"
  if frozen_stats:
    mode_note += f"; {len(frozen_stats)} of {len(stats_paths)} BatchNorm statistics frozen with their layers"
  if cached_backbone_params:
    mode_note = f" + {cached_backbone_params:,} frozen in the backbone, whose features are cached"
  log(f"trainable {optim.count(rules.flatten(state['trainable'])):,} / frozen "
      f"{optim.count(rules.flatten(state['frozen'])):,} parameters{mode_note}")

  # ==============================================================================================================
  # Shardings and the jitted steps: each parameter's sharding by config.sharding_rules (shown as a table when a
  # parameter is split), its optimizer state's alike, the rest replicated.
  # ==============================================================================================================
  p_train_step, p_eval_step, state_sharding, shard_specs = sharded_steps(
      config, model, task, mesh, state, tx, schedule, backbone_train=backbone_train, accum=accum,
      frozen_stats=frozen_stats)
  if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
    param_shapes = {p: tuple(np.shape(v)) for p, v in params.items()}
    log("sharding rules (first match wins; every parameter in WORKDIR/shardings.txt):\n" + sharding.sharding_table(
        config.sharding_rules, shard_specs, param_shapes, dict(mesh.shape)))
    if distributed.is_main():
      with open(os.path.join(workdir, "shardings.txt"), "w") as f:
        f.write(sharding.listing(shard_specs, param_shapes))

  def evaluate(state, dataset, split: str = "eval") -> dict:
    """The task's metrics over every example of ``dataset`` once (the last batch padded and masked), named
    ``eval/...`` or, for the validation split, ``val/...``."""
    sums, rows = {}, {}
    n_batches = -(-len(dataset) // eval_batch_size)
    for batch in tqdm(dataset.eval_batches(eval_batch_size), total=n_batches, desc=split, leave=False,
                      dynamic_ncols=True, disable=distributed.progress_disabled()):
      batch_sums, batch_rows = jax.device_get(p_eval_step(state, jax.device_put(batch, sharded)))
      for k, v in batch_sums.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      for k, v in batch_rows.items():
        rows.setdefault(k, []).append(np.asarray(v)[batch["mask"] > 0])
    named = task.metrics(sums, {k: np.concatenate(v) for k, v in rows.items()}, dataset)
    return {f"{split}/{k.split('/', 1)[1]}": v for k, v in named.items()}

  # Evaluations during training measure the validation split when there is one (the best checkpoint is chosen on
  # it); the eval split is then measured once, after the loop, at the chosen checkpoint.
  select_split, select_ds = ("val", val_ds) if val_ds is not None else ("eval", eval_ds)

  # ==============================================================================================================
  # Restore the last checkpoint, or start.
  # ==============================================================================================================
  state = place_state(state, state_sharding, tx)
  ckpt_cfg = config.checkpoint
  best_metric, best_mode = ckpt_cfg.get("best_metric"), ckpt_cfg.get("best_mode", "auto")
  task_metric = "val/" + task.best_metric.split("/", 1)[1]   # the task's metric, on the validation split
  if best_metric == "auto":   # choose on validation only (config_check refuses eval/... metrics)
    best_metric = task_metric if val_ds is not None else None
  if best_mode == "auto":   # the task's direction for its metric; lower is better for losses and errors
    best_mode = (task.best_mode if best_metric == task_metric else
                 "min" if best_metric and best_metric.rsplit("/", 1)[-1] in ("loss", "perplexity", "mse") else "max")
  ckpt_cfg.best_metric, ckpt_cfg.best_mode = best_metric, best_mode   # resolved, for config.json's readers
  save_config(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=ckpt_cfg.keep_last,
                      best_metric=best_metric, best_mode=best_mode, log=log)
  # The newest checkpoint that reads back intact and finite (damaged ones are moved to checkpoints_damaged/); a
  # saved layout that differs from this config's is a ValueError.
  start_step, restored = ckpt.restore_latest(checkpointed(state, backbone_train=backbone_train))
  base_source = (f"config.model.pretrained={config.model.pretrained!r}" if config.model.get("pretrained") else
                 f"the seeded init (config.seed={config.seed})")
  if is_lora_run(state):
    check_base(workdir, base_digests(state["frozen"], None if backbone_train else state["batch_stats"]),
               base_source, resumed=bool(start_step))
  elif cached_base:
    check_base(workdir, cached_base, base_source, resumed=bool(start_step))
  state = {**state, **restored}
  if start_step:
    log(f"resumed from {workdir}/checkpoints step {start_step}")
  writer = (metrics_lib.MetricWriter(workdir, resume_step=start_step, log=log) if distributed.is_main() else
            metrics_lib.NoWriter())
  nan_at = config.get("fault", {}).get("nan_at_step")

  # ==============================================================================================================
  # The loop.
  # ==============================================================================================================
  log_every, eval_every = int(config.log_every), int(config.get("eval_every") or 0)
  ckpt_every = int(ckpt_cfg.every_steps or 0)
  kill_at = config.get("fault", {}).get("kill_at_step")
  compile_seconds, timed_examples, timed_seconds = 0.0, 0, 0.0
  metrics = {}
  bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
             disable=distributed.progress_disabled())
  t_log, examples_since_log = time.time(), 0
  for step in range(start_step + 1, total_steps + 1):
    batch = train_ds.train_batch(step - 1, batch_size, seed=int(config.seed))
    if mixup_alpha:
      batch = mixup.mix(batch, mixup_alpha, train_ds.num_outputs, mixup.generator(int(config.seed), step - 1))
    if nan_at and step == int(nan_at):   # fault injection: an all-NaN image batch (float: one more compile)
      batch = {**batch, "image": np.full(np.shape(batch["image"]), np.nan, np.float32)}
    t0 = time.time()
    state, step_metrics = p_train_step(state, jax.device_put(batch, sharded))
    if step == start_step + 1:  # the first step compiles: keep it out of the throughput figures
      jax.block_until_ready(state)
      compile_seconds = time.time() - t0
      t_log, examples_since_log = time.time(), 0
    else:
      examples_since_log += batch_size
    bar.update(1)
    eval_metrics = (evaluate(state, select_ds, select_split)
                    if (eval_every and step % eval_every == 0) or step == total_steps else None)
    if step % log_every == 0 or step == total_steps or eval_metrics:
      row = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      elapsed = time.time() - t_log
      if examples_since_log:
        row["examples_per_sec"] = examples_since_log / elapsed
        timed_examples, timed_seconds = timed_examples + examples_since_log, timed_seconds + elapsed
      ckpt.check_finite(step, state, row)   # NonFiniteError, with a report, if a step was not finite
      row.update(eval_metrics or {})
      writer.write(step, row)
      metrics = {**metrics, **row}
      shown = {k: f"{v:.4g}" for k, v in row.items()
               if k in ("train/loss", "val/accuracy", "eval/accuracy", "examples_per_sec")}
      bar.set_postfix(shown)
      if bar.disable and distributed.is_main():   # no terminal (a log file, a batch job): the same progress as lines
        log(f"step {step}/{total_steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
      t_log, examples_since_log = time.time(), 0
    if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
      ckpt.save(step, checkpointed(state, backbone_train=backbone_train), metrics=eval_metrics)
    if kill_at and step == int(kill_at):  # fault injection: die like a preempted job, even mid-save
      distributed.barrier("transfer.train: fault.kill_at_step")   # every process of the job at once
      os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  writer.close()   # metrics.jsonl complete: the best checkpoint is found in it
  ckpt.wait()   # CheckpointWriteError if the last save failed

  # ==============================================================================================================
  # Model selection and the one measurement of the eval split: with a validation split, the checkpoint best by
  # checkpoint.best_metric (on validation) is restored and the eval split measured there; without one, the last
  # step's evaluation of the eval split is the result.
  # ==============================================================================================================
  selected_step, selected = total_steps, {}
  if val_ds is not None:
    if best_metric:   # read from metrics.jsonl by process 0, restored by all
      best = runs.checkpoint_step(workdir, "best") if distributed.is_main() else 0
      selected_step = int(distributed.broadcast(np.int64(best)))
      if selected_step != total_steps:
        like = checkpointed(state, backbone_train=backbone_train)
        state = {**state, **ckpt.restore_verified(selected_step, like)}
    selected = next((r for r in (metrics_lib.read(workdir) if distributed.is_main() else [])
                     if r["step"] == selected_step and any(k.startswith("val/") for k in r)), {})
    final = evaluate(state, eval_ds)
    how = f"best {best_metric} ({best_mode})" if best_metric else "the last step"
    log(f"eval split measured once, at step {selected_step} ({how} on the validation split): " +
        ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
  elif start_step >= total_steps:  # relaunched after completion: report the final checkpoint again
    final = evaluate(state, eval_ds)
  else:
    final = metrics
  ckpt.close()

  # ==============================================================================================================
  # Results.
  # ==============================================================================================================
  results = {
      "step": total_steps,
      **{k: v for k, v in final.items() if k.startswith("eval/")},
      **{k: v for k, v in selected.items() if k.startswith("val/")},
      "selected_step": selected_step,
      "wall_seconds": time.time() - t_start,
      "compile_seconds": compile_seconds,
      "train_examples_per_sec": timed_examples / timed_seconds if timed_seconds else None,
      "trainable_params": optim.count(rules.flatten(state["trainable"])),
      "frozen_params": optim.count(rules.flatten(state["frozen"])) + cached_backbone_params,
      "feature_cache": bool(cached_backbone_params),
      "optimizer_state_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(state["opt_state"])),
      "checkpoint_bytes": _directory_bytes(os.path.join(workdir, "checkpoints", str(total_steps))),
      "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,   # Linux: KiB
      "devices": n_dev,
      "processes": distributed.process_count(),
  }
  if distributed.is_main():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  workdir_lock.release(workdir)
  log("results: " + json.dumps(results))
  return results


# ================================================================================================================
# Command line.
# ================================================================================================================
class CommandLineError(ValueError):
  """An unknown flag or field, a value of the wrong type, a config file that does not load."""


def command_line_config(argv: list[str], define_flags=lambda: None):
  """``(config, overridden field paths)`` from ``--config configs/NAME.py[:ARGS]`` and its ``--config.FIELD=V``
  overrides (``--config.FIELD=None`` clears a field, ``--config.FIELD=[...]`` sets a list); ``(None, [])`` without ``--config``. ``define_flags``
  defines the command's other absl flags first. The one parser of config command lines (``transfer.train``,
  ``transfer.plan``); raises ``CommandLineError`` with a message for the user."""
  from absl import flags
  from ml_collections import config_flags
  try:
    argv, values = config_check.split_value_overrides(argv)   # None and lists: ml_collections parses neither
  except ValueError as e:
    raise CommandLineError(str(e)) from None
  config_flag = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARGS]", lock_config=True,
                                                sys_argv=argv)
  define_flags()
  try:
    flags.FLAGS(argv)
    if config_flag.value is not None:
      config_flag.value.keys()   # a config file that failed to load raises its (deferred) error here
      config_check.set_values(config_flag.value, values)
  except (AttributeError, KeyError, ValueError, OSError, flags.Error) as e:  # misspelt --config.X overrides too
    msg = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    if isinstance(e, (AttributeError, KeyError)):   # ml_collections names only the field (and maybe a close one)
      field, _, rest = msg.partition("\n")
      msg = f"the config has no field {field.strip(chr(39))!r} (all fields: transfer/config_base.py)\n{rest}".strip()
    raise CommandLineError(msg) from None
  if config_flag.value is None:
    return None, []
  return config_flag.value, [*config_flags.get_override_values(flags.FLAGS["config"]), *(p for p, _ in values)]


def main(argv=None) -> int:
  """``python -m transfer.train``. What the user sees when a run stops, by cause:

  - a bad command line (an unknown flag or field, a value of the wrong type, a config file that does not load):
    ``error in the command line: ...``, exit 2, before any work;
  - a bad config value or input: ``error: ...`` naming the field, file (and line) or step, exit 1. The whole config
    is validated first (``transfer.config_check.validate``: every bad field at once, before any data is read or
    anything compiled); later errors of this kind are ValueError (data, rules, checkpoints that do not fit),
    OSError (missing or unreadable files, a full disk, a workdir another run holds) and FloatingPointError (a
    non-finite loss or gradient norm: stopped before any save, with the last good checkpoint named);
  - Ctrl-C (KeyboardInterrupt): one line saying that relaunching resumes from the last checkpoint, exit 130;
  - any other exception is a bug: its full traceback (exit 1), which is what a bug report needs.

  ``--config.FIELD=None`` clears a field, and a length the command line gives (total_steps or total_epochs,
  schedule.warmup_steps or warmup_epochs) replaces the config file's, with a note (``transfer.config_check``)."""
  from absl import flags

  def define():
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go (resumes if any)")
    # A multi-process launch (transfer/distributed.py): every process gets the same command line but its own
    # --process_id; a TPU pod slice or a SLURM job with several tasks is recognised without them.
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process run")
    flags.DEFINE_integer("num_processes", None, "how many processes the run has (one per host)")
    flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
  try:
    config, overrides = command_line_config(sys.argv if argv is None else argv, define)
  except CommandLineError as e:
    print(f"error in the command line: {e}", file=sys.stderr)
    return 2
  if config is None or not flags.FLAGS.workdir:
    print("usage: python -m transfer.train --config configs/NAME.py --workdir DIR", file=sys.stderr)
    return 2
  try:
    launch = distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if distributed.process_count() > 1:
      log(f"launch: {launch}")
    config_check.resolve_lengths(config, overrides, log)
    config_check.validate(config)
    train(config, flags.FLAGS.workdir)
  except KeyboardInterrupt:
    print("interrupted: relaunch with the same --workdir to resume from its last checkpoint", file=sys.stderr)
    return 130
  except (ValueError, OSError, FloatingPointError, distributed.LaunchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:   # however the run stops: the save in flight completes, then the workdir lock is released
    checkpoint_lib.close_all()
    workdir_lock.release_all()
  return 0


if __name__ == "__main__":
  sys.exit(main())
