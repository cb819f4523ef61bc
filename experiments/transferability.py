"""Does ranking before fine-tuning pick the backbone that fine-tunes best? Kendall's tau between ``transfer.rank``'s
scores and the accuracy each candidate reaches when fine-tuned, on the digits task.

  python -m transfer.sweep --config configs/hymenoptera_efficientnet.py:res=96,steps=100 \\
      --workdir runs/hymenoptera_study --processes 2          # the source runs (README, "Transfer, measured")
  python experiments/transferability.py --sources runs/hymenoptera_study --workdir runs/transferability \\
      --out experiments/results/transferability

Candidates: six EfficientNet-Lite0 backbones of one architecture, so only what the weights learnt differs:
ImageNet's weights; a random init; and four runs of the hymenoptera study (ants vs bees photos at 96 px, seed 0):
fine-tuned from ImageNet on all photos and on 10 per class, and trained from scratch on all photos and on 10 per
class. Target: digits at 32 px with 10 labelled images per class (``configs/digits_efficientnet.py``).

1. Rank: ``python -m transfer.rank`` scores every candidate from the 100 training digits alone (LogME; kNN and
   ridge on a held-out 20% of them); the 360 test digits are never featurised.
2. Fine-tune: every candidate with the digits config's fine-tuning recipe (``mode=finetune,per_class=10``: 64
   steps, head 1e-2, backbone 0.3x), seeds 0-2. A run's weights reach ``config.model.pretrained`` the way a user's
   would: ``python -m transfer.export --format timm`` writes the run as a timm safetensors file, which loads as a
   checkpoint file (``--config.model.padding=same``: the file's keys fit two networks, so the padding is said).
   The random-init candidate fine-tunes from the config's seeded init (a different init per seed).
3. Kendall's tau-b between each score and the mean test accuracy over seeds; and, for the spread, tau against each
   seed's accuracies alone.

Written to ``--out``: ``rank.json`` (transfer.rank's output), ``finetune.csv`` (every run), ``tau.json`` and
``score_vs_accuracy.png`` (a panel per score: the candidates' score against their mean fine-tuned accuracy).
Every step is skipped when its output exists (rerun to resume).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transfer import rank as rank_lib  # noqa: E402
from transfer.sweep import markdown_table, mean_std  # noqa: E402

# name: a hymenoptera-study point (None: not a run)
SOURCE_RUNS = {
    "imagenet": None,
    "random-init": None,
    "ants-bees-finetune-all": "per_class=0,mode=finetune,seed=0",
    "ants-bees-finetune-10": "per_class=10,mode=finetune,seed=0",
    "ants-bees-scratch-all": "per_class=0,mode=scratch,seed=0",
    "ants-bees-scratch-10": "per_class=10,mode=scratch,seed=0",
}
SEEDS = (0, 1, 2)
TARGET = "configs/digits_efficientnet.py:mode=finetune,per_class=10"
SCORES = ("logme", "knn", "ridge")


def kendall_tau_b(x: list[float], y: list[float]) -> float:
  """Kendall's tau-b: (concordant - discordant) pairs over the geometric mean of the pairs untied in x and in y."""
  concordant = discordant = tied_x = tied_y = 0
  for i, j in itertools.combinations(range(len(x)), 2):
    dx, dy = x[i] - x[j], y[i] - y[j]
    if dx == 0 and dy == 0:
      continue
    if dx == 0:
      tied_x += 1
    elif dy == 0:
      tied_y += 1
    elif (dx > 0) == (dy > 0):
      concordant += 1
    else:
      discordant += 1
  denominator = ((concordant + discordant + tied_x) * (concordant + discordant + tied_y)) ** 0.5
  return (concordant - discordant) / denominator if denominator else float("nan")


def run(command: list[str], workdir: str) -> None:
  """A subprocess from the project root; the runs share one XLA compilation cache (WORKDIR/.xla_cache: every
  fine-tune has the same shapes, so it compiles once; a hit loads the same executable, results are unchanged)."""
  print("$ " + " ".join(command), flush=True)
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, ".xla_cache"), **os.environ}
  subprocess.run(command, cwd=ROOT, check=True, env=env)


def rank_candidates(sources: str, workdir: str) -> dict[str, str]:
  """{name: transfer.rank candidate}. A sweep point's folder name holds commas, which separate --models entries,
  so each run is named through a link WORKDIR/sources/NAME."""
  out = {}
  for name, point in SOURCE_RUNS.items():
    if point is None:
      out[name] = "efficientnet-lite0" if name == "imagenet" else "scratch:efficientnet-lite0"
      continue
    link = os.path.join(workdir, "sources", name)
    if not os.path.islink(link):
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.join(sources, point), link)
    out[name] = f"run:{link}"
  return out


def pretrained_flags(name: str, sources: str, workdir: str) -> list[str]:
  """The fine-tuning run's --config overrides that start it from candidate ``name``."""
  point = SOURCE_RUNS[name]
  if name == "imagenet":
    return []   # the digits config's own pretrained weights
  if point is None:
    return ["--config.model.pretrained=None"]
  exported = os.path.join(workdir, "exports", name)
  if not os.path.exists(os.path.join(exported, "model.safetensors")):
    shutil.rmtree(exported, ignore_errors=True)
    run([sys.executable, "-m", "transfer.export", "--workdir", os.path.join(sources, point), "--out", exported,
         "--format", "timm"], workdir)
  return [f"--config.model.pretrained={os.path.join(exported, 'model.safetensors')}", "--config.model.padding=same"]


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(SCORES), figsize=(4.4 * len(SCORES), 3.8))
  for ax, score in zip(axes, SCORES):
    for i, r in enumerate(rows):
      ax.errorbar(r[score], r["accuracy_mean"], yerr=r["accuracy_std"] or 0, marker="o", capsize=3,
                  color=f"C{i}", label=r["candidate"])
    ax.set_xlabel({"logme": "LogME (per example)", "knn": "kNN accuracy (k=20, held-out 20% of train)",
                   "ridge": "ridge accuracy (held-out 20% of train)"}[score], fontsize=9)
    ax.set_ylabel("fine-tuned test accuracy (3 seeds)")
    ax.set_title(f"Kendall tau-b = {r_tau(rows, score):+.2f}", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle("Six EfficientNet-Lite0 backbones ranked on 100 digits, then fine-tuned on them", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def r_tau(rows: list[dict], score: str) -> float:
  return kendall_tau_b([r[score] for r in rows], [r["accuracy_mean"] for r in rows])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sources", required=True, help="the hymenoptera study's sweep folder")
  parser.add_argument("--workdir", default="runs/transferability")
  parser.add_argument("--out", default="experiments/results/transferability")
  args = parser.parse_args(argv)
  sources, workdir = os.path.abspath(args.sources), os.path.abspath(args.workdir)
  os.makedirs(args.out, exist_ok=True)
  missing = [p for p in SOURCE_RUNS.values() if p and not os.path.exists(os.path.join(sources, p, "results.json"))]
  if missing:
    parser.error(f"--sources {args.sources}: runs not finished: {missing} (run the hymenoptera study first)")

  # 1. Rank, from the training digits alone.
  candidates = rank_candidates(sources, workdir)
  rank_json = os.path.join(workdir, "rank.json")
  if not os.path.exists(rank_json):
    run([sys.executable, "-m", "transfer.rank", "--models", ",".join(candidates.values()), "--data", "digits",
         "--resolution", "32", "--workdir", workdir, "--seed", "0", "--out", rank_json,
         "--config.data.train_per_class=10"], workdir)
  ranked = json.load(open(rank_json))
  by_candidate = {r["candidate"]: r for r in ranked["candidates"]}
  shutil.copyfile(rank_json, os.path.join(args.out, "rank.json"))

  # 2. Fine-tune every candidate, seeds 0-2.
  runs_rows = []
  for name in SOURCE_RUNS:
    flags = pretrained_flags(name, sources, workdir)
    for seed in SEEDS:
      run_dir = os.path.join(workdir, "finetune", f"{name},seed={seed}")
      if not os.path.exists(os.path.join(run_dir, "results.json")):
        run([sys.executable, "-m", "transfer.train", "--config", TARGET, "--workdir", run_dir,
             f"--config.seed={seed}", *flags], workdir)
      results = json.load(open(os.path.join(run_dir, "results.json")))
      runs_rows.append({"candidate": name, "seed": seed, "accuracy": results["eval/accuracy"],
                        "wall_seconds": results["wall_seconds"]})
  with open(os.path.join(args.out, "finetune.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(runs_rows[0]))
    writer.writeheader()
    writer.writerows(runs_rows)

  # 3. Kendall's tau between each score and the fine-tuned accuracy.
  rows = []
  for name, candidate in candidates.items():
    accuracies = [r["accuracy"] for r in runs_rows if r["candidate"] == name]
    mean, std = mean_std(accuracies)
    rows.append({"candidate": name, **{s: rank_lib.headline(by_candidate[candidate], s) for s in SCORES},
                 "accuracy_mean": mean, "accuracy_std": std, "accuracies": accuracies})
  tau = {s: r_tau(rows, s) for s in SCORES}
  per_seed = {s: [kendall_tau_b([r[s] for r in rows], [r["accuracies"][i] for r in rows])
                  for i in range(len(SEEDS))] for s in SCORES}
  with open(os.path.join(args.out, "tau.json"), "w") as f:
    json.dump({"tau_b_vs_mean_accuracy": tau, "tau_b_vs_each_seed": per_seed, "candidates": rows,
               "target": TARGET, "seeds": list(SEEDS)}, f, indent=2)
  plot(rows, os.path.join(args.out, "score_vs_accuracy.png"))
  print(markdown_table(["candidate", "LogME", "kNN", "ridge", "fine-tuned accuracy"],
                       [[r["candidate"], f"{r['logme']:.3f}", f"{r['knn']:.3f}", f"{r['ridge']:.3f}",
                         f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}"]
                        for r in sorted(rows, key=lambda r: -r["logme"])]))
  print("\nKendall tau-b against the mean accuracy: " + ", ".join(f"{s} {t:+.2f}" for s, t in tau.items()))
  print("against each seed's: " + "; ".join(f"{s} " + ", ".join(f"{t:+.2f}" for t in v)
                                            for s, v in per_seed.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
