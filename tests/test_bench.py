"""The benchmark script end to end: every row written, both frameworks starting from the same model (no timing
assertions: benchmarks measure).

Budget: each case is a fresh subprocess that imports its framework and compiles, so one workload costs 6-9 of
them. The unit suite (`make test`) runs the cheapest workload only, MiniLM at 16 tokens, batch 2 (six cases;
measured 85-105 s on 2 busy cores, against 180-200 s for EfficientNet-Lite0 at 32 px). `make bench-smoke`
(`pytest tests/test_bench.py --bench-all`) runs the same check for all five workloads, and `make bench` measures.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# model: (classes, its PyTorch reference's packages, --sizes: each workload's smallest quick size). The heavy
# random-weight models (ResNet-50, ViT-S/16, BiT-R50x1; default 128 px) run at 64 px.
WORKLOADS = {
    "all-minilm-l6-v2": (2, ("torch", "transformers"), 16),
    "efficientnet-lite0": (10, ("torch", "efficientnet-lite-pytorch"), 32),
    "resnet50": (10, ("torch", "torchvision"), 64),
    "vit-s16": (10, ("torch", "timm"), 64),
    "bit-r50x1": (10, ("torch", "timm"), 64),
}
UNIT_SUITE_WORKLOAD = "all-minilm-l6-v2"   # the cheapest (see the module docstring)


def pytest_generate_tests(metafunc):
  """``model``: the cheapest workload, or all of them with ``--bench-all`` (tests/conftest.py)."""
  if "model" in metafunc.fixturenames:
    metafunc.parametrize("model", list(WORKLOADS) if metafunc.config.getoption("bench_all")
                         else [UNIT_SUITE_WORKLOAD])


def test_bench_writes_every_row_from_the_same_start(tmp_path, model):
  classes, packages, size = WORKLOADS[model]
  out = tmp_path / "bench.json"
  # Batch 2, one warm-up (compiling) and one timed step per case: this checks the rows, not the speed.
  proc = subprocess.run([sys.executable, "experiments/bench_train_step.py", "--model", model, "--sizes", str(size),
                         "--batch", "2", "--warmup", "1", "--steps", "1", "--out", str(out)],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert {r["model"] for r in rows} == {model}
  assert {r["size"] for r in rows} == set(result["environment"]["workloads"][model]["sizes"]) == {size}, rows
  cases = {(r["framework"], r["mode"]) for r in rows}
  for mode in ("full", "frozen", "inference"):
    assert ("jax", mode) in cases and any(f != "jax" and m == mode for f, m in cases), cases
  for r in rows:
    assert r["examples_per_sec"] > 0 and r["peak_rss_mb"] > 0, r
  jax_rows = [r for r in rows if r["framework"] == "jax"]
  assert all(r["ratio_jax_over_pytorch"] > 0 for r in jax_rows)
  # Utilisation: the JAX step's FLOPs from XLA's cost analysis (a training step does more work than inference),
  # every row's achieved GFLOP/s from them, and MFU against the stated peak.
  flops = {r["mode"]: r["flops_per_step"] for r in jax_rows}
  assert flops["full"] > flops["inference"] > 0, flops
  peak = result["environment"]["peak_gflops"]
  assert peak > 0 and result["environment"]["peak_source"], result["environment"]
  for r in rows:
    expected = flops[r["mode"]] * r["examples_per_sec"] / r["batch"] / 1e9
    assert r["gflops_per_sec"] == pytest.approx(expected, rel=1e-9) and r["mfu"] == pytest.approx(
        expected / peak, rel=1e-9), r
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


def test_op_profile_self_time_counts_an_outlined_call_without_the_ops_inside_it(tmp_path):
  import gzip
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import op_profile
  op = lambda name, ts, dur, tid=1, module="jit_train_step": {
      "ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name,
      "args": {"hlo_op": name, "hlo_module": module}}
  events = [op("call.1", 0, 100), op("fusion.2", 10, 60), op("dot.3", 200, 50), op("dot.3", 0, 30, tid=2),
            op("other", 0, 999, module="jit_eval_step"), {"ph": "M", "pid": 7, "name": "process_name"}]
  (tmp_path / "plugins").mkdir()
  with gzip.open(tmp_path / "plugins" / "x.perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  seconds = op_profile.op_seconds(str(tmp_path), "jit_train")
  assert seconds == pytest.approx({"call.1": 40e-6, "fusion.2": 60e-6, "dot.3": 80e-6})


def test_op_profile_puts_each_op_of_a_step_in_its_kind():
  """experiments/op_profile.py (bench --profile): a small gradient step's ops by kind from the optimised HLO, and
  their shares of the profiled time."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import op_profile

  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w.T) ** 2)

  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((128, 128)), jnp.ones((256, 128))
  compiled = step.lower(w, x).compile()
  kinds = op_profile.categories(compiled.as_text())
  assert sorted(set(kinds.values()) - {"transpose/copy"}) == ["elementwise", "matmul"], kinds
  assert op_profile.categorise("fusion", {"transpose", "copy", "parameter"}) == "transpose/copy"
  assert op_profile.categorise("fusion", {"reduce", "add", "parameter"}) == "reduction"
  assert op_profile.categorise("fusion", {"rng-bit-generator"}) == "random"
  assert op_profile.categorise("fusion", {"convolution", "add"}) == "convolution"
  result = op_profile.profile(lambda: compiled(w, x), compiled.as_text(), "jit_", steps=3)
  assert math.isclose(sum(result["shares"].values()), 1.0, rel_tol=1e-9)
  assert result["shares"]["matmul"] > 0.3   # two 256x128x128 matmuls against two elementwise passes
  assert 0 < result["op_seconds_per_step"] < 1.0


def test_each_jax_row_is_compared_with_pytorch_float32_and_its_bf16_autocast():
  """The parent's ratios, alone, on made-up rows of one case in both dtypes: a JAX row's own-dtype ratio is against
  the faster PyTorch layout of its dtype, and every JAX row also carries its ratio against PyTorch float32 and
  against PyTorch's best mode (here bf16 autocast); the summary table shows them with the matmul share."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(ROOT, "experiments",
                                                                                  "bench_train_step.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  case = {"model": "resnet50", "size": 128, "mode": "full", "batch": 32, "compile_s": 5.0}
  speeds = {("jax", "float32"): 8.0, ("torch", "float32"): 10.0, ("torch-cl", "float32"): 16.0,
            ("jax", "bfloat16"): 24.0, ("torch", "bfloat16"): 12.0, ("torch-cl", "bfloat16"): 20.0}
  rows = [{**case, "framework": fw, "dtype": dtype, "examples_per_sec": v} for (fw, dtype), v in speeds.items()]
  rows[3]["op_profile"] = {"shares": {"matmul": 0.25}}
  bench.add_ratios(rows)
  f32, bf16 = rows[0], rows[3]
  assert f32["ratio_jax_over_pytorch"] == 0.5 and f32["ratio_against"] == "torch-cl"
  assert f32["ratio_vs_pytorch_float32"] == 0.5 and f32["ratio_vs_pytorch_best"] == 0.4
  assert bf16["ratio_jax_over_pytorch"] == 1.2 and bf16["ratio_against"] == "torch-cl"
  assert bf16["ratio_vs_pytorch_float32"] == 1.5 and bf16["ratio_vs_pytorch_best"] == 1.2
  assert bf16["ratio_vs"] == {"torch float32": 2.4, "torch-cl float32": 1.5, "torch bfloat16": 2.0,
                              "torch-cl bfloat16": 1.2}
  lines = bench.summary_table(rows).splitlines()
  assert len(lines) == 4   # head, rule, the two JAX rows
  assert lines[2] == "| resnet50 | 128 px | full | 8.0 | 16.0 | 20.0 | 0.50 | 0.40 | 0.40 | - | 5.0 |", lines[2]
  assert lines[3] == "| resnet50 | 128 px | full bf16 | 24.0 | 16.0 | 20.0 | 1.50 | 1.20 | 1.20 | 25% | 5.0 |", lines[3]
  # Without bf16 instructions, `--torch-bf16 auto` leaves PyTorch's autocast rows out and says why.
  args = bench.argparse.Namespace(torch_bf16="auto")
  on, why = bench.torch_bf16_rows(args)
  assert on == bool(set(bench.BF16_CPU_FLAGS) & (bench.cpu_flags() or set())), why
  assert bench.torch_bf16_rows(bench.argparse.Namespace(torch_bf16="never"))[0] is False
