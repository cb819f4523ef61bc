"""The default job (``make demo``): ImageNet EfficientNet-Lite0 -> handwritten digits, three ways, three label budgets.

For each of 10 and 50 labelled images per class and the full training split, trains (a) the network from
scratch, (b) a new head on the frozen pretrained backbone (feature extraction) and (c) the whole pretrained
network with the backbone at a tenth of the head's learning rate; then prints test accuracy, wall time and
trainable parameters. Each run is an ordinary ``transfer.train`` run in ``WORKDIR/<mode>_<k>``, so rerunning
the demo reuses finished runs (delete the folder to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from configs import digits_efficientnet  # noqa: E402 (configs/ is a folder of config files, importable from root)
from transfer import train

MODES = ("scratch", "frozen", "finetune")
BUDGETS = (10, 50, 0)  # labelled images per class; 0 = the full training split


def table(rows: list[dict]) -> str:
  head = "| labels/class | mode | test accuracy | wall s | trainable params |\n|---|---|---|---|---|"
  lines = [f"| {r['per_class'] or 'all (~144)'} | {r['mode']} | {r['eval/accuracy']:.3f} | "
           f"{r['wall_seconds']:.0f} | {r['trainable_params']:,} |" for r in rows]
  return "\n".join([head] + lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
  args = parser.parse_args()
  rows, t0 = [], time.time()
  for per_class in map(int, args.budgets.split(",")):
    for mode in args.modes.split(","):
      workdir = os.path.join(args.workdir, f"{mode}_{per_class or 'all'}")
      print(f"\n=== {mode}, {per_class or 'all'} labels/class -> {workdir}", flush=True)
      done = os.path.join(workdir, "results.json")
      if os.path.exists(done):
        with open(done) as f:
          results = json.load(f)
        print(f"finished earlier: {done}")
      else:
        results = train.train(digits_efficientnet.get_config(f"mode={mode},per_class={per_class}"), workdir)
      rows.append({"mode": mode, "per_class": per_class, **results})
  print(f"\nEfficientNet-Lite0 on digits (test split: 360 images), total {time.time() - t0:.0f} s\n")
  print(table(rows))
  with open(os.path.join(args.workdir, "demo_results.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
