"""The benchmark script runs end to end for every workload and writes complete JSON (no timing assertions:
benchmarks measure)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT


# sizes: None = the workload's smallest default (what --quick picks); the heavy random-weight models (ResNet-50,
# ViT-S/16, BiT-R50x1: default 128 px) run at 64 px here to keep the smoke short.
@pytest.mark.parametrize("model, classes, packages, sizes", [
    ("efficientnet-lite0", 10, ("torch", "efficientnet-lite-pytorch"), None),
    ("all-minilm-l6-v2", 2, ("torch", "transformers"), None),
    ("resnet50", 10, ("torch", "torchvision"), "64"),
    ("vit-s16", 10, ("torch", "timm"), "64"),
    ("bit-r50x1", 10, ("torch", "timm"), "64"),
])
def test_bench_quick_writes_every_row(tmp_path, model, classes, packages, sizes):
  out = tmp_path / "bench.json"
  # Batch 8, one warm-up and two timed steps: this checks the rows, not the speed (27 subprocesses in all).
  proc = subprocess.run([sys.executable, "experiments/bench_train_step.py", "--model", model, "--quick", "--batch", "8",
                         "--warmup", "1", "--steps", "2", "--out", str(out), *(["--sizes", sizes] if sizes else [])],
                        cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert {r["model"] for r in rows} == {model}
  assert {r["size"] for r in rows} == set(result["environment"]["workloads"][model]["sizes"]), rows
  if sizes:
    assert {r["size"] for r in rows} == {int(sizes)}, rows
  cases = {(r["framework"], r["mode"]) for r in rows}
  for mode in ("full", "frozen", "inference"):
    assert ("jax", mode) in cases and any(f != "jax" and m == mode for f, m in cases), cases
  for r in rows:
    assert r["examples_per_sec"] > 0 and r["peak_rss_mb"] > 0, r
  jax_rows = [r for r in rows if r["framework"] == "jax"]
  assert all(r["ratio_jax_over_pytorch"] > 0 for r in jax_rows)
  # Both sides train the same model from the same start: the zero head gives loss ln(classes) at the first step,
  # and the same number of trainable parameters.
  for mode in ("full", "frozen"):
    train_rows = [r for r in rows if r["mode"] == mode]
    for r in train_rows:
      assert abs(r["loss_first"] - math.log(classes)) < 1e-4, r
    assert len({r["trainable_params"] for r in train_rows}) == 1, [(r["framework"], r["trainable_params"])
                                                                    for r in train_rows]
  # ... and the same backbone weights: every case's fingerprint (count, sum, sum of squares) is the first one's.
  first = rows[0]["weights_fingerprint"]
  for r in rows:
    assert r["weights_fingerprint"]["values"] == first["values"] > 0, r
    for k in ("sum", "sum_sq"):
      assert math.isclose(r["weights_fingerprint"][k], first[k], rel_tol=1e-7, abs_tol=1e-6), (r, first)
  # Random-weight workloads: the JAX side read the PyTorch reference's state dict through load_pretrained.
  random_weights = result["environment"]["workloads"][model]["pretrained"] is None
  assert all(("write_reference_weights_s" in r) == random_weights for r in jax_rows), jax_rows
  versions = result["environment"]["versions"]
  assert all(versions[p] for p in packages), versions
  assert f"| {model} |" in result["table"] and "| JAX |" in result["table"]


def test_different_start_weights_fail_the_run():
  """The parent's check, alone: a case whose backbone fingerprint or first loss differs is reported (the run then
  exits 1), so a wrong seed or file on one side cannot pass as a fair comparison."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(ROOT, "experiments",
                                                                                  "bench_train_step.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)   # imports no framework at module level
  fingerprint = {"values": 1000, "sum": 3.25, "sum_sq": 41.5}
  rows = [{"model": "resnet50", "size": 64, "mode": "full", "framework": fw, "weights_fingerprint": dict(fingerprint),
           "loss_first": math.log(10)} for fw in ("jax", "torch", "torch-cl")]
  assert bench.check_same_weights(rows) == [] and bench.check_start_losses(rows) == []
  rows[2]["weights_fingerprint"]["sum"] += 1e-3
  rows[1]["loss_first"] = 2.0
  (weights,), (loss,) = bench.check_same_weights(rows), bench.check_start_losses(rows)
  assert "resnet50 64" in weights and "torch-cl" in weights, weights
  assert "torch" in loss and "ln(10)" in loss, loss
