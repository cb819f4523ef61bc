"""Config-file sweeps: ``python -m transfer.sweep --config configs/NAME.py[:ARGS] --workdir DIR``.

A config file may define ``sweep(arg) -> list[dict]`` beside ``get_config(arg)``; ``arg`` is the ARGS the sweep
was launched with ('' when none). Each dict is a point: a key ``"arg:NAME"`` sets the config file's ARGS key NAME
(merged over the launch's ARGS), any other key is a config field path (``"seed"``, ``"schedule.lr"``) whose value
replaces the config's. ``product``, ``zipped`` and ``seeds`` below build the lists; lists concatenate.

Reads top to bottom: the helpers config files import, building and checking every point (all before any run, so a
typo fails in seconds), running each point as an ordinary ``python -m transfer.train`` run in ``DIR/<point
name>``, in its own process (a crash or a leak stays there; a finished point is reused, an interrupted one resumes
from its checkpoints), then the summary tables and plots, then the command line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from transfer import config_check

ARG_PREFIX = "arg:"
RESULTS, ERROR_FILE, LOG_FILE = "results.json", "sweep_error.txt", "sweep.log"
# What the points of one sweep share: XLA's compilation cache (points of one shape, seeds say, compile once; a hit
# loads the same executable, so results are unchanged) and the feature cache (a frozen backbone's features, keyed by
# model, data and weights, so every seed of a frozen point reuses the first one's), both in DIR.
XLA_CACHE, FEATURES = ".xla_cache", "features"
ERROR_LINES = 20   # the last lines of a failed point's log kept in its sweep_error.txt


# ================================================================================================================
# Points: the helpers a config file's sweep() uses.
# ================================================================================================================
def _axes(axes: dict) -> dict[str, list]:
  for name, values in axes.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"sweep axis {name!r}: expected a non-empty list of values, got {values!r}")
  return {name: list(values) for name, values in axes.items()}


def product(**axes) -> list[dict]:
  """Every combination of the axes, the first axis outermost: ``product(**{"arg:mode": ["a", "b"], "seed": [0,
  1]})`` -> 4 points. Field paths hold dots, so they are passed as ``**{"schedule.lr": [...]}``."""
  axes = _axes(axes)
  return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def zipped(**axes) -> list[dict]:
  """The i-th values of every axis together (the lists have one length): ``zipped(**{"schedule.lr": [0.1, 0.01],
  "batch_size": [256, 32]})`` -> 2 points."""
  axes = _axes(axes)
  lengths = {name: len(values) for name, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped: the axes have different lengths {lengths}")
  return [dict(zip(axes, combo)) for combo in zip(*axes.values())]


def seeds(points: list[dict], n: int) -> list[dict]:
  """Every point repeated with ``seed`` = 0..n-1 (the seed varies fastest)."""
  if any("seed" in p for p in points):
    raise ValueError("seeds: a point already sets 'seed'")
  return [{**p, "seed": s} for p in points for s in range(n)]


# ================================================================================================================
# Names: a point's directory is readable from its overrides.
# ================================================================================================================
def display_key(key: str) -> str:
  """``arg:mode`` -> ``mode``; field paths as written."""
  return key[len(ARG_PREFIX):] if key.startswith(ARG_PREFIX) else key


def format_value(value) -> str:
  """Compact: 0.001 -> '0.001', 3e-05 -> '3e-05', 30.0 -> '30'."""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def point_name(point: dict) -> str:
  """``mode=frozen,per_class=10,seed=1``: the keys in the point's order; characters a directory name should not
  hold become '_'; a very long name is cut and given a hash of the whole."""
  text = ",".join(f"{display_key(k)}={format_value(v)}" for k, v in point.items()) or "base"
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
  if len(name) > 120:
    name = f"{name[:100]}..{hashlib.sha1(text.encode()).hexdigest()[:10]}"
  return name


# ================================================================================================================
# Building and checking: every point's config loads, its overrides name existing fields, it validates.
# ================================================================================================================
@dataclasses.dataclass
class Point:
  name: str
  overrides: dict   # as sweep() gave it
  config: Any = None

  @property
  def fields(self) -> dict:
    """The swept values by display key (``mode``, ``schedule.lr``, ``seed``)."""
    return {display_key(k): v for k, v in self.overrides.items()}


def split_spec(spec: str) -> tuple[str, str | None]:
  """``configs/X.py:ARGS`` -> (path, ARGS or None), as ml_collections' --config flag splits it."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_module(path: str):
  """The config file as a module (a fresh load each call: a rewritten file is read again)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: not a file")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ImportError(f"{path} does not load: {type(e).__name__}: {e}") from e
  return module


def merged_args(base: str | None, point: dict) -> str | None:
  """The ARGS for ``get_config``: the launch's, then the point's ``arg:`` keys. Appending is enough, because
  ``config_base.config_args`` (the one parser) lets a later key=value win."""
  items = [f"{display_key(k)}={v}" for k, v in point.items() if k.startswith(ARG_PREFIX)]
  if not items:
    return base
  return ",".join(([base] if base else []) + items)


def build_config(module, base_arg: str | None, point: Point, log: Callable[[str], None] = lambda msg: None):
  """The point's config: ``get_config`` on the merged ARGS, the field overrides, the command line's length rule
  (a swept total_steps replaces the file's total_epochs), ``config_check.validate``. Errors name the point."""
  where = f"point {point.name!r}"
  for key, value in point.overrides.items():
    if key.startswith(ARG_PREFIX) and ("," in str(value) or "," in key):
      raise ValueError(f"{where}: {key}={value!r}: an ARGS value cannot hold ','")
  arg = merged_args(base_arg, point.overrides)
  try:
    config = module.get_config(*([] if arg is None else [arg]))
  except Exception as e:   # the config file's own error (an unknown ARGS key, a bad value): name the point
    raise ValueError(f"{where}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from None
  fields = [k for k in point.overrides if not k.startswith(ARG_PREFIX)]
  for path in fields:
    node, leaf = config_check.field_holder(config, path, f"{where}: no config field {path!r}")
    try:
      node[leaf] = point.overrides[path]
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: config.{path}={point.overrides[path]!r}: {e}") from None
  try:
    config_check.resolve_lengths(config, fields, log)
    config_check.validate(config)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return config


def plan(spec: str, *, build: bool = True) -> tuple[Any, str | None, list[Point]]:
  """(module, launch ARGS, points): every point named and, with ``build``, its config built and checked. Every
  problem is reported at once; two points that share a directory are refused."""
  path, base_arg = split_spec(spec)
  module = load_module(path)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"--config {path}: defines no sweep(arg) function: add one returning a list of points "
                     f"(dicts of overrides; see transfer/sweep.py), or launch one run with python -m transfer.train")
  try:
    raw = module.sweep(base_arg or "")
  except Exception as e:   # a helper's error (zipped lengths) or the file's own
    raise ValueError(f"--config {path}: sweep({base_arg or ''!r}) failed: {type(e).__name__}: {e}") from None
  if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(p, dict) for p in raw):
    raise ValueError(f"--config {path}: sweep() must return a non-empty list of dicts, got {raw!r:.200}")
  for p in raw:
    if not all(isinstance(k, str) and k not in ("", ARG_PREFIX) for k in p):
      raise ValueError(f"--config {path}: sweep() point {p!r}: each key is a config field path or 'arg:NAME'")
  points = [Point(point_name(p), dict(p)) for p in raw]
  errors, seen = [], {}
  for i, p in enumerate(points):
    if p.name in seen:
      errors.append(f"points {seen[p.name]} and {i} both resolve to the directory {p.name!r}: "
                    f"{points[seen[p.name]].overrides} and {p.overrides}")
    seen.setdefault(p.name, i)
    if len(p.fields) < len(p.overrides):
      errors.append(f"point {p.name!r}: a field and an ARGS key have the same name; rename one")
  if build and not errors:
    for p in points:
      try:
        p.config = build_config(module, base_arg, p)
      except ValueError as e:
        errors.append(str(e))
  if errors:
    raise ValueError(f"{len(errors)} problem(s) in the sweep of {spec}, nothing run:\n  " + "\n  ".join(errors))
  return module, base_arg, points


# ================================================================================================================
# Running: each point in its own subprocess (python -m transfer.train, this file's get_config giving the point's
# config), output to its sweep.log.
# ================================================================================================================
def read_results(run_dir: str) -> dict | None:
  """A finished run's results.json, or None (absent, or cut off by a kill: the point runs again)."""
  try:
    with open(os.path.join(run_dir, RESULTS)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def final_metric(run_dir: str, results: dict) -> str:
  """'eval/accuracy 0.9083': the task's main metric on the eval split (measured once, at the run's selected
  checkpoint)."""
  name = next((k for k in results if k.startswith("eval/")), None)
  value = results.get(name)
  return f"{name} {value:.4f}" if isinstance(value, (int, float)) else "no eval metric"


class Progress:
  """One line per point start and finish, numbered, from any thread."""

  def __init__(self, total: int):
    self.total, self.lock = total, threading.Lock()

  def line(self, index: int, text: str) -> None:
    with self.lock:
      print(f"[{index + 1}/{self.total}] {text}", flush=True)


def run_point(spec: str, workdir: str, point: Point, index: int, progress: Progress) -> str:
  """Runs one point to its end in a subprocess; returns 'done' or 'failed' (with DIR/NAME/sweep_error.txt)."""
  run_dir = os.path.join(workdir, point.name)
  os.makedirs(run_dir, exist_ok=True)
  error_path, log_path = os.path.join(run_dir, ERROR_FILE), os.path.join(run_dir, LOG_FILE)
  if os.path.exists(error_path):
    os.remove(error_path)
  path, arg = split_spec(spec)   # the file by its absolute path: the command reruns from anywhere
  request = json.dumps({"config": os.path.abspath(path) + ("" if arg is None else f":{arg}"), "point": point.name,
                        "features": os.path.abspath(os.path.join(workdir, FEATURES))})
  cmd = [sys.executable, "-m", "transfer.train", "--config", f"{os.path.abspath(__file__)}:{request}",
         "--workdir", run_dir]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.abspath(os.path.join(workdir, XLA_CACHE)), **os.environ,
         "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  progress.line(index, f"start {point.name} (log: {log_path})")
  t0 = time.time()
  with open(log_path, "a") as log:   # appended: a resumed point keeps its earlier attempts' output
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
    log.flush()
    start = log.tell()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  seconds = time.time() - t0
  results = read_results(run_dir)
  if code == 0 and results is not None:
    progress.line(index, f"done  {point.name}: {final_metric(run_dir, results)}, {seconds:.0f} s")
    return "done"
  with open(log_path) as f:
    f.seek(start)
    tail = f.read().splitlines()[-ERROR_LINES:]
  with open(error_path, "w") as f:
    f.write(f"exit code {code} after {seconds:.0f} s; the last lines of {log_path}:\n" + "\n".join(tail) + "\n")
  last = next((line for line in reversed(tail) if line.strip()), f"exit code {code}")
  progress.line(index, f"FAILED {point.name} after {seconds:.0f} s: {last.strip()[:200]} (see {error_path})")
  return "failed"


def run_all(spec: str, workdir: str, points: list[Point], processes: int) -> dict[str, str]:
  """{name: 'reused' | 'done' | 'failed'}: finished points skipped, the rest run, up to ``processes`` at once."""
  progress, status, todo = Progress(len(points)), {}, []
  for i, p in enumerate(points):
    run_dir = os.path.join(workdir, p.name)
    if (results := read_results(run_dir)) is not None:
      progress.line(i, f"skip  {p.name}: finished earlier, {final_metric(run_dir, results)}")
      status[p.name] = "reused"
    else:
      todo.append((i, p))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=processes)
  try:
    futures = {pool.submit(run_point, spec, workdir, p, i, progress): p.name for i, p in todo}
    for future in concurrent.futures.as_completed(futures):
      status[futures[future]] = future.result()
  finally:   # Ctrl-C: no new point starts; the running ones got the signal too and stop resumable
    pool.shutdown(wait=True, cancel_futures=True)
  return status


def get_config(arg: str):
  """Makes this file a config file for ``python -m transfer.train``: ``arg`` is ``{"config": SPEC, "point": NAME}``
  (JSON) and the config is that point's, rebuilt from the config file as the sweep checked it. So each point is
  an ordinary trainer run, with the trainer's messages and exit codes, and the command at the top of its sweep.log
  reruns it by hand. ``features`` (the sweep's shared feature cache) is used unless the config names its own."""
  request = json.loads(arg)
  module, base_arg, points = plan(request["config"], build=False)
  point = next((p for p in points if p.name == request["point"]), None)
  if point is None:
    raise ValueError(f"no point {request['point']!r} in the sweep of {request['config']}")
  config = build_config(module, base_arg, point, print)
  if request.get("features") and not config.get("feature_cache_dir"):
    config.feature_cache_dir = request["features"]
  return config


# ================================================================================================================
# Summary: one row per point (summary.csv, summary.md), mean ± std over seeds, plots.
# ================================================================================================================
def markdown_table(header: list[str], rows: list[list]) -> str:
  """The one table formatter: markdown with aligned columns (readable printed, rendered on GitHub)."""
  cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def collect(workdir: str, points: list[Point]) -> tuple[list[dict], list[str], list[str]]:
  """(rows, swept field names, metric columns). A row: point, the swept fields, status (ok, failed, not run),
  every eval/* and val/* of results.json (both at the checkpoint the run selected on validation, if it had a
  validation split), selected_step, wall_seconds, trainable_params."""
  fields = list(dict.fromkeys(k for p in points for k in p.fields))
  rows, metrics = [], []
  for p in points:
    run_dir = os.path.join(workdir, p.name)
    results = read_results(run_dir)
    status = "ok" if results is not None else "failed" if os.path.exists(os.path.join(run_dir, ERROR_FILE)) \
        else "not run"
    row = {"point": p.name, **{f: p.fields.get(f) for f in fields}, "status": status}
    if results is not None:
      row.update({k: v for k, v in results.items() if k.startswith(("eval/", "val/"))})
      row.update(selected_step=results.get("selected_step"), wall_seconds=results.get("wall_seconds"),
                 trainable_params=results.get("trainable_params"))
    metrics += [k for k in row if k.startswith(("eval/", "val/")) and k not in metrics]
    rows.append(row)
  return rows, fields, sorted(m for m in metrics if m.startswith("eval/")) + sorted(m for m in metrics
                                                                                    if m.startswith("val/"))


def _cell(value, column: str, fields: list[str]) -> str:
  if value is None:
    return ""
  if isinstance(value, float) and column not in fields:
    return f"{value:.1f}" if column == "wall_seconds" else f"{value:.4f}"
  return f"{value:,}" if column == "trainable_params" else format_value(value)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: list[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation; None for one value)."""
  n = len(values)
  mean = sum(values) / n
  return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def seed_groups(rows: list[dict], fields: list[str]) -> dict[tuple, list[dict]]:
  """The finished rows grouped by every swept field but ``seed``: {(value, ...): rows}, in sweep order."""
  others = [f for f in fields if f != "seed"]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row["status"] == "ok":
      groups.setdefault(tuple(format_value(row[f]) for f in others), []).append(row)
  return groups


def write_summary(workdir: str, spec: str, rows: list[dict], fields: list[str], metrics: list[str]) -> str:
  """Writes DIR/summary.csv and DIR/summary.md; returns the markdown."""
  columns = ["point", *fields, "status", *metrics, "selected_step", "wall_seconds", "trainable_params"]
  with open(os.path.join(workdir, "summary.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  md = [f"# Sweep of {spec}", "", f"{len(rows)} points; each an ordinary run in {workdir}/<point>.", "",
        markdown_table(columns, [[_cell(r.get(c), c, fields) for c in columns] for r in rows])]
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    md += ["", "Failed (the last lines of each log are in its sweep_error.txt):", ""]
    md += [f"- `{r['point']}`: {os.path.join(workdir, r['point'], ERROR_FILE)}" for r in failed]
  if "seed" in fields:
    others = [f for f in fields if f != "seed"]
    table = []
    for key, group in seed_groups(rows, fields).items():
      cells = []
      for m in metrics:
        values = [r[m] for r in group if _is_number(r.get(m))]
        mean, std = mean_std(values) if values else (None, None)
        cells.append("" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
      table.append([*key, len(group), *cells])
    md += ["", "## Over seeds: mean ± sample std (runs: how many finished)", "",
           markdown_table([*others, "runs", *metrics], table)]
  text = "\n".join(md) + "\n"
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(text)
  return text


def log_scale(values) -> bool:
  """A field whose positive values span 10x or more (a learning rate) is plotted on a log axis."""
  return all(v > 0 for v in values) and max(values) >= 10 * min(values)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def write_plots(workdir: str, rows: list[dict], fields: list[str], metrics: list[str]) -> list[str]:
  """DIR/plots/<metric>_vs_<field>.png for each final eval metric against each numeric swept field (one line per
  combination of the other fields, mean over seeds with sample-std error bars), and learning_curves.png (every
  point's train/loss and eval metric against step). Returns the files written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from transfer import metrics as metrics_lib

  out, written = os.path.join(workdir, "plots"), []
  os.makedirs(out, exist_ok=True)
  done = [r for r in rows if r["status"] == "ok"]
  numeric = [f for f in fields if f != "seed" and all(_is_number(r[f]) for r in done)
             and len({r[f] for r in done}) > 1]

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=100)
    plt.close(fig)
    written.append(os.path.join(out, name))

  for metric in (m for m in metrics if m.startswith("eval/")):
    for field in numeric:
      others = [f for f in fields if f not in (field, "seed")]
      fig, ax = plt.subplots(figsize=(6, 4))
      lines: dict[tuple, dict] = {}
      for r in done:
        if _is_number(r.get(metric)):
          line = lines.setdefault(tuple(format_value(r[f]) for f in others), {})
          line.setdefault(r[field], []).append(r[metric])
      for key, by_x in lines.items():
        xs = sorted(by_x)
        stats = [mean_std(by_x[x]) for x in xs]
        label = ",".join(f"{f}={v}" for f, v in zip(others, key)) or "all"
        yerr = [s or 0.0 for _, s in stats] if "seed" in fields else None
        ax.errorbar(xs, [m for m, _ in stats], yerr=yerr, marker="o", capsize=3, label=label)
      if log_scale([r[field] for r in done]):
        ax.set_xscale("log")
      ax.set_xlabel(field)
      ax.set_ylabel(metric + (" (mean ± std over seeds)" if "seed" in fields else ""))
      ax.grid(alpha=0.3)
      ax.legend(fontsize="small")
      save(fig, f"{_slug(metric)}_vs_{_slug(field)}.png")

  # The right panel: the evaluations during training (validation, if the runs had a validation split).
  main = next((m for m in metrics if m.startswith("eval/")), "eval/accuracy").split("/", 1)[1]
  eval_metric = f"val/{main}" if any(m.startswith("val/") for m in metrics) else f"eval/{main}"
  fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.get_cmap("tab20")
  for i, r in enumerate(done):
    history = metrics_lib.read(os.path.join(workdir, r["point"]))
    for ax, key in ((loss_ax, "train/loss"), (eval_ax, eval_metric)):
      steps = [(h["step"], h[key]) for h in history if key in h]
      if steps:
        ax.plot(*zip(*steps), marker="o" if len(steps) < 5 else None, markersize=3, color=colors(i % 20),
                label=r["point"])
  for ax, key in ((loss_ax, "train/loss"), (eval_ax, eval_metric or "eval")):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  loss_ax.legend(fontsize="x-small")
  save(fig, "learning_curves.png")
  return written


# ================================================================================================================
# Command line.
# ================================================================================================================
def select(points: list[Point], only: str | None) -> list[Point]:
  """``--only NAME,NAME``: names hold commas themselves, so the longest known name is taken at each position."""
  if not only:
    return points
  names, tokens, chosen, i = {p.name for p in points}, only.split(","), set(), 0
  while i < len(tokens):
    j = next((j for j in range(len(tokens), i, -1) if ",".join(tokens[i:j]) in names), None)
    if j is None:
      raise ValueError(f"--only {only!r}: {','.join(tokens[i:])!r} does not start with a point's name; the points: "
                       f"{sorted(names)}")
    chosen.add(",".join(tokens[i:j]))
    i = j
  return [p for p in points if p.name in chosen]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m transfer.sweep", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:ARGS], a file that defines sweep(arg)")
  parser.add_argument("--workdir", required=True, help="each point runs in WORKDIR/<point name>")
  parser.add_argument("--only", help="run only these points (their names, comma-separated)")
  parser.add_argument("--dry-run", action="store_true", help="build and check every point, print them, run none")
  parser.add_argument("--processes", type=int, default=1, help="points run at once (default 1)")
  return parser


def main(argv=None) -> int:
  """Exit codes: 2 for a bad command line or a config file that does not load, 1 for a sweep whose points do not
  check (nothing run) or a point that failed, 130 on Ctrl-C (rerunning resumes), 0 when every point finished."""
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  if args.processes < 1:
    print("error in the command line: --processes must be >= 1", file=sys.stderr)
    return 2
  try:
    _, _, points = plan(args.config)
    selected = select(points, args.only)
  except (FileNotFoundError, ImportError) as e:
    print(f"error in the command line: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  workdir = args.workdir
  table = [[i, p.name, os.path.join(workdir, p.name),
            "finished" if read_results(os.path.join(workdir, p.name)) is not None else "to run"]
           for i, p in enumerate(selected)]
  print(f"{len(selected)} of {len(points)} points checked ({args.config}):\n"
        + markdown_table(["#", "point", "directory", "state"], table), flush=True)
  if args.dry_run:
    print("--dry-run: nothing run")
    return 0
  from transfer import workdir_lock
  t0 = time.time()
  try:
    os.makedirs(workdir, exist_ok=True)
    workdir_lock.acquire(workdir)   # one sweep per DIR (each point's run locks DIR/<point> itself)
    status = run_all(args.config, workdir, selected, args.processes)
    rows, fields, metrics = collect(workdir, points)
    print("\n" + write_summary(workdir, args.config, rows, fields, metrics))
    try:
      plots = write_plots(workdir, rows, fields, metrics)
      print(f"plots: {len(plots)} in {os.path.join(workdir, 'plots')}")
    except ImportError as e:   # matplotlib is in install_requires; a bare environment still gets its tables
      print(f"note: no plots ({e}); pip install matplotlib")
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume (finished points are reused)", file=sys.stderr)
    return 130
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:
    workdir_lock.release_all()
  failed = [name for name, s in status.items() if s == "failed"]
  print(f"summary: {os.path.join(workdir, 'summary.md')}, {os.path.join(workdir, 'summary.csv')}; "
        f"{len(selected) - len(failed)} of {len(selected)} points finished in {time.time() - t0:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
