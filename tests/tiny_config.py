"""The tests' tiny run as a config file (for launches in subprocesses): full training with BatchNorm updates.

  python -m transfer.train --config tests/tiny_config.py --workdir /tmp/tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config(arg=""):
  """ARGS ``lora``: the same run with LoRA adapters on the 1x1 convolutions and the rest of the backbone frozen.
  ``vit``: the same run on the two-block test ViT (vit-test8, no BatchNorm), for tests of the trainer's machinery
  (checkpoints, locks, faults) rather than of a network: its train step compiles in about a quarter of the time."""
  if arg == "vit":
    config = get_config()
    config.model.name, config.model.depth = "vit-test8", None
    return config
  # SGD: updates proportional to gradients, so 1- and 8-device reduction orders stay within float tolerance
  # (Adam's g/sqrt(v) turns rounding noise in near-zero gradients into full-size steps).
  rules = [("head/.*", {}), ("backbone/.*", dict(lr_mult=0.5))]
  if arg == "lora":
    rules = [("head/.*", {}), ("backbone/.*(expand|project)_conv/kernel", dict(lora=dict(rank=4, alpha=8))),
             (".*", dict(freeze=True))]
  elif arg:
    raise ValueError(f"tests/tiny_config.py: unknown ARGS {arg!r} (only 'lora' or 'vit')")
  return tiny_config(total_steps=8, param_rules=rules, batch_size=32,
                     **{"optimizer.name": "sgd", "schedule.lr": 0.01})
