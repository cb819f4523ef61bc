"""The trainer: ``python -m transfer.train --config configs/NAME.py[:ARGS] --workdir DIR [--config.FIELD=V]``.

Reads top to bottom: setup, data, model and pretrained weights, parameter rules and optimizer, devices and
steps, restore-or-start, the loop, results. Relaunching with the same workdir resumes from the last checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from transfer import convert, data, hyper_rule, models, optim, rules
from transfer import features as features_lib
from transfer import metrics as metrics_lib
from transfer.checkpoint import Checkpointer
from transfer.data import mixup
from transfer.models import vit


def log(msg: str) -> None:
  print(msg, flush=True)


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir {workdir!r} cannot be written: {e.strerror}") from None


def init_variables(config: ml_collections.ConfigDict, num_classes: int, example: dict):
  """(model, params as a flat dict, batch_stats, dropout rng): fresh init, then the pretrained checkpoint merged
  in wherever the ``load`` rules allow (strict diff: see ``transfer.convert.merge_pretrained``).

  ``example`` is a batch (one row is enough) that fixes the input shapes."""
  vit_model = models.family(config.model.name) == "vit"
  if config.model.get("pretrained"):
    from transfer.pretrained import load_pretrained
    loaded, pretrained = load_pretrained(config.model.pretrained, model=config.model.name)
    flat_pretrained = rules.flatten(pretrained)
    if vit_model:
      if loaded.backbone.pooling != config.model.get("pooling", "cls"):
        raise ValueError(f"config.model.pooling={config.model.get('pooling')!r}, but config.model.pretrained="
                         f"{config.model.pretrained!r} " + (
                             "has a class token: set config.model.pooling='cls'" if loaded.backbone.pooling == "cls"
                             else "has no class token (it was trained with mean pooling): set "
                                  "config.model.pooling='mean'"))
      if config.model.get("posemb_grid") is None:
        # The table stays at the checkpoint's grid; each call resamples it to the input's, once.
        config.model.posemb_grid = loaded.backbone.posemb_grid[0]
  model = models.build(config.model, num_classes)
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  example = {k: v[:1] for k, v in example.items() if k not in ("label", "mask")}
  variables = jax.jit(lambda r: model.init(r, example, train=False))(init_rng)
  flat_vars = {k: np.asarray(v) for k, v in rules.flatten(variables).items()}
  if config.model.get("pretrained"):
    if vit_model:   # a config that sets another grid: the checkpoint's table resampled to it at load
      flat_pretrained = vit.fit_checkpoint(flat_pretrained, {k: np.shape(v) for k, v in flat_vars.items()},
                                           source_name=f"config.model.pretrained={config.model.pretrained!r}")
    flat_vars, report = convert.merge_pretrained(
        flat_vars, flat_pretrained, should_load=optim.load_decider(config.param_rules),
        source_name=f"config.model.pretrained={config.model.pretrained!r}")
    log(f"pretrained: loaded {len(report['loaded'])} tensors from {config.model.pretrained!r}; fresh: "
        f"{report['kept_init'] or 'none'}; checkpoint tensors not used: {len(report['dropped'])}")
  params = {k[len("params/"):]: v for k, v in flat_vars.items() if k.startswith("params/")}
  batch_stats = rules.unflatten({k[len("batch_stats/"):]: v for k, v in flat_vars.items()
                                 if k.startswith("batch_stats/")})
  return model, params, batch_stats, dropout_rng


def init_optimization(config: ml_collections.ConfigDict, model, params: dict, batch_stats, rng, *,
                      total_steps: int, steps_per_epoch: int):
  """(specs, backbone_train, schedule, tx, state): the rules' decisions, the partitioned optimizer, the start."""
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
           "batch_stats": batch_stats, "opt_state": tx.init(trainable), "rng": rng}
  return specs, bool(backbone_train), schedule, tx, state


def backbone_trains(config: ml_collections.ConfigDict, trainable_paths) -> bool:
  """``config.model.backbone_mode``: 'train', 'inference' or 'auto' (= 'train' if a backbone parameter trains)."""
  mode = config.model.get("backbone_mode", "auto")
  if mode not in ("auto", "train", "inference"):
    raise ValueError(f"config.model.backbone_mode: {mode!r} is not 'auto', 'train' or 'inference'")
  if mode == "auto":
    return any(p.startswith("backbone/") for p in trainable_paths)
  return mode == "train"


def use_feature_cache(config: ml_collections.ConfigDict, specs: dict) -> bool:
  """``config.feature_cache``: 'on', 'off' or 'auto' (= the backbone is fixed: every backbone parameter frozen and
  the backbone in inference mode). 'on' with a backbone that is not fixed is an error: the cache would be wrong."""
  choice = config.get("feature_cache", "auto")
  if choice not in ("auto", "on", "off"):
    raise ValueError(f"config.feature_cache: {choice!r} is not 'auto', 'on' or 'off'")
  fixed = not backbone_trains(config, [p for p, s in specs.items() if not s.freeze])
  if choice == "on" and not fixed:
    raise ValueError("config.feature_cache='on' needs a fixed backbone: every backbone/ parameter frozen by "
                     "config.param_rules and config.model.backbone_mode 'auto' or 'inference'")
  return fixed and choice != "off"


def cache_features(config, workdir: str, model, params: dict, batch_stats, train_ds, eval_ds, sharding,
                   batch_size: int):
  """Extracts (or reloads) both splits' features; returns the head-only model, params and datasets."""
  feats = features_lib.extract_or_reuse(config, workdir, params, batch_stats, {"train": train_ds, "eval": eval_ds},
                                        sharding, batch_size)
  out = [data.ArrayDataset({"features": feats[split][0]}, ds.labels, ds.class_names, ds.name)
         for split, ds in (("train", train_ds), ("eval", eval_ds))]
  head = models.FeatureClassifier(num_classes=train_ds.num_outputs, dropout=config.model.get("dropout", 0.0))
  head_params = {p: v for p, v in params.items() if not p.startswith("backbone/")}
  return head, head_params, {}, out[0], out[1]


def make_steps(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *, num_classes: int,
               backbone_train: bool, accum: int = 1, smoothing: float = 0.0, regression: bool = False,
               frozen_stats: frozenset = frozenset()):
  """(train_step, eval_step): pure functions of (state, batch) for the caller to jit with its shardings.

  Classification: softmax cross-entropy (``smoothing``: label smoothing) against ``label``: (B,) class ids, or
  (B, num_classes) soft targets (mixup), used as they are. ``regression``: one output, mean squared error against
  float labels; the eval step then also returns its predictions.

  ``state`` holds ``trainable`` and ``frozen`` params separately: only ``trainable`` is differentiated and frozen
  ones enter under ``stop_gradient``, so XLA drops every backward computation that only frozen weights need.
  ``frozen_stats``: flat ``batch_stats`` paths whose running averages the step keeps (``optim.frozen_batch_stats``:
  the statistics of frozen layers).
  """

  def loss_fn(trainable, frozen, batch_stats, batch, rng):
    params = rules.unflatten({**rules.flatten(trainable), **rules.flatten(jax.lax.stop_gradient(frozen))})
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                   backbone_train=backbone_train, rngs={"dropout": rng},
                                   mutable=["batch_stats"] if backbone_train else [])
    logits = logits.astype(jnp.float32)
    if regression:
      loss = jnp.mean((logits[:, 0] - batch["label"]) ** 2)
    elif batch["label"].ndim == 2:   # soft targets
      loss = optax.softmax_cross_entropy(logits, optax.smooth_labels(batch["label"], smoothing)).mean()
    else:
      targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, new_vars.get("batch_stats", batch_stats)

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
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_state = {**state, "trainable": optax.apply_updates(state["trainable"], updates), "opt_state": opt_state,
                 "batch_stats": batch_stats, "step": state["step"] + 1}
    return new_state, {"train/loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}

  def eval_step(state, batch):
    params = rules.unflatten({**rules.flatten(state["trainable"]), **rules.flatten(state["frozen"])})
    logits = model.apply({"params": params, "batch_stats": state["batch_stats"]}, batch,
                         train=False).astype(jnp.float32)
    if regression:  # correlations need every prediction: the host gathers them
      loss = (logits[:, 0] - batch["label"]) ** 2
      return {"loss": (loss * batch["mask"]).sum(), "count": batch["mask"].sum(), "prediction": logits[:, 0]}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": (loss * batch["mask"]).sum(), "correct": (correct * batch["mask"]).sum(),
            "count": batch["mask"].sum()}

  return train_step, eval_step


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the job ``config`` describes in ``workdir``; returns the contents of results.json."""
  t_start = time.time()
  # ==============================================================================================================
  # Setup: workdir and config. Fields left at 'auto' are filled in below (transfer/hyper_rule.py), on a
  # copy, and config.json is written again with the picks.
  # ==============================================================================================================
  _check_workdir(workdir)
  config = copy.deepcopy(config)
  save_config(config, workdir)

  # ==============================================================================================================
  # Data.
  # ==============================================================================================================
  hyper_rule.apply(config, "data.resolution", lambda: hyper_rule.resolution(data.typical_image_side(config.data)),
                   log)
  train_ds, eval_ds = data.build(config.data, config.model)
  num_classes, regression = train_ds.num_outputs, train_ds.regression
  if regression and config.get("label_smoothing", 0.0):
    raise ValueError("config.label_smoothing applies to classes; this is a regression task: set it to 0")
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
  log(f"data: train {train_ds.name} {len(train_ds)} examples, eval {eval_ds.name} {len(eval_ds)}, "
      f"{'a regression target' if regression else f'{num_classes} classes'}; {total_steps} steps of batch {batch_size} ({total_steps / steps_per_epoch:.1f} "
      f"epochs)")

  # ==============================================================================================================
  # Model and pretrained weights.
  # ==============================================================================================================
  example = train_ds.train_batch(0, 1, 0)
  model, params, batch_stats, dropout_rng = init_variables(config, num_classes, example)

  # ==============================================================================================================
  # Devices: the batch is sharded over all of them, everything else replicated.
  # ==============================================================================================================
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  n_dev = jax.device_count()
  eval_batch_size = int(config.eval_batch_size)
  for field, size in (("batch_size", batch_size // accum), ("eval_batch_size", eval_batch_size)):
    if size % n_dev:
      raise ValueError(f"config.{field} (per micro-batch {size}) must be divisible by the {n_dev} devices")

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
  hyper_rule.apply(config, "mixup", lambda: hyper_rule.mixup(len(train_ds), images=images and not regression,
                                                              features_cached=cache), log)
  mixup_alpha = float(config.get("mixup", 0.0))
  if mixup_alpha and (regression or not images or cache):
    raise ValueError(f"config.mixup={mixup_alpha} blends images and their class labels, but " + (
        "this is a regression task" if regression else "the inputs are not images" if not images else
        "the frozen backbone's features are cached (one per image): set config.feature_cache='off' to run the "
        "backbone on blended images, or config.mixup=0"))
  save_config(config, workdir)   # with the auto rule's picks
  cached_backbone_params = 0
  if cache:
    cached_backbone_params = optim.count({p: v for p, v in params.items() if p.startswith("backbone/")})
    model, params, batch_stats, train_ds, eval_ds = cache_features(
        config, workdir, model, params, batch_stats, train_ds, eval_ds, sharded, eval_batch_size)

  # ==============================================================================================================
  # The partitioned optimizer and the initial train state.
  # ==============================================================================================================
  specs, backbone_train, schedule, tx, state = init_optimization(config, model, params, batch_stats, dropout_rng,
                                                           total_steps=total_steps, steps_per_epoch=steps_per_epoch)
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
  # The jitted steps.
  # ==============================================================================================================
  train_step, eval_step = make_steps(model, tx, schedule, num_classes=num_classes, backbone_train=backbone_train,
                                     accum=accum, smoothing=float(config.get("label_smoothing", 0.0)),
                                     regression=regression, frozen_stats=frozen_stats)
  p_train_step = jax.jit(train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                         donate_argnums=0)
  p_eval_step = jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated)

  def evaluate(state) -> dict:
    sums, predictions = {"loss": 0.0, "correct": 0.0, "count": 0.0}, []
    n_batches = -(-len(eval_ds) // eval_batch_size)
    for batch in tqdm(eval_ds.eval_batches(eval_batch_size), total=n_batches, desc="eval", leave=False,
                      dynamic_ncols=True, disable=None):
      out = jax.device_get(p_eval_step(state, jax.device_put(batch, sharded)))
      sums = {k: sums[k] + float(out.get(k, 0.0)) for k in sums}
      if regression:
        predictions.append(out["prediction"][batch["mask"] > 0])
    if regression:
      return {**metrics_lib.regression_metrics(np.concatenate(predictions), eval_ds.labels),
              "eval/loss": sums["loss"] / sums["count"]}
    return {"eval/accuracy": sums["correct"] / sums["count"], "eval/loss": sums["loss"] / sums["count"]}

  # ==============================================================================================================
  # Restore the last checkpoint, or start.
  # ==============================================================================================================
  state = jax.device_put(state, replicated)
  ckpt_cfg = config.checkpoint
  best_metric = ckpt_cfg.get("best_metric")
  if best_metric == "auto":
    best_metric = "eval/pearson" if regression else "eval/accuracy"
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=ckpt_cfg.keep_last,
                      best_metric=best_metric, best_mode=ckpt_cfg.get("best_mode", "max"))
  start_step = ckpt.latest_step() or 0
  if start_step:
    try:
      state = ckpt.restore(start_step, state)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"--workdir {workdir!r} holds a checkpoint (step {start_step}) that does not fit this "
                       f"config (another model, rules or optimizer?); use a new workdir. Orbax said: {e}") from None
    log(f"resumed from {workdir}/checkpoints step {start_step}")
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)

  # ==============================================================================================================
  # The loop.
  # ==============================================================================================================
  log_every, eval_every = int(config.log_every), int(config.get("eval_every") or 0)
  ckpt_every = int(ckpt_cfg.every_steps or 0)
  kill_at = config.get("fault", {}).get("kill_at_step")
  compile_seconds, timed_examples, timed_seconds = 0.0, 0, 0.0
  metrics = {}
  bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)
  t_log, examples_since_log = time.time(), 0
  for step in range(start_step + 1, total_steps + 1):
    batch = train_ds.train_batch(step - 1, batch_size, seed=int(config.seed))
    if mixup_alpha:
      batch = mixup.mix(batch, mixup_alpha, num_classes, mixup.generator(int(config.seed), step - 1))
    t0 = time.time()
    state, step_metrics = p_train_step(state, jax.device_put(batch, sharded))
    if step == start_step + 1:  # the first step compiles: keep it out of the throughput figures
      jax.block_until_ready(state)
      compile_seconds = time.time() - t0
      t_log, examples_since_log = time.time(), 0
    else:
      examples_since_log += batch_size
    bar.update(1)
    eval_metrics = evaluate(state) if (eval_every and step % eval_every == 0) or step == total_steps else None
    if step % log_every == 0 or step == total_steps or eval_metrics:
      row = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      elapsed = time.time() - t_log
      if examples_since_log:
        row["examples_per_sec"] = examples_since_log / elapsed
        timed_examples, timed_seconds = timed_examples + examples_since_log, timed_seconds + elapsed
      if not np.isfinite(row["train/loss"]):
        raise FloatingPointError(f"step {step}: train/loss is {row['train/loss']}; the last good checkpoint "
                                 f"is kept in {workdir}/checkpoints")
      row.update(eval_metrics or {})
      writer.write(step, row)
      metrics = {**metrics, **row}
      shown = {k: f"{v:.4g}" for k, v in row.items() if k in ("train/loss", "eval/accuracy", "examples_per_sec")}
      bar.set_postfix(shown)
      if bar.disable:   # no terminal (a log file, a batch job): the same progress as lines
        log(f"step {step}/{total_steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
      t_log, examples_since_log = time.time(), 0
    if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
      ckpt.save(step, state, metrics=eval_metrics)
    if kill_at and step == int(kill_at):  # fault injection: die like a preempted job, even mid-save
      os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  ckpt.close()
  writer.close()

  # ==============================================================================================================
  # Results.
  # ==============================================================================================================
  if start_step >= total_steps:  # relaunched after completion: report the final checkpoint again
    metrics = evaluate(state)
  results = {
      "step": total_steps,
      **{k: v for k, v in metrics.items() if k.startswith("eval/")},
      "wall_seconds": time.time() - t_start,
      "compile_seconds": compile_seconds,
      "train_examples_per_sec": timed_examples / timed_seconds if timed_seconds else None,
      "trainable_params": optim.count(rules.flatten(state["trainable"])),
      "frozen_params": optim.count(rules.flatten(state["frozen"])) + cached_backbone_params,
      "feature_cache": bool(cached_backbone_params),
      "devices": n_dev,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  log("results: " + json.dumps(results))
  return results


# ================================================================================================================
# Command line.
# ================================================================================================================
def main(argv=None) -> int:
  from absl import flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARGS]", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go (resumes if it has them)")
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:  # misspelt --config.X overrides land here, before any work
    msg = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    print(f"error in the command line: {msg}", file=sys.stderr)
    return 2
  if config_flag.value is None or not flags.FLAGS.workdir:
    print("usage: python -m transfer.train --config configs/NAME.py --workdir DIR", file=sys.stderr)
    return 2
  try:
    train(config_flag.value, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
