"""The benchmark script runs end to end and writes complete JSON (no timing assertions: benchmarks measure)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_quick_writes_every_row(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "experiments/bench_train_step.py", "--quick", "--out", str(out)], cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = result["rows"]
  cases = {(r["framework"], r["mode"]) for r in rows}
  for mode in ("full", "frozen", "inference"):
    assert ("jax", mode) in cases and any(f != "jax" and m == mode for f, m in cases), cases
  for r in rows:
    assert r["examples_per_sec"] > 0 and r["peak_rss_mb"] > 0, r
  jax_rows = [r for r in rows if r["framework"] == "jax"]
  assert all(r["ratio_jax_over_pytorch"] > 0 for r in jax_rows)
  # Both sides train the same model from the same start: the zero head gives loss ln(10) at the first step.
  for r in rows:
    if r["mode"] != "inference":
      assert abs(r["loss_first"] - 2.302585) < 1e-3, r
  assert "| JAX |" in proc.stdout or "JAX" in result["table"]
