"""The tests' tiny run as a config file (for launches in subprocesses): full training with BatchNorm updates.

  python -m transfer.train --config tests/tiny_config.py --workdir /tmp/tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config(arg=""):
  """ARGS ``lora``: the same run with LoRA adapters on the 1x1 convolutions and the rest of the backbone frozen."""
  # SGD: updates proportional to gradients, so 1- and 8-device reduction orders stay within float tolerance
  # (Adam's g/sqrt(v) turns rounding noise in near-zero gradients into full-size steps).
  rules = [("head/.*", {}), ("backbone/.*", dict(lr_mult=0.5))]
  if arg == "lora":
    rules = [("head/.*", {}), ("backbone/.*(expand|project)_conv/kernel", dict(lora=dict(rank=4, alpha=8))),
             (".*", dict(freeze=True))]
  elif arg:
    raise ValueError(f"tests/tiny_config.py: unknown ARGS {arg!r} (only 'lora')")
  return tiny_config(total_steps=8, param_rules=rules, batch_size=32,
                     **{"optimizer.name": "sgd", "schedule.lr": 0.01})
