"""The tests' tiny image-folder run as a config file (for launches in subprocesses); ARG is the folder.

  python -m transfer.train --config tests/tiny_image_config.py:/tmp/folder --workdir /tmp/tiny_images

Resolution, steps and warmup are left to the auto rule; the tests override some of them on the command line. The
backbone is frozen but runs in every step (no feature cache), so a step sees images and compiles quickly.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config(data_dir):
  return tiny_config(**{"data.name": "image_folder", "data.data_dir": data_dir, "data.train_per_class": None,
                        "data.resolution": "auto", "total_steps": "auto", "schedule.warmup_steps": "auto",
                        "batch_size": 8, "eval_batch_size": 8, "log_every": 100, "checkpoint.every_steps": 0,
                        "param_rules": [("head/.*", {}), ("backbone/.*", dict(freeze=True))],
                        "feature_cache": "off"})
