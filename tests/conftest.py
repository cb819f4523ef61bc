"""Shared helpers: a tiny EfficientNet-Lite config that trains in seconds, and checkpoint reading."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One XLA compilation cache for the session, shared by the tests' in-process runs and the runs they launch (the
# environment is inherited): many tests compile the same small programs again (a relaunch, a resumed run, the same
# tiny config in another test). A hit loads the executable that was compiled before, so results are unchanged; a
# tiny run's wall time drops from 19 s to 9 s. Set here, before any test module imports jax; a fresh folder each
# session, so nothing compiled by another version is ever read, removed when the process that made it (pytest's
# main process; xdist workers inherit the variable) exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="transfer-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# The tests' programs are small: most of compiling one is LLVM optimising the generated code, often more than
# running it. Level 1 (of 0-3; XLA's default is the highest) keeps the cheap optimisations: measured here, a
# whole-suite run went from 30.5 to 18 min at level 0, but level 0's unoptimised loops made the real-size MiniLM
# tests twice as slow, and level 1 runs those as fast as the default while compiling as fast as level 0. It leaves
# the HLO alone (fusions, buffer assignment and the memory analysis, which tests inspect, are decided before LLVM)
# and changes results only in float rounding, within every stated tolerance; runs a test compares with each other
# compile with the same flags (launched processes inherit them). Set XLA_FLAGS with any level to choose another.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()


def devices_env(n):
  """Environment entries for a launched process that simulates ``n`` CPU devices (any XLA_FLAGS of the session
  kept)."""
  return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()}


def shared_data(name):
  """The folder ``name`` of the shared downstream data (see ../shared/data/README.md), or None when absent.

  Looked for in $TRANSFER_SHARED_DATA when it is set, else beside the repository (ROOT/../shared/data); never at a
  machine's absolute path. A clone elsewhere (CI's) finds none and its real-data tests skip with a reason that
  names ../shared/data, the one skip pytest_sessionfinish allows in CI (.ci/run prints which data it found)."""
  base = os.environ.get("TRANSFER_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data")
  folder = os.path.join(base, name)
  return folder if os.path.isdir(folder) else None


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
  """The saved state (params, batch_stats, opt_state, step, rng) on this process's first device, whatever mesh
  the run saved it from (an FSDP-8 run's sharded arrays included)."""
  import jax
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  step = manager.latest_step() if step is None else step
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default")
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpointer.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                                                 tree))


def evaluate_saved_run(workdir, step=None):
  """A finished classification run's evaluation redone without the trainer: the model its config.json describes,
  with checkpoint ``step``'s variables (default: the last), on every eval example once (padding rows dropped), in
  numpy.

  Returns ``{"eval/accuracy", "eval/loss", "examples"}``, to compare with what the trainer reported (the tiny
  runs learn little in a few steps, so equality with this recomputation is what their accuracy can be held to)."""
  import json

  import jax
  import ml_collections
  import numpy as np

  from transfer import data as data_lib
  from transfer import models, rules
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  _, eval_ds = data_lib.build(config.data, config.model)
  model = models.build(config.model, eval_ds.num_outputs)
  saved = restore_checkpoint(workdir, step)
  params = rules.unflatten({**rules.flatten(saved.get("frozen") or {}), **rules.flatten(saved["trainable"])})
  apply = jax.jit(lambda batch: model.apply({"params": params, "batch_stats": saved.get("batch_stats", {})}, batch,
                                            train=False))
  logits, labels = [], []
  for batch in eval_ds.eval_batches(config.eval_batch_size):
    real = batch["mask"] > 0
    logits.append(np.asarray(apply(batch), np.float64)[real])
    labels.append(batch["label"][real])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return {"eval/accuracy": int((logits.argmax(-1) == labels).sum()) / len(labels),
          "eval/loss": float(-log_probs[np.arange(len(labels)), labels].mean()), "examples": len(labels)}


def run_cli(args, env_extra=None, timeout=600):
  """``python -m transfer.train ARGS`` in a fresh process; returns the CompletedProcess."""
  env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "transfer.train", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def pytest_addoption(parser):
  parser.addoption("--bench-all", action="store_true",
                   help="tests/test_bench.py and test_bench_decoder.py: the benchmark's end-to-end check for all "
                        "five workloads and both tiny decoders (make bench-smoke), not only the cheapest of each")


@pytest.fixture
def tiny():
  return tiny_config


def pytest_sessionfinish(session, exitstatus):
  """In CI (CI=true) a skipped test is a failure: every optional reference (torch, transformers, the weights
  packages) is installed by `make test`, so a skip there means a test silently stopped running. The one allowed
  skip is a test of real data when ../shared/data is absent (shared_data() returned None; today the SST-2 slice
  and the hymenoptera folder, each with a synthetic test of the same path that always runs): its reason must
  name ../shared/data."""
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


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
  """(a small random-weight GPT-2 folder, a plain-text training file): the tiny causal-LM run of
  tests/tiny_lm_config.py, shared by the sharding and multi-process tests."""
  pytest.importorskip("torch")
  from test_decoder_transfer import decoder_folder
  from test_generate_cli import CORPUS
  base = tmp_path_factory.mktemp("lm")
  folder = decoder_folder(base / "gpt2", CORPUS, vocab=320, width=64, heads=4, positions=48)
  (base / "train.txt").write_text("\n\n".join(CORPUS * 3) + "\n")
  return folder, str(base / "train.txt")
