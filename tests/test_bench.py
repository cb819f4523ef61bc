"""The benchmark script runs end to end and writes complete JSON (no timing assertions: benchmarks measure)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("model, classes, packages", [
    ("efficientnet-lite0", 10, ("torch", "efficientnet-lite-pytorch")),
    ("all-minilm-l6-v2", 2, ("torch", "transformers")),
])
def test_bench_quick_writes_every_row(tmp_path, model, classes, packages):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "experiments/bench_train_step.py", "--model", model, "--quick", "--out",
                         str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert {r["model"] for r in rows} == {model}
  assert {r["size"] for r in rows} == set(result["environment"]["workloads"][model]["sizes"]), rows
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
  versions = result["environment"]["versions"]
  assert all(versions[p] for p in packages), versions
  assert f"| {model} |" in result["table"] and "| JAX |" in result["table"]
