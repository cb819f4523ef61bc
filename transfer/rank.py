"""Which backbone to fine-tune? ``python -m transfer.rank --models A,B,... --data DATA`` scores each without training.

  python -m transfer.rank --models efficientnet-lite0,scratch:efficientnet-lite0 --data digits
  python -m transfer.rank --models efficientnet-lite0,run:runs/digits_ft,run:runs/digits_ft@best --data digits
  python -m transfer.rank --models weights.pth@resnet18,efficientnet-lite0 --data ../shared/data/hymenoptera
  python -m transfer.rank --models all-minilm-l6-v2,scratch:all-minilm-l6-v2 --data tfds:glue/sst2 \\
      --config.data.train_examples=2000

A candidate (``--models``, comma-separated, or ``--model`` once per candidate, for paths that hold commas) is one
of:

- a pretrained source, as ``transfer.probe --model`` takes it: a short name (efficientnet-lite0, all-minilm-l6-v2),
  a Hugging Face model folder or cached hub id, or a checkpoint file with its architecture: ``PATH@ARCH``;
- ``scratch:NAME``: architecture NAME at random init (seed ``--seed``), the baseline a pretrained source must beat;
- ``run:WORKDIR[@CHECKPOINT]``: the backbone of a training run's checkpoint ('last' by default, 'best' or a step),
  head dropped; the architecture is the run's ``config.model``.

``--data``, ``--resolution`` and the ``--config.FIELD=V`` overrides apply to every candidate (a run's model fields
included). Each backbone runs once, in inference mode, over the training split, through the trainer's feature
cache (``transfer.probe.features_for``: a probe, a frozen training run or a second ranking with the same model,
data and ``--workdir`` reuses the features). Then three scores, every one from the training split alone:

- LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021): the
  log marginal likelihood (evidence) per example of a Bayesian linear model from the features to each one-hot
  label column, its prior and noise precisions set by evidence maximisation, averaged over classes. On the raw
  features, as the paper defines it; over every training example. No fitting choices, so it ranks without a
  validation split; the other two are there to check it against accuracies;
- kNN accuracy: majority vote of the k = 20 most cosine-similar examples (``probe.knn_predict``; k = 1, 5 in the
  JSON), fitted on 80% of each class of the training split and scored on the other 20% (``probe.stratified_split``,
  ``probe.VAL_FRACTION``, seed ``--seed``);
- ridge accuracy on the same held-out 20%: the probe's closed-form ridge on standardised features, its L2 chosen
  by ``probe.fit_validated`` inside the 80% alone (a nested split), so the held-out rows score a model they had no
  say in. A fit part too small to split again gets the probe's fixed few-shot L2 (noted).

The eval split is not even featurised: it is where the fine-tune that follows the ranking is measured, and a
backbone chosen on it would make that measurement optimistic. Output: a table sorted by LogME, best first, and a
JSON (``--out``, default ``WORKDIR/rank.json``) with every score, the settings and the order by each score.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from transfer import models, probe, rules, runs, train

KNN_K = 20                      # the table's kNN column; probe.KNN_KS (1, 5, 20) all go to the JSON
LOGME_MAX_ITERATIONS = 10_000   # fixed-point steps: usually under 30 from alpha = beta = 1; a flat maximum, thousands
LOGME_TOLERANCE = 1e-10         # relative change of alpha/beta at which the fixed point counts as reached
LOGME_FAR = 1e8                 # alpha / beta this many times the largest eigenvalue: the alpha -> inf regime
RUN_CHECKPOINTS = ("last", "best")   # besides a step number


# ================================================================================================================
# LogME: the evidence of a Bayesian linear model on the features, maximised over its two precisions.
# ================================================================================================================
def check_labels(labels: np.ndarray, num_classes: int) -> None:
  """A ranking needs two classes or more and an example of each: one class has no distinction for features to
  carry, and a label column with no example has nothing to fit (its prior precision runs off to infinity)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: expected (N,) integer class ids, got {labels.dtype} {labels.shape}")
  if num_classes < 2:
    raise ValueError(f"{num_classes} class{'es' * (num_classes != 1)}: ranking needs at least two classes (with "
                     "one there is nothing to tell apart; a score would only say how well features fit a constant)")
  if len(labels) < num_classes:
    raise ValueError(f"{len(labels)} examples for {num_classes} classes: fewer examples than classes, so some "
                     "class has no example to score a backbone on")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels: class ids must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
  if missing := sorted(set(range(num_classes)) - set(np.unique(labels).tolist())):
    raise ValueError(f"classes {missing[:10]}{' ...' if len(missing) > 10 else ''} have no example (of "
                     f"{num_classes} classes, {len(labels)} examples)")


def _spectrum(f: np.ndarray, targets: np.ndarray, gram: str):
  """(sigma (k,), x2 (k, C), outside (C,)): the nonzero eigenvalues of F^T F, the squared coordinates of each target
  column along the matching left singular vectors of F, and each column's squared norm outside F's column space.

  ``gram``: 'features' eigendecomposes F^T F (D x D, the cheaper one when N >= D), 'examples' F F^T (N x N, when
  N < D); both give the same spectrum. Eigenvalues below the Gram matrix's rounding level count as zero."""
  n, d = f.shape
  eps = np.finfo(np.float64).eps
  if gram == "features":
    sigma, v = np.linalg.eigh(f.T @ f)
    keep = sigma > max(sigma.max(), 0.0) * d * eps
    z = v[:, keep].T @ (f.T @ targets)                    # = s_i * (u_i . y): no left singular vectors needed
    x2 = z * z / sigma[keep, None]
    outside = np.maximum((targets * targets).sum(0) - x2.sum(0), 0.0)
  elif gram == "examples":
    sigma, u = np.linalg.eigh(f @ f.T)
    keep = sigma > max(sigma.max(), 0.0) * n * eps
    x = u.T @ targets                                     # every direction of R^N: the outside part comes exactly
    x2, outside = x[keep] ** 2, (x[~keep] ** 2).sum(0)
  else:
    raise ValueError(f"gram={gram!r}: 'auto', 'features' or 'examples'")
  return sigma[keep], x2, outside


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int | None = None, *, gram: str = "auto",
          max_iterations: int = LOGME_MAX_ITERATIONS, tolerance: float = LOGME_TOLERANCE) -> dict:
  """LogME of ``features`` (N, D) for ``labels`` (N,): the mean over classes of the maximised log evidence per
  example of y_c = F w + noise, y_c the 0/1 column of class c, w ~ N(0, I / alpha), noise ~ N(0, I / beta):

    log p(y | F, alpha, beta) = D/2 log alpha + N/2 log beta - 1/2 log|A| - beta/2 |y - F m|^2 - alpha/2 |m|^2
                                - N/2 log 2 pi,   A = alpha I + beta F^T F,  m = beta A^-1 F^T y.

  alpha and beta come from MacKay's fixed point (gamma = sum_i beta s_i / (alpha + beta s_i); alpha = gamma / |m|^2,
  beta = (N - gamma) / |y - F m|^2), iterated to ``tolerance`` on alpha / beta, in float64, on the eigenvalues s_i
  of the smaller Gram matrix (``gram``: 'auto' picks it; see ``_spectrum``); the evidence is then evaluated exactly
  at the final (alpha, beta). log|A| counts every one of the D eigenvalues, the D - rank zero ones (all the more
  when N < D) included as log alpha (the paper's code drops them in its thin-SVD path). Features are used as given
  (the paper's definition): no centring or scaling, no bias term. Returns {"logme", "per_class", "alpha" (None:
  the alpha -> inf limit, see below), "beta", "iterations", "converged", "gram", "feature_rank"}."""
  f = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if f.ndim != 2 or len(f) != len(labels):
    raise ValueError(f"features {f.shape} and labels {labels.shape}: expected (N, D) and (N,)")
  if not np.isfinite(f).all():
    raise ValueError(f"the features hold {int((~np.isfinite(f)).sum())} non-finite values (NaN or inf)")
  num_classes = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
  check_labels(labels, num_classes)
  n, d = f.shape
  targets = (labels[:, None] == np.arange(num_classes)).astype(np.float64)
  gram = ("features" if n >= d else "examples") if gram == "auto" else gram
  sigma, x2, outside = _spectrum(f, targets, gram)
  s = sigma[:, None]

  def fit_terms(t, cols=slice(None)):
    """gamma, |m|^2 and |y - F m|^2 of the posterior mean at alpha / beta = t, for the class columns ``cols``."""
    denom, x2c = s + t, x2[:, cols]
    return (s / denom).sum(0), (s * x2c / denom ** 2).sum(0), (x2c * (t / denom) ** 2).sum(0) + outside[cols]

  def precisions(t, cols=slice(None)):
    gamma, m2, res = fit_terms(t, cols)
    with np.errstate(divide="ignore", invalid="ignore"):   # |m|^2 = 0 (y orthogonal to F's columns): alpha -> inf
      return np.where(m2 > 0, gamma / m2, np.inf), (n - gamma) / np.maximum(res, np.finfo(np.float64).tiny)

  # Far beyond every eigenvalue (t >> s_max), each step multiplies t by about sum(s) |y|^2 / (N sum(s x^2)): when that
  # exceeds 1 the maximum is the alpha -> inf limit (m = 0: the features explain nothing of the column), which the
  # iteration would approach only geometrically; it is taken at once, its evidence closed-form (within about
  # D / (N FAR) of where the steps were heading).
  t_far = float(sigma.max()) * LOGME_FAR if len(sigma) else 0.0
  t, done, iterations = np.ones(num_classes), np.zeros(num_classes, bool), 0   # alpha = beta = 1, as the paper
  while not done.all() and iterations < max_iterations:
    iterations += 1
    active = np.flatnonzero(~done)   # settled classes drop out (a flat maximum can take thousands of steps)
    alpha, beta = precisions(t[active], active)
    new_t = alpha / beta
    new_t[(new_t > t[active]) & (t[active] >= t_far)] = np.inf
    done[active] = (np.abs(new_t - t[active]) <= tolerance * t[active]) | np.isinf(new_t)
    t[active] = new_t
  limit = np.isinf(t)
  alpha, beta = precisions(np.where(limit, 1.0, t))
  gamma, m2, res = fit_terms(np.where(limit, 1.0, alpha / beta))   # m at this (alpha, beta): the formula is exact
  counts = targets.sum(0)   # |y|^2: the limit's residual, with beta = N / |y|^2
  alpha, beta = np.where(limit, np.inf, alpha), np.where(limit, n / counts, beta)
  m2, res = np.where(limit, 0.0, m2), np.where(limit, counts, res)
  a = np.where(limit, 1.0, alpha)
  # D/2 log alpha - 1/2 log|A| = -1/2 sum_i log(1 + beta s_i / alpha): written so, alpha -> inf is the limit 0.
  log_det_part = np.where(limit, 0.0, -0.5 * np.log1p(s * beta / a).sum(0))
  evidence = (log_det_part + 0.5 * n * np.log(beta) - 0.5 * beta * res - 0.5 * a * m2
              - 0.5 * n * math.log(2 * math.pi)) / n
  return {"logme": float(evidence.mean()), "per_class": evidence.tolist(),
          "alpha": [None if lim else float(v) for v, lim in zip(alpha, limit)], "beta": beta.tolist(),
          "iterations": iterations, "converged": bool(done.all()), "gram": gram, "feature_rank": int(len(sigma))}


# ================================================================================================================
# Candidates: parsing --models, one config each, a run's backbone.
# ================================================================================================================
@dataclasses.dataclass
class Candidate:
  text: str                    # as written in --models: its name in the table and the JSON
  kind: str                    # 'pretrained', 'scratch' or 'run'
  source: str                  # the pretrained source, the architecture, or the run's workdir
  arch: str | None = None      # a checkpoint file's architecture (PATH@ARCH)
  checkpoint: str = "last"     # a run's checkpoint (run:WORKDIR@CHECKPOINT)


def parse_candidates(spec: str | None, single: list[str] | None = None) -> list[Candidate]:
  """``--models`` (comma-separated) then each ``--model`` (one candidate, whose path may hold commas: a sweep
  point's workdir) -> candidates (see the module docstring); empty or repeated entries are refused."""
  items = [item.strip() for item in spec.split(",")] if spec is not None else []
  if (spec is not None and not all(items)) or (spec is None and not single):
    raise ValueError(f"--models {spec!r}: expected candidates separated by commas, none of them empty (or "
                     "--model CANDIDATE, repeated)")
  if any(not item.strip() for item in single or []):
    raise ValueError("--model: an empty candidate")
  items += [item.strip() for item in single or []]
  if repeated := sorted({i for i in items if items.count(i) > 1}):
    raise ValueError(f"--models: {repeated} listed more than once")
  out = []
  for item in items:
    if item.startswith("scratch:"):
      out.append(Candidate(item, "scratch", item[len("scratch:"):]))
    elif item.startswith("run:"):
      workdir, checkpoint = item[len("run:"):], "last"
      head, _, tail = workdir.rpartition("@")
      if head and (tail in RUN_CHECKPOINTS or tail.isdigit()):
        workdir, checkpoint = head, tail
      out.append(Candidate(item, "run", workdir, checkpoint=checkpoint))
    else:
      head, _, tail = item.rpartition("@")
      if head and (tail in models.NAMES or os.path.isfile(head)):   # PATH@ARCH (an unknown ARCH: named below)
        out.append(Candidate(item, "pretrained", head, arch=tail))
      else:
        out.append(Candidate(item, "pretrained", item))
    if not out[-1].source:
      raise ValueError(f"--models: candidate {item!r} names nothing after its prefix")
  return out


def candidate_config(c: Candidate, args: argparse.Namespace, overrides: list[str]) -> ml_collections.ConfigDict:
  """The probe's config for one candidate (``probe.config_from_args``): its model, then --data, --resolution,
  --seed and the overrides, as every other candidate gets them."""
  flags = argparse.Namespace(config=None, model=None, arch=None, scratch=None, data=args.data,
                             resolution=args.resolution, seed=args.seed)
  if c.kind == "run":
    run_config = runs.read_config(c.source)
    if runs.task_of(run_config) == "causal_lm":
      raise ValueError(f"--workdir {c.source} is a causal_lm run: its network predicts tokens, it has no "
                       "classifier backbone to rank")
    runs.checkpoint_step(c.source, c.checkpoint)   # the checkpoint exists (read when its turn comes)
    return probe.config_from_args(flags, overrides, model_config=run_config.model)
  if c.kind == "scratch":
    flags.scratch = c.source
  else:
    if c.arch is None and os.path.isfile(c.source):
      raise ValueError(f"{c.source} is a checkpoint file: say which architecture it holds, {c.source}@ARCH, ARCH "
                       f"one of {models.NAMES}")
    flags.model, flags.arch = c.source, c.arch
  return probe.config_from_args(flags, overrides)


def run_variables(c: Candidate, config: ml_collections.ConfigDict):
  """(flat backbone params, batch_stats) of a run's checkpoint, checked against the backbone ``config.model``
  builds (overrides included), so a mismatch is an error naming the paths, not a failure inside the network."""
  _, flat, stats, step = runs.variables_from_workdir(c.source, c.checkpoint)
  params = {p: v for p, v in flat.items() if p.startswith("backbone/")}
  stats = {p: v for p, v in stats.items() if p.startswith("backbone/")}
  module = models.build(config.model, None)   # the classifier without its head, as the feature cache builds it
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), models.example_batch(config.model.name)))
  for collection, got in (("params", params), ("batch_stats", stats)):
    expected = {k: v.shape for k, v in rules.flatten(shapes.get(collection, {})).items()}
    runs.check_params_fit(got, expected, f"step {step} ({collection})")
  print(f"run: {c.source} checkpoint step {step} ({c.checkpoint}): {len(params)} backbone tensors", flush=True)
  return params, rules.unflatten(stats)


# ================================================================================================================
# The scores of one candidate's training features.
# ================================================================================================================
def scores(feats: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> dict:
  """LogME on every training row; kNN and ridge fitted on 80% of each class, accuracy on the other 20%."""
  t0 = time.time()
  out = {"logme": logme(feats, labels, num_classes), "notes": []}
  out["logme_seconds"] = time.time() - t0
  try:
    fit, val = probe.stratified_split(labels, probe.VAL_FRACTION, seed)
  except ValueError as e:
    out["notes"].append(f"no kNN or ridge accuracy: {e}")
    out["knn"] = out["ridge"] = None
    return out
  x_fit, x_val = probe.standardise(feats[fit], feats[val])
  try:
    w, b, l2, inner_val = probe.fit_validated(probe.fit_ridge, x_fit, labels[fit], num_classes, probe.RIDGE_L2S,
                                              seed)
  except ValueError:   # the fit part is too small to hold out rows again: the probe's fixed few-shot L2
    l2, inner_val = probe.KSHOT_L2, None
    (w,), (b,) = probe.fit_ridge(x_fit, labels[fit], num_classes, [l2])
    out["notes"].append(f"ridge: the fit part ({len(fit)} examples) is too small to choose L2 on; fixed L2 {l2:g}")
  out["ridge"] = {"accuracy": probe.accuracy(x_val @ w + b, labels[val]), "l2": l2, "inner_val_accuracy": inner_val}
  ks = [k for k in probe.KNN_KS if k <= len(fit)]
  predictions = probe.knn_predict(feats[fit], labels[fit], feats[val], ks, num_classes)
  out["knn"] = {"accuracy": {k: float(np.mean(predictions[k] == labels[val])) for k in ks}}
  out["knn"]["k"] = KNN_K if KNN_K in ks else max(ks)
  out["fit_examples"], out["val_examples"] = len(fit), len(val)
  out["seconds"] = time.time() - t0
  return out


def headline(result: dict, score: str) -> float | None:
  """The number a candidate is ordered by for ``score`` ('logme', 'knn' or 'ridge'); None when not computed.
  ``result`` is one of ``rank``'s candidates, or the same read back from its JSON."""
  if score == "logme":
    return result["logme"]["logme"]
  if result[score] is None:
    return None
  if score == "ridge":
    return result["ridge"]["accuracy"]
  by_k = result["knn"]["accuracy"]   # keyed by k; by str(k) in a rank.json read back
  return by_k[result["knn"]["k"]] if result["knn"]["k"] in by_k else by_k[str(result["knn"]["k"])]


def order_by(results: list[dict], score: str) -> list[str]:
  """Candidates best first by ``score`` (ties keep the --models order); those without it are left out."""
  scored = [(headline(r, score), i, r["candidate"]) for i, r in enumerate(results) if headline(r, score) is not None]
  return [name for _, _, name in sorted(scored, key=lambda s: (-s[0], s[1]))]


# ================================================================================================================
# The ranking.
# ================================================================================================================
def _naming(c: Candidate, error: Exception, message: str) -> Exception:
  """``error`` as the CLI reports it, prefixed with the candidate it concerns."""
  return (FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError)(f"candidate {c.text!r}: {message}")


def rank(candidates: list[Candidate], args: argparse.Namespace, overrides: list[str]) -> dict:
  """Every candidate's config first (a bad one fails before any backbone runs), the data checked once, then per
  candidate: training features (cached), scores. Returns the results, candidates in LogME order."""
  t_start = time.time()
  configs = []
  for c in candidates:
    try:
      configs.append(candidate_config(c, args, overrides))
    except (ValueError, FileNotFoundError) as e:
      raise _naming(c, e, str(e).removeprefix("--model: ")) from None
  image = probe.image_data(configs[0].data)
  for c, config in zip(candidates, configs):
    inputs = models.family(config.model.name).inputs
    if inputs != ("image" if image else "text"):
      raise ValueError(f"candidate {c.text!r}: {config.model.name} takes {inputs}, but --data {args.data} is "
                       f"{'image' if image else 'text'} data")
  seed, batch_size = int(configs[0].seed), args.batch_size or int(configs[0].eval_batch_size)

  datasets = {}   # built once per tokenizer (images: once)

  def datasets_of(config):
    key = None if image else (config.model.get("architecture") or config.model.get("pretrained"))
    if key not in datasets:
      train_ds, eval_ds = probe.datasets_for(config)
      try:
        check_labels(train_ds.labels, train_ds.num_outputs)
      except ValueError as e:
        raise ValueError(f"--data {args.data}: training split {train_ds.name}: {e}") from None
      datasets[key] = train_ds, eval_ds
    return datasets[key]

  train_ds, _ = datasets_of(configs[0])   # bad data is refused before any backbone runs
  for config in configs[1:]:   # the resolution settled once (the same data config for every candidate)
    config.data.resolution = configs[0].data.resolution
  labels, num_classes = np.asarray(train_ds.labels), train_ds.num_outputs
  at = f" at {configs[0].data.resolution} px" if image else ""
  print(f"ranking {len(candidates)} candidate{'s' * (len(candidates) > 1)} on {train_ds.name}{at}: {len(labels)} "
        f"training examples, {num_classes} classes (the eval split is not used)", flush=True)
  results = []
  for i, (c, config) in enumerate(zip(candidates, configs)):
    print(f"[{i + 1}/{len(candidates)}] {c.text}", flush=True)
    t0 = time.time()
    try:
      variables = run_variables(c, config) if c.kind == "run" else None
      train_ds, _, feats = probe.features_for(config, args.workdir, batch_size, splits=("train",),
                                              datasets=datasets_of(config), variables=variables)
      x, reused = feats["train"]
      t_features = time.time() - t0
      result = scores(x, np.asarray(train_ds.labels), num_classes, seed)
    except (ValueError, FileNotFoundError) as e:
      raise _naming(c, e, str(e)) from None
    results.append({"candidate": c.text, "kind": c.kind, "model": config.model.to_dict(),
                    "checkpoint": c.checkpoint if c.kind == "run" else None, "feature_dim": int(x.shape[1]),
                    "features_reused": reused, **result,
                    "seconds": {"features": t_features, "scores": result.pop("seconds", None),
                                "total": time.time() - t0}})
  order = {score: order_by(results, score) for score in ("logme", "knn", "ridge")}
  by_name = {r["candidate"]: r for r in results}
  ranked = [{"rank": place, **by_name[name]} for place, name in enumerate(order["logme"], 1)]
  notes = [f"{r['candidate']}: {n}" for r in ranked for n in r.pop("notes")]
  if len(candidates) == 1:
    notes.append("one candidate: nothing to rank it against")
  unconverged = [r["candidate"] for r in ranked if not r["logme"]["converged"]]
  if unconverged:
    notes.append(f"LogME's fixed point did not settle in {LOGME_MAX_ITERATIONS} steps for {unconverged}")
  fit = next((r for r in ranked if r.get("fit_examples")), {})
  return {
      "data": configs[0].data.to_dict(), "train_examples": len(labels), "classes": num_classes,
      "settings": {"models": [c.text for c in candidates], "seed": seed, "val_fraction": probe.VAL_FRACTION,
                   "fit_examples": fit.get("fit_examples"), "val_examples": fit.get("val_examples"),
                   "knn_k": KNN_K, "knn_ks": list(probe.KNN_KS), "ridge_l2s": list(map(float, probe.RIDGE_L2S)),
                   "logme_tolerance": LOGME_TOLERANCE, "batch_size": batch_size, "workdir": args.workdir,
                   "overrides": overrides},
      "candidates": ranked, "order": order, "notes": notes, "wall_seconds": time.time() - t_start,
  }


# ================================================================================================================
# The table and the command line.
# ================================================================================================================
def table(results: dict) -> str:
  """One row per candidate, best LogME first (``probe.table``'s layout)."""
  def cell(value):
    return "-" if value is None else f"{value:.3f}"

  ks = {r["knn"]["k"] for r in results["candidates"] if r["knn"]}
  knn_title = f"kNN acc (k={ks.pop()})" if len(ks) == 1 else "kNN acc"
  lines = [("rank", "candidate", "LogME", knn_title, "ridge acc", "dim", "features", "time")]
  for r in results["candidates"]:
    lines.append((str(r["rank"]), r["candidate"], f"{r['logme']['logme']:.4f}", cell(headline(r, "knn")),
                  cell(headline(r, "ridge")), str(r["feature_dim"]), "reused" if r["features_reused"] else "extracted",
                  f"{r['seconds']['total']:.1f} s"))
  return probe.aligned(lines, results["notes"])


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m transfer.rank", description=__doc__.splitlines()[0])
  parser.add_argument("--model", action="append",
                      help="one candidate, as in --models (repeatable; for a path that holds a comma)")
  parser.add_argument("--models",
                      help="comma-separated candidates: pretrained sources (efficientnet-lite0, a Hugging Face "
                           "folder, PATH@ARCH for a checkpoint file), scratch:NAME (random init), "
                           "run:WORKDIR[@last|best|STEP] (a training run's backbone)")
  parser.add_argument("--data", required=True, help="digits, tfds:NAME (a TFDS text task or image dataset), a .npz "
                                                    "file or an image folder")
  parser.add_argument("--resolution", help="image side in pixels, or 'auto' (as transfer.probe: 'auto' for image "
                                           "folders, .npz and TFDS images; 32 for digits)")
  parser.add_argument("--workdir", default="runs/rank", help="holds the feature cache (WORKDIR/features)")
  parser.add_argument("--batch-size", type=int, help="feature-extraction batch (default config.eval_batch_size)")
  parser.add_argument("--seed", type=int, help="config.seed: scratch candidates' init and the held-out 20%% of "
                                               "train that kNN and ridge are scored on")
  parser.add_argument("--out", help="results JSON (default WORKDIR/rank.json)")
  return parser


def main(argv=None) -> int:
  args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    candidates = parse_candidates(args.models, args.model)
    if args.batch_size is not None and args.batch_size < 1:
      raise ValueError(f"--batch-size {args.batch_size}: expected a positive number")
    train._check_workdir(args.workdir)
    results = rank(candidates, args, overrides)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  s = results["settings"]
  split = (f"kNN (cosine) and ridge fitted on {s['fit_examples']}, accuracy on {s['val_examples']} held-out "
           f"training examples ({probe.VAL_FRACTION:.0%} of each class, seed {s['seed']})"
           if s["fit_examples"] else "no held-out part for kNN and ridge")
  print(f"\nranked by LogME, from the training split only ({results['train_examples']} examples, "
        f"{results['classes']} classes): LogME on all of them; {split}\n")
  print(table(results))
  out = args.out or os.path.join(args.workdir, "rank.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nresults: {out} ({results['wall_seconds']:.1f} s in all)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
