"""How good are a backbone's frozen features? ``python -m transfer.probe --model SOURCE --data DATA``.

  python -m transfer.probe --model efficientnet-lite0 --data ../shared/data/hymenoptera   # auto: 224 px photos
  python -m transfer.probe --model efficientnet-lite0 --data digits --resolution 64
  python -m transfer.probe --scratch efficientnet-lite0 --data digits       # the same network, random init
  python -m transfer.probe --config configs/digits_efficientnet.py:mode=frozen,per_class=0 [--config.FIELD=V]

The backbone runs once, in inference mode, over the training and eval splits, through the trainer's feature cache
(``transfer.features.extract_or_reuse``): a second probe, or a probe after a frozen training run with the same model
and data config and the same workdir (or ``config.feature_cache_dir``), reuses the features. On them, one table:

- ridge: closed-form least squares onto one-hot targets, L2 strength chosen on a validation split of train;
- logistic: multinomial logistic regression (L-BFGS, fixed steps), L2 chosen on the same validation split;
- k-shot: ridge on k = 1, 5, 10, 25 training examples per class, 3 seeds, mean +- std (big_vision's protocol);
- kNN: majority vote of the k most cosine-similar training examples, k = 1, 5, 20.

Everything (grids, validation accuracies, per-seed accuracies, timings) also goes to ``--out`` (default
``WORKDIR/probe.json``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.linalg

from transfer import config_base, data, models, pretrained, sharding, train
from transfer import features as features_lib
from transfer import hyper_rule

# Every method fits on standardised features: each dimension centred and scaled by its std over the training split
# (no labels involved), so one L2 grid suits every backbone.
RIDGE_L2S = tuple(10.0 ** np.arange(-2, 7))        # penalty on the summed squared error (scikit-learn's alpha)
LOGISTIC_L2S = (1e-4, 1e-3, 1e-2, 1e-1)            # penalty l2/2 * |W|^2 on the mean cross-entropy
LOGISTIC_STEPS = 100       # L-BFGS steps: on digits' features every L2's loss is within 4e-7 of 300 steps' loss
VAL_FRACTION = 0.2                                 # of each class's training examples, held out to choose L2
SHOTS = (1, 5, 10, 25)
KSHOT_SEEDS = 3
# k-shot uses one fixed L2 instead of a validated one: choosing it on the rest of the training labels would use
# more than k labels per class. 2^10 on standardised features, as big_vision's few-shot configs use.
KSHOT_L2 = 2.0 ** 10
KNN_KS = (1, 5, 20)
# How a probe loads a checkpoint: everything but the head (the classifier's head is built, never used).
PROBE_RULES = [("head/.*", dict(load=False))]


# ================================================================================================================
# The config: a training config file, or the base config with --model and --data.
# ================================================================================================================
# --data digits: its 8x8 images upsampled to 32 px, as configs/digits_efficientnet.py trains (so a probe and that
# config's frozen run share features).
DIGITS_RESOLUTION = 32


def data_config(spec: str) -> ml_collections.ConfigDict:
  """``--data`` -> ``config.data``: the base config's data fields plus what ``spec`` names (``transfer.data.build``
  reads it): 'digits'; 'tfds:NAME', a TFDS text task or image dataset; a ``.npz`` file (arrays ``image`` and
  ``label``; ``config.data.test_fraction`` held out); a folder of ``CLASS/*.jpg|png`` (or ``train/`` and ``val/``).
  Image sources take the resolution the auto rule picks from their images (``transfer.hyper_rule.resolution``:
  224 px for photos), digits ``DIGITS_RESOLUTION``; ``--resolution`` overrides either."""
  from transfer.data import tfds_image, tfds_text
  c = config_base.base().data
  if spec == "digits":
    c.name, c.resolution = "digits", DIGITS_RESOLUTION
  elif spec.startswith("tfds:"):
    c.tfds_name = spec[len("tfds:"):]
    if c.tfds_name in tfds_text.TASKS:
      c.name = "tfds_text"
    elif c.tfds_name in tfds_image.DATASETS:
      c.name = "tfds_image"
    else:
      raise ValueError(f"--data {spec!r}: unknown TFDS dataset; text tasks {sorted(tfds_text.TASKS)}, image "
                       f"datasets {sorted(tfds_image.DATASETS)}")
  elif spec.endswith(".npz"):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"--data {spec!r}: no such .npz file")
    c.name, c.train_file = "npz", spec
  elif os.path.isdir(spec):
    c.name, c.data_dir = "image_folder", spec
  else:
    raise ValueError(f"--data {spec!r}: not 'digits', 'tfds:NAME', a .npz file or an existing image folder")
  if c.name in data.IMAGE_SOURCES:
    c.resolution = hyper_rule.AUTO
  return c


def model_fields(model: str | None, arch: str | None, scratch: str | None) -> dict:
  """``config.model`` fields for ``--model SOURCE [--arch NAME]`` or ``--scratch NAME``."""
  if model and scratch:
    raise ValueError("--model and --scratch: pass one (pretrained weights, or a random init)")
  if arch and arch not in models.NAMES:
    raise ValueError(f"--arch {arch!r}: unknown architecture; available: {models.NAMES}")
  if scratch:
    if scratch in pretrained.SHORT_NAMES:   # a text short name: its config.json gives the architecture
      name = pretrained.SHORT_NAMES[scratch]["model"]
      return dict(name=name, pretrained=None, architecture=scratch if name == "bert" else None)
    if scratch not in models.NAMES:
      raise ValueError(f"--scratch {scratch!r}: unknown architecture; available: {models.NAMES}")
    return dict(name=scratch, pretrained=None)
  try:
    name, _ = pretrained.locate(model, model=arch)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"--model: {e}") from None
  return dict(name=name, pretrained=model)


def _parse_config_flag(define, argv: list[str]) -> ml_collections.ConfigDict:
  """Parses ``argv`` with ml_collections' ``--config`` flag, as the trainer does (files with ``:ARGS``, checked
  ``--config.FIELD=V`` overrides): ``define(flag_values, sys_argv)`` defines it."""
  from absl import flags
  flag_values, sys_argv = flags.FlagValues(), ["probe", *argv]
  try:   # the overrides' flags are defined (and checked) with the config flag, the values set when parsing
    holder = define(flag_values, sys_argv)
    flag_values(sys_argv)
  except (AttributeError, KeyError, flags.Error) as e:
    msg = str(e)
    if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":   # a KeyError's repr: unquote it
      msg = msg[1:-1].replace("\\n", "\n").replace("\\'", "'")
    raise ValueError(f"--config: {msg}") from None
  return holder.value


def _resolution(text: str) -> int | str:
  if text != "auto" and (not text.isdigit() or int(text) < 1):
    raise ValueError(f"--resolution {text!r}: expected a positive number of pixels or 'auto'")
  return text if text == "auto" else int(text)


def config_from_args(args: argparse.Namespace, overrides: list[str], *,
                     model_config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The training config of ``--config`` (else the base config), then --model/--scratch, --data, --resolution,
  --seed, then the ``--config.FIELD=V`` overrides. ``model_config``: a whole ``config.model`` (a training run's,
  for ``transfer.rank``) in place of --model/--scratch."""
  from ml_collections import config_flags
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ValueError(f"unknown arguments {bad}; overrides look like --config.FIELD=VALUE")
  if args.config:
    if not os.path.isfile(args.config.split(":")[0]):
      raise FileNotFoundError(f"--config {args.config}: {args.config.split(':')[0]} is not a file")
    config = _parse_config_flag(lambda fv, argv: config_flags.DEFINE_config_file(
        "config", flag_values=fv, sys_argv=argv, lock_config=False), [f"--config={args.config}"])
  else:
    if not (args.model or args.scratch or model_config) or not args.data:
      raise ValueError("pass --model SOURCE (or --scratch NAME) and --data DATA, or --config FILE")
    config = config_base.base()
  if model_config is not None:
    config.model = ml_collections.ConfigDict(model_config.to_dict())
  elif args.model or args.scratch:
    for field, value in model_fields(args.model, args.arch, args.scratch).items():
      config.model[field] = value
  elif args.arch:
    raise ValueError("--arch names the architecture of a --model checkpoint file; no --model given")
  if args.data:
    config.data = data_config(args.data)
  if args.resolution is not None:
    config.data.resolution = _resolution(args.resolution)
  if args.seed is not None:
    config.seed = args.seed
  config.param_rules = PROBE_RULES
  return _parse_config_flag(lambda fv, argv: config_flags.DEFINE_config_dict(
      "config", config, flag_values=fv, sys_argv=argv), overrides)


# ================================================================================================================
# Shared pieces: standardisation, the validation split, choosing L2.
# ================================================================================================================
def standardise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Centres and scales every array by the training features' mean and std (float64); constant dimensions (std
  below 1e-6 of the largest) are only centred."""
  train_x = np.asarray(train_x, np.float64)
  mean, std = train_x.mean(0), train_x.std(0)
  scale = np.where(std > 1e-6 * std.max(), std, 1.0)
  return [(np.asarray(x, np.float64) - mean) / scale for x in (train_x, *others)]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit rows, validation rows): ``fraction`` of each class (rounded, at least one row left to fit) held out."""
  rng = np.random.default_rng(seed)
  fit, val = [], []
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    n_val = min(int(round(fraction * len(rows))), len(rows) - 1)
    val.append(rows[:n_val])
    fit.append(rows[n_val:])
  val = np.sort(np.concatenate(val))
  if not len(val):
    raise ValueError(f"the training split ({len(labels)} examples) is too small to hold out a validation split")
  return np.sort(np.concatenate(fit)), val


def fit_validated(fit, x: np.ndarray, labels: np.ndarray, num_classes: int, l2s, seed: int):
  """``fit(x, labels, num_classes, l2s, rows=) -> (weights (L, D, C), biases (L, C))`` with the L2 strength chosen on a
  stratified validation split (highest accuracy; ties go to the stronger L2, the simpler model), then refitted on
  every training row. Returns (weights, bias, chosen l2, validation accuracy per l2)."""
  fit_rows, val_rows = stratified_split(labels, VAL_FRACTION, seed)
  weights, biases = fit(x, labels, num_classes, l2s, rows=fit_rows)
  val_acc = [accuracy(x[val_rows] @ w + b, labels[val_rows]) for w, b in zip(weights, biases)]
  best = max(range(len(l2s)), key=lambda i: (val_acc[i], l2s[i]))
  weights, biases = fit(x, labels, num_classes, [l2s[best]])
  return weights[0], biases[0], float(l2s[best]), val_acc


# ================================================================================================================
# Ridge in closed form.
# ================================================================================================================
def fit_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, l2s, *,
              rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Least squares of ``x[rows]`` (default: every row) onto +-1 one-hot targets (scikit-learn's RidgeClassifier
  coding) plus ``l2 * |W|^2``, the bias unpenalised, in float64. Each ``l2`` is one Cholesky solve of the smaller
  Gram system, X^T X (D x D) or X X^T (N x N), built once. Returns weights (L, D, C) and biases (L, C)."""
  if rows is not None:
    x, labels = x[rows], labels[rows]
  x = np.asarray(x, np.float64)
  targets = np.where(np.arange(num_classes) == np.asarray(labels)[:, None], 1.0, -1.0)
  x_mean, t_mean = x.mean(0), targets.mean(0)
  xc, tc = x - x_mean, targets - t_mean     # centring both leaves the bias out of the penalty
  features_side = xc.shape[0] >= xc.shape[1]
  gram, rhs = (xc.T @ xc, xc.T @ tc) if features_side else (xc @ xc.T, tc)
  weights = []
  for l2 in l2s:
    solved = scipy.linalg.solve(gram + l2 * np.eye(len(gram)), rhs, assume_a="pos")
    weights.append(solved if features_side else xc.T @ solved)   # W = (X^T X + l2)^-1 X^T T = X^T (X X^T + l2)^-1 T
  weights = np.stack(weights)
  return weights, t_mean - np.einsum("d,ldc->lc", x_mean, weights)


# ================================================================================================================
# Logistic head: multinomial logistic regression, full batch, a fixed number of L-BFGS steps (deterministic).
# ================================================================================================================
@functools.partial(jax.jit, static_argnames="steps")
def _logistic_solve(l2, x, onehot, row_weights, *, steps: int):
  """L-BFGS from zeros on the weighted mean cross-entropy + ``l2 / 2 * |W|^2``; zero-weight rows are left out,
  so fitting on a subset and on every row share one compiled function."""

  def loss(params):
    w, b = params
    cross_entropy = optax.softmax_cross_entropy(x @ w + b, onehot)
    return (row_weights * cross_entropy).sum() / row_weights.sum() + 0.5 * l2 * jnp.sum(w * w)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  params = (jnp.zeros((x.shape[1], onehot.shape[1])), jnp.zeros(onehot.shape[1]))
  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), length=steps)
  return params


def fit_logistic(x: np.ndarray, labels: np.ndarray, num_classes: int, l2s, *, rows: np.ndarray | None = None,
                 steps: int = LOGISTIC_STEPS) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression on ``x[rows]`` (default: every row): mean cross-entropy + ``l2 / 2 * |W|^2``,
  bias unpenalised, ``steps`` full-batch L-BFGS steps from zeros (deterministic). Returns weights (L, D, C) and
  biases (L, C), one per ``l2``."""
  row_weights = np.zeros(len(x), np.float32)
  row_weights[np.arange(len(x)) if rows is None else rows] = 1.0
  x, onehot = jnp.asarray(x, jnp.float32), jax.nn.one_hot(np.asarray(labels), num_classes)
  fits = [_logistic_solve(jnp.float32(l2), x, onehot, row_weights, steps=steps) for l2 in l2s]
  return (np.stack([np.asarray(w, np.float64) for w, _ in fits]),
          np.stack([np.asarray(b, np.float64) for _, b in fits]))


# ================================================================================================================
# k-shot: ridge on k examples per class.
# ================================================================================================================
def sample_per_class(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """Rows of ``shots`` examples of each class: the first ``shots`` of each class in an order drawn from ``seed``,
  so for one seed the 1-shot set lies inside the 5-shot set, and so on."""
  rng = np.random.default_rng(seed)
  orders = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  short = [c for c, rows in enumerate(orders) if len(rows) < shots]
  if short:
    raise ValueError(f"{shots} examples per class: classes {short} have fewer")
  return np.sort(np.concatenate([rows[:shots] for rows in orders]))


# ================================================================================================================
# k-nearest neighbours.
# ================================================================================================================
def knn_predict(train_x: np.ndarray, train_labels: np.ndarray, eval_x: np.ndarray, ks, num_classes: int,
                chunk: int = 512) -> dict[int, np.ndarray]:
  """``{k: predictions}``: majority vote of the k training examples of highest cosine similarity (ties between
  classes go to the lower class id, as in scikit-learn), eval rows in chunks to bound memory."""

  def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

  train_u, k_max = unit(train_x), max(ks)
  predictions = {k: [] for k in ks}
  for start in range(0, len(eval_x), chunk):
    sims = unit(eval_x[start:start + chunk]) @ train_u.T
    top = np.argpartition(-sims, k_max - 1, axis=1)[:, :k_max]
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")   # most similar first
    neighbours = np.asarray(train_labels)[np.take_along_axis(top, order, 1)]
    for k in ks:
      votes = (neighbours[:, :k, None] == np.arange(num_classes)).sum(1)
      predictions[k].append(votes.argmax(1))
  return {k: np.concatenate(p) for k, p in predictions.items()}


# ================================================================================================================
# The probe: features, then every method on them.
# ================================================================================================================
def image_data(data_cfg) -> bool:
  return data_cfg.name == "digits" or data_cfg.name in data.IMAGE_SOURCES


def settle_resolution(config: ml_collections.ConfigDict) -> None:
  """Image data: 'auto' becomes the trainer's pick (``hyper_rule.resolution``, printed with its reason), a set
  value is checked and printed too, so the output always says the resolution the features come from."""
  if not image_data(config.data):
    return
  chosen = config.data.resolution == hyper_rule.AUTO
  hyper_rule.apply(config, "data.resolution", lambda: hyper_rule.resolution(data.typical_image_side(config.data)))
  if not chosen:
    print(f"data.resolution = {config.data.resolution} px (set; 'auto' picks it from the images)", flush=True)


def datasets_for(config: ml_collections.ConfigDict):
  """(train, eval) datasets of ``config.data``, the resolution settled first (as the trainer does, before the data
  config becomes part of the feature cache's key); a regression task is refused."""
  settle_resolution(config)
  train_ds, eval_ds = data.build(config.data, config.model)
  if train_ds.regression:
    raise ValueError(f"config.data: {train_ds.name} is a regression task; the probe measures class accuracy")
  return train_ds, eval_ds


def features_for(config: ml_collections.ConfigDict, workdir: str, batch_size: int, *, splits=("train", "eval"),
                 datasets=None, variables=None):
  """(train, eval) datasets and the backbone features of ``splits`` from the trainer's cache, and whether each was
  reused. ``datasets``: (train, eval) from ``datasets_for`` (else built here); ``variables``: (flat params,
  batch_stats) to use instead of the config's init and pretrained weights (``transfer.rank``: a run's checkpoint)."""
  mesh = sharding.make_mesh(config.mesh)   # the trainer's mesh: the batch split over its data and fsdp axes
  if batch_size % sharding.batch_ways(mesh):
    raise ValueError(f"--batch-size {batch_size} must be divisible by the {sharding.batch_ways(mesh)} ways the batch "
                     f"is split (config.mesh: {sharding.describe(mesh)})")
  train_ds, eval_ds = datasets or datasets_for(config)
  if variables is None:
    _, params, batch_stats, _ = train.init_variables(config, train_ds.num_outputs, train_ds.train_batch(0, 1, 0))
  else:
    params, batch_stats = variables
  by_split = {"train": train_ds, "eval": eval_ds}
  feats = features_lib.extract_or_reuse(config, workdir, params, batch_stats, {s: by_split[s] for s in splits},
                                        sharding.batch_sharding(mesh), batch_size)
  return train_ds, eval_ds, feats


def probe(config: ml_collections.ConfigDict, workdir: str, *, batch_size: int) -> dict:
  """Runs every method on the features of ``config``'s model and data; returns the results (with table rows)."""
  t_start = time.time()
  seed = int(config.seed)
  train_ds, eval_ds, feats = features_for(config, workdir, batch_size)
  (train_raw, train_reused), (eval_raw, eval_reused) = feats["train"], feats["eval"]
  x_train, x_eval = standardise(train_raw, eval_raw)
  y_train, y_eval, num_classes = train_ds.labels, eval_ds.labels, train_ds.num_outputs
  results = {
      "model": config.model.to_dict(), "data": config.data.to_dict(), "seed": seed,
      "features": {"train": {"shape": list(train_raw.shape), "reused": train_reused},
                   "eval": {"shape": list(eval_raw.shape), "reused": eval_reused},
                   "seconds": time.time() - t_start},
      "rows": [], "notes": [],
  }
  rows = results["rows"]

  def timed(fn):
    t0 = time.time()
    out = fn()
    return out, time.time() - t0

  # Linear probes, L2 validated.
  for method, fit, l2s, how in (("ridge", fit_ridge, RIDGE_L2S, "closed form, +-1 targets"),
                                ("logistic", fit_logistic, LOGISTIC_L2S, f"{LOGISTIC_STEPS} L-BFGS steps")):
    (w, b, l2, val_acc), seconds = timed(lambda: fit_validated(fit, x_train, y_train, num_classes, l2s, seed))
    acc = accuracy(x_eval @ w + b, y_eval)
    results[method] = {"accuracy": acc, "l2": l2, "l2_grid": list(map(float, l2s)), "val_accuracy": val_acc,
                       "val_fraction": VAL_FRACTION, "seconds": seconds}
    rows.append({"method": method, "setting": f"{how}, L2 {l2:.0e} (val acc {max(val_acc):.3f})",
                 "accuracy": acc, "std": None, "seconds": seconds})

  # k-shot ridge, fixed L2, 3 seeds.
  rarest = int(np.bincount(y_train, minlength=num_classes).min())
  seeds = [seed + i for i in range(KSHOT_SEEDS)]
  results["kshot"] = []
  for shots in SHOTS:
    if shots > rarest:
      results["notes"].append(f"{shots}-shot skipped: the rarest class has {rarest} training examples")
      continue

    def run_seeds():
      accs = []
      for s in seeds:
        rows_k = sample_per_class(y_train, shots, s, num_classes)
        w, b = fit_ridge(x_train, y_train, num_classes, [KSHOT_L2], rows=rows_k)
        accs.append(accuracy(x_eval @ w[0] + b[0], y_eval))
      return accs

    accs, seconds = timed(run_seeds)
    mean, std = float(np.mean(accs)), float(np.std(accs, ddof=1))   # std over seeds, ddof=1
    results["kshot"].append({"shots": shots, "accuracy_mean": mean, "accuracy_std": std, "accuracies": accs,
                             "seeds": seeds, "l2": KSHOT_L2, "seconds": seconds})
    rows.append({"method": f"{shots}-shot", "setting": f"ridge, L2 {KSHOT_L2:g}, {len(seeds)} seeds",
                 "accuracy": mean, "std": std, "seconds": seconds})

  # kNN on the raw features (cosine similarity is scale-free): one pass finds the neighbours for every k.
  ks = [k for k in KNN_KS if k <= len(y_train)]
  results["notes"] += [f"kNN k={k} skipped: only {len(y_train)} training examples" for k in KNN_KS if k not in ks]
  predictions, seconds = timed(lambda: knn_predict(train_raw, y_train, eval_raw, ks, num_classes))
  results["knn"] = {"seconds": seconds, "accuracy": {}}
  for i, k in enumerate(ks):
    acc = results["knn"]["accuracy"][k] = float(np.mean(predictions[k] == y_eval))
    rows.append({"method": "kNN", "setting": f"k={k}, cosine, majority vote", "accuracy": acc, "std": None,
                 "seconds": None if i else seconds})   # the pass is timed once, on its first row
  results["wall_seconds"] = time.time() - t_start
  return results


# ================================================================================================================
# The table and the command line.
# ================================================================================================================
def aligned(lines: list[tuple[str, ...]], notes=()) -> str:
  """A header row and rows as left-aligned columns under a dashed rule, then ``note: ...`` lines (the probe's and
  ``transfer.rank``'s tables)."""
  widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
  text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
  text.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(text + [f"note: {n}" for n in notes])


def table(results: dict) -> str:
  """One row per method and setting: accuracy on the eval split (mean +- std over seeds for k-shot), seconds."""
  lines = [("method", "setting", "accuracy", "time")]
  for r in results["rows"]:
    acc = f"{r['accuracy']:.3f}" + (f" +- {r['std']:.3f}" if r["std"] is not None else "")
    lines.append((r["method"], r["setting"], acc, "(same)" if r["seconds"] is None else f"{r['seconds']:.1f} s"))
  return aligned(lines, results["notes"])


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m transfer.probe", description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="pretrained weights: a short name (efficientnet-lite0, all-minilm-l6-v2), a "
                                      "checkpoint file (with --arch) or a Hugging Face model folder")
  parser.add_argument("--arch", help="the architecture of a --model checkpoint file")
  parser.add_argument("--scratch", metavar="NAME", help="a randomly initialised NAME: the from-scratch baseline")
  parser.add_argument("--data", help="digits, tfds:NAME (a TFDS text task or image dataset), a .npz file or an "
                                     "image folder")
  parser.add_argument("--config", help="configs/NAME.py[:ARGS]: model and data from a training config "
                                       "(--model/--data override them; --config.FIELD=V overrides fields)")
  parser.add_argument("--resolution", help="image side in pixels, or 'auto' (the trainer's rule, by the images' "
                                           "size: 224 px for photos, 128 for small images). Default: 'auto' for "
                                           "image folders, .npz and TFDS images; 32 for digits; --config's own")
  parser.add_argument("--workdir", default="runs/probe", help="holds the feature cache (WORKDIR/features)")
  parser.add_argument("--batch-size", type=int, help="feature-extraction batch (default config.eval_batch_size)")
  parser.add_argument("--seed", type=int, help="config.seed: a scratch backbone's init; also the validation split "
                                               "and the k-shot samples (seeds S, S+1, S+2)")
  parser.add_argument("--out", help="results JSON (default WORKDIR/probe.json)")
  return parser


def main(argv=None) -> int:
  args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    config = config_from_args(args, overrides)
    train._check_workdir(args.workdir)
    results = probe(config, args.workdir, batch_size=args.batch_size or int(config.eval_batch_size))
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  source = config.model.pretrained or f"random init, seed {config.seed}"
  feats = ", ".join(f"{split} {tuple(f['shape'])} {'reused' if f['reused'] else 'extracted'}"
                    for split, f in results["features"].items() if split != "seconds")
  at = f" at {config.data.resolution} px" if image_data(config.data) else ""
  print(f"\n{config.model.name} ({source}) on {config.data.name}{at}, accuracy on the eval split; features: "
        f"{feats}\n")
  print(table(results))
  out = args.out or os.path.join(args.workdir, "probe.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nresults: {out} ({results['wall_seconds']:.1f} s in all)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
