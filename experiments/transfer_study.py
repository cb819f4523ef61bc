"""Pretrained vs scratch vs label budget, source-target similarity, and probe vs LoRA vs fine-tuning at equal
steps: one table and three figures from the summary.csv files of three sweeps (each run by ``transfer.sweep``).

  python -m transfer.sweep --config configs/digits_efficientnet.py --workdir runs/demo --processes 2
  python -m transfer.sweep --config configs/hymenoptera_efficientnet.py:res=96,steps=100 \\
      --workdir runs/hymenoptera_study --processes 2
  python -m transfer.sweep --config configs/minilm_sst2_lora.py --workdir runs/sst2_study --processes 2
  python experiments/transfer_study.py --digits runs/demo --hymenoptera runs/hymenoptera_study \\
      --sst2 runs/sst2_study --out experiments/results/transfer_study

Each sweep has every mode at every label budget for seeds 0-2. Written to ``--out``:
  - ``accuracy.csv``: dataset, budget, mode, n seeds, test accuracy mean and sample std;
  - ``gain_over_scratch.csv``: per dataset, budget and pretrained mode, the accuracy gain over the same network
    trained from scratch, paired by seed (the seed is the only thing that differs between the paired runs'
    configs besides the initialisation), mean and sample std of the paired differences;
  - ``accuracy_vs_budget.png``: one panel per dataset, accuracy against the label budget, a line per mode;
  - ``gain_over_scratch.png``: the gains as bars, natural photos next to 8x8 digits next to text;
  - ``cost.png`` (SST-2): accuracy against wall time and against trainable parameters, per mode and budget;
  - ``sweeps/<dataset>.csv``: each sweep's summary.csv as read (the per-run rows behind every figure);
  - ``summary.md``: the tables, for the README.
Modes are named alike across datasets: the SST-2 config's ``probe`` is ``frozen`` (the new head on a frozen
backbone's features) and its ``full`` is ``finetune``. Nothing here chooses anything: every figure is the sweeps'
reported (test or dev) accuracy at the last step, so no selection touched those splits.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transfer.sweep import markdown_table, mean_std  # noqa: E402

MODES = ("scratch", "frozen", "lora", "finetune")               # plotting and table order
RENAME = {"probe": "frozen", "full": "finetune"}
# dataset: (label-budget column of its sweep, what the budget counts, the budget that means "all", its label)
DATASETS = {
    "digits": ("per_class", "labelled images per class", None, "digits 8x8 (EfficientNet-Lite0, 32 px)"),
    "hymenoptera": ("per_class", "labelled photos per class", 122, "ants vs bees (EfficientNet-Lite0, 96 px)"),
    "sst2": ("n", "labelled sentences", None, "SST-2 (all-MiniLM-L6-v2)"),
}
METRIC = "eval/accuracy"
HELD_OUT = {"digits": "test (360)", "hymenoptera": "val folder (153)", "sst2": "dev (872)"}   # the reported split


def read_sweep(path: str, dataset: str) -> list[dict]:
  """The finished rows of one sweep's summary.csv (a folder holding one, or the file), with ``mode``, ``budget``
  (0 = all becomes the dataset's count), ``seed``, accuracy, wall seconds and trainable parameters."""
  path = os.path.join(path, "summary.csv") if os.path.isdir(path) else path
  budget_field, _, everything, _ = DATASETS[dataset]
  rows = []
  with open(path) as f:
    for row in csv.DictReader(f):
      if row["status"] != "ok":
        continue
      budget = int(row[budget_field])
      if budget == 0:
        if everything is None:
          raise ValueError(f"{path}: {budget_field}=0 (all) has no count for {dataset}")
        budget = everything
      rows.append({"dataset": dataset, "mode": RENAME.get(row["mode"], row["mode"]), "budget": budget,
                   "seed": int(row["seed"]), "accuracy": float(row[METRIC]),
                   "wall_seconds": float(row["wall_seconds"]), "trainable_params": int(row["trainable_params"])})
  if not rows:
    raise ValueError(f"{path}: no finished runs")
  return rows


def grouped(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(r[k] for k in keys), []).append(r)
  return out


def accuracy_table(rows: list[dict]) -> list[dict]:
  table = []
  for (dataset, budget, mode), group in sorted(grouped(rows, "dataset", "budget", "mode").items(),
                                               key=lambda kv: (list(DATASETS).index(kv[0][0]), kv[0][1],
                                                               MODES.index(kv[0][2]))):
    mean, std = mean_std([r["accuracy"] for r in group])
    wall, _ = mean_std([r["wall_seconds"] for r in group])
    table.append({"dataset": dataset, "budget": budget, "mode": mode, "seeds": len(group), "accuracy_mean": mean,
                  "accuracy_std": std, "wall_seconds_mean": wall, "trainable_params": group[0]["trainable_params"]})
  return table


def gain_table(rows: list[dict]) -> list[dict]:
  """Pretrained mode minus scratch, paired by (dataset, budget, seed)."""
  scratch = {(r["dataset"], r["budget"], r["seed"]): r["accuracy"] for r in rows if r["mode"] == "scratch"}
  table = []
  for (dataset, budget, mode), group in grouped(rows, "dataset", "budget", "mode").items():
    if mode == "scratch":
      continue
    diffs = [r["accuracy"] - scratch[(dataset, budget, r["seed"])] for r in group
             if (dataset, budget, r["seed"]) in scratch]
    if diffs:
      mean, std = mean_std(diffs)
      table.append({"dataset": dataset, "budget": budget, "mode": mode, "pairs": len(diffs), "gain_mean": mean,
                    "gain_std": std})
  table.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), r["budget"], MODES.index(r["mode"])))
  return table


def write_csv(path: str, table: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, list(table[0]))
    writer.writeheader()
    writer.writerows(table)


def pm(mean: float, std: float | None, digits: int = 3) -> str:
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


# ================================================================================================================
# Figures.
# ================================================================================================================
def plot_accuracy(table: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  datasets = list(dict.fromkeys(r["dataset"] for r in table))
  fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    for mode in MODES:
      line = sorted((r for r in table if r["dataset"] == dataset and r["mode"] == mode), key=lambda r: r["budget"])
      if line:
        ax.errorbar([r["budget"] for r in line], [r["accuracy_mean"] for r in line],
                    yerr=[r["accuracy_std"] or 0 for r in line], marker="o", capsize=3, label=mode,
                    color=f"C{MODES.index(mode)}")
    budgets = sorted({r["budget"] for r in table if r["dataset"] == dataset})
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_title(DATASETS[dataset][3], fontsize=10)
    ax.set_xlabel(DATASETS[dataset][1])
    ax.set_ylabel(f"{HELD_OUT[dataset]} accuracy (mean ± std, 3 seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_gain(table: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 3.8))
  labels, x = [], 0.0
  seen = set()
  for dataset in DATASETS:
    for budget in sorted({r["budget"] for r in table if r["dataset"] == dataset}):
      bars = [r for r in table if r["dataset"] == dataset and r["budget"] == budget]
      for i, r in enumerate(bars):
        ax.bar(x + 0.25 * i, r["gain_mean"], width=0.23, yerr=r["gain_std"] or 0, capsize=2,
               color=f"C{MODES.index(r['mode'])}", label=None if r["mode"] in seen else r["mode"])
        seen.add(r["mode"])
      labels.append((x + 0.25 * (len(bars) - 1) / 2, f"{dataset}\n{budget}"))
      x += 0.25 * len(bars) + 0.5
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=8)
  ax.set_ylabel("accuracy gain over scratch\n(paired by seed, mean ± std)")
  ax.set_title("What pretraining is worth, by target and label budget", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_cost(rows: list[dict], dataset: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r["dataset"] == dataset]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  markers = {b: m for b, m in zip(sorted({r["budget"] for r in rows}), "os^D")}
  for ax, column, label in ((axes[0], "wall_seconds", "wall time per run (s, 2 CPU cores)"),
                            (axes[1], "trainable_params", "trainable parameters")):
    for mode in MODES:
      for budget, marker in markers.items():
        pts = [r for r in rows if r["mode"] == mode and r["budget"] == budget]
        if pts:
          ax.scatter([r[column] for r in pts], [r["accuracy"] for r in pts], marker=marker, alpha=0.8,
                     color=f"C{MODES.index(mode)}", label=f"{mode}, {budget}")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{HELD_OUT[dataset]} accuracy (each seed a point)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle(f"{DATASETS[dataset][3]}: four ways to adapt (marker: {DATASETS[dataset][1]}; a frozen run whose "
               "features were cached by an earlier seed costs seconds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ================================================================================================================
# Main.
# ================================================================================================================
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name in DATASETS:
    parser.add_argument(f"--{name}", help=f"the {name} sweep's folder (or its summary.csv)")
  parser.add_argument("--out", default="experiments/results/transfer_study")
  args = parser.parse_args(argv)
  sources = {name: getattr(args, name) for name in DATASETS if getattr(args, name)}
  if not sources:
    parser.error("give at least one sweep: " + ", ".join(f"--{n}" for n in DATASETS))
  os.makedirs(os.path.join(args.out, "sweeps"), exist_ok=True)
  rows = []
  for name, path in sources.items():
    rows += read_sweep(path, name)
    shutil.copyfile(os.path.join(path, "summary.csv") if os.path.isdir(path) else path,
                    os.path.join(args.out, "sweeps", f"{name}.csv"))
  accuracy, gain = accuracy_table(rows), gain_table(rows)
  write_csv(os.path.join(args.out, "accuracy.csv"), accuracy)
  write_csv(os.path.join(args.out, "gain_over_scratch.csv"), gain)
  plot_accuracy(accuracy, os.path.join(args.out, "accuracy_vs_budget.png"))
  plot_gain(gain, os.path.join(args.out, "gain_over_scratch.png"))
  if "sst2" in sources:
    plot_cost(rows, "sst2", os.path.join(args.out, "cost.png"))
  md = ["## Accuracy on the reported split by label budget (mean ± sample std over seeds)", "",
        markdown_table(["dataset", "budget", *MODES],
                       [[d, b, *[next((pm(r["accuracy_mean"], r["accuracy_std"]) for r in accuracy
                                       if (r["dataset"], r["budget"], r["mode"]) == (d, b, m)), "")
                                 for m in MODES]]
                        for d, b in dict.fromkeys((r["dataset"], r["budget"]) for r in accuracy)]),
        "", "## Gain over scratch, paired by seed (mean ± sample std)", "",
        markdown_table(["dataset", "budget", *MODES[1:]],
                       [[d, b, *[next((f"{r['gain_mean']:+.3f}" + (f" ± {r['gain_std']:.3f}" if r["gain_std"]
                                                                  is not None else "")
                                       for r in gain if (r["dataset"], r["budget"], r["mode"]) == (d, b, m)), "")
                                 for m in MODES[1:]]]
                        for d, b in dict.fromkeys((r["dataset"], r["budget"]) for r in gain)]),
        "", "## Cost per run (mean wall seconds on 2 CPU cores; trainable parameters)", "",
        markdown_table(["dataset", "budget", "mode", "wall s", "trainable"],
                       [[r["dataset"], r["budget"], r["mode"], f"{r['wall_seconds_mean']:.0f}",
                         f"{r['trainable_params']:,}"] for r in accuracy])]
  text = "\n".join(md) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  print(f"written: {args.out}/", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
