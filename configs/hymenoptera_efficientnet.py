"""EfficientNet-Lite0 (ImageNet) transferred to hymenoptera: photos of ants and bees from a folder of JPEGs.

  python -m transfer.train --config configs/hymenoptera_efficientnet.py:mode=finetune --workdir runs/hymenoptera_ft
  python -m transfer.train --config configs/hymenoptera_efficientnet.py:mode=frozen --workdir runs/hymenoptera_frozen
  python -m transfer.train --config configs/hymenoptera_efficientnet.py:mode=scratch --workdir runs/hymenoptera_scratch

A smoke run (seconds): add ``--config.data.resolution=64 --config.total_steps=3``.

ARGS: ``mode`` = finetune (all weights train, the backbone at 0.3x the head's lr) or frozen (feature extraction: the
backbone is frozen, its features of the evaluation view are extracted once and cached, only the new head trains)
or scratch (the same network from random init, everything at the full lr: the baseline).

Data: ``config.data.data_dir`` = ``../shared/data/hymenoptera`` (from the project root: ``train/`` and ``val/``,
one folder per class). 244 training photos (``train/ants/imageNotFound.gif``, a placeholder, is skipped and
reported; ``formica.jpeg`` loads) and 153 validation photos. The auto rule picks 224 px (median shorter side
375 px), 500 steps of 32 (65 epochs) with 50 warmup steps, and no mixup (under 20,000 images).

Learning rates are the digits config's (``configs/digits_efficientnet.py``, swept there), not swept here.
Expected: not yet measured. Reference: an ImageNet ResNet-18, fine-tuned or as a fixed feature extractor, reaches
the mid 90s (%) on this validation set in PyTorch's transfer-learning tutorial. Cost estimate (not measured):
fine-tuning at 224 px runs at about 9 images/s on 2 cores (the benchmark's 50/s at 96 px scaled by pixels), so
about 30 minutes; frozen extracts 397 images' features once (seconds) and trains the head on them.
"""
import ml_collections

from transfer import config_base


def get_config(arg: str = "mode=finetune") -> ml_collections.ConfigDict:
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  mode = args.get("mode", "finetune")
  if mode not in ("finetune", "frozen", "scratch"):
    raise ValueError(f"config arg mode={mode!r}: use finetune, frozen or scratch")
  c = config_base.base()
  c.model.name = "efficientnet-lite0"
  c.model.pretrained = None if mode == "scratch" else "efficientnet-lite0"
  c.data.name = "image_folder"
  c.data.data_dir = "../shared/data/hymenoptera"
  c.data.resolution = "auto"
  c.batch_size = 32
  c.total_steps = "auto"
  c.mixup = "auto"
  c.schedule.lr = 3e-3 if mode == "scratch" else 1e-2
  c.schedule.warmup_steps = "auto"
  c.optimizer.weight_decay = 1e-4
  c.param_rules = [
      ("head/.*", dict(load=False, wd_mult=0.0)),       # the new head: fresh (zero) init, full lr
      ("backbone/.*", {"finetune": dict(lr_mult=0.3), "frozen": dict(freeze=True), "scratch": {}}[mode]),
  ]
  c.eval_every = 100               # validation accuracy through training, in metrics.jsonl
  c.checkpoint.every_steps = 0     # only the final checkpoint
  return c
