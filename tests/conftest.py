"""Shared helpers: a tiny EfficientNet-Lite config that trains in seconds, and checkpoint reading."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data(name):
  """The folder ``name`` of the shared downstream data (see ../shared/data/README.md), or None when absent.

  Looked for in $TRANSFER_SHARED_DATA, then beside the repo (../shared/data), then at /work/shared/data, where
  this project's machines keep it even for clones that sit elsewhere (CI clones into /tmp)."""
  for base in (os.environ.get("TRANSFER_SHARED_DATA"), os.path.join(ROOT, "..", "shared", "data"), "/work/shared/data"):
    if base and os.path.isdir(os.path.join(base, name)):
      return os.path.join(base, name)
  return None


def tiny_config(**overrides):
  """EfficientNet-Lite0 layout at depth 0.1 (7 blocks), 32x32 digits, a few steps, from scratch."""
  from transfer import config_base
  c = config_base.base()
  c.model.depth, c.model.dropout = 0.1, 0.0
  c.data.resolution, c.data.train_per_class = 32, 10
  c.batch_size, c.eval_batch_size, c.total_steps = 16, 64, 6
  c.schedule.lr, c.schedule.warmup_steps = 1e-2, 2
  c.log_every, c.checkpoint.every_steps = 1, 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def restore_checkpoint(workdir, step=None):
  """The saved state as plain numpy (params, batch_stats, opt_state, step, rng)."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  step = manager.latest_step() if step is None else step
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                                                         "default"))


def run_cli(args, env_extra=None, timeout=600):
  """``python -m transfer.train ARGS`` in a fresh process; returns the CompletedProcess."""
  env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "transfer.train", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def tiny():
  return tiny_config


def pytest_sessionfinish(session, exitstatus):
  """In CI (CI=true) a skipped test is a failure: every optional reference (torch, transformers, the weights
  packages) is installed by `make test`, so a skip there means a test silently stopped running. The one allowed
  skip is the real-SST-2 slice when ../shared/data is absent (a synthetic test of the same path always runs)."""
  if os.environ.get("CI") != "true":
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else [])
             if "../shared/data" not in str(r.longrepr)]
  if skipped:
    print(f"\nCI: {len(skipped)} test(s) skipped; in CI every test must run:")
    for r in skipped:
      print(f"  {r.nodeid}: {r.longrepr}")
    session.exitstatus = 1
