"""The tests' tiny run as a config file (for launches in subprocesses): full training with BatchNorm updates.

  python -m transfer.train --config tests/tiny_config.py --workdir /tmp/tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config():
  # SGD: updates proportional to gradients, so 1- and 8-device reduction orders stay within float tolerance
  # (Adam's g/sqrt(v) turns rounding noise in near-zero gradients into full-size steps).
  return tiny_config(total_steps=8, param_rules=[("head/.*", {}), ("backbone/.*", dict(lr_mult=0.5))],
                     batch_size=32, **{"optimizer.name": "sgd", "schedule.lr": 0.01})
