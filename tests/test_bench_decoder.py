"""The benchmark's decoder rows (experiments/bench_train_step.py: gpt2-small, llama-100m and their tiny test
shapes): every row written, both frameworks training and generating from the same weights and batch (no timing
assertions: benchmarks measure).

Budget: each case is a fresh subprocess that imports its framework and compiles (a JAX case also spawns the torch
process that writes the shared checkpoint), 10-25 s each on 2 busy cores. So a tiny shape runs one train mode plus
decode (4 cases): `make test` runs GPT-2's (LoRA), `make bench-smoke` (``--bench-all``) Llama's (full) too, the two
side by side; the full-size workloads are only built as shapes (PyTorch on the meta device, JAX with
``jax.eval_shape``), never timed here.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

LOSS_TOL = 1e-3    # |JAX - PyTorch| first loss: same weights, same batch, no dropout (float32 differences ~1e-6)
TINY_RUNS = {"gpt2-tiny": "lora", "llama-tiny": "full"}   # model: its train mode (each also runs decode)
UNIT_SUITE_RUNS = ("gpt2-tiny",)   # make test; --bench-all: every TINY_RUNS model
TRAIN_LENGTH, BATCH, PROMPT, NEW_TOKENS, DECODE_BATCH = 32, 2, 8, 8, 2


def _bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(ROOT, "experiments",
                                                                                  "bench_train_step.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)   # imports no framework at module level
  return bench


@pytest.mark.long
def test_tiny_decoder_rows_train_and_generate_from_the_same_start(tmp_path, request):
  bench = _bench()
  runs = {m: mode for m, mode in TINY_RUNS.items()
          if request.config.getoption("bench_all") or m in UNIT_SUITE_RUNS}
  procs = {}
  for model, mode in runs.items():   # side by side: they only check rows, not speed
    out = tmp_path / f"{model}.json"
    cmd = [sys.executable, "experiments/bench_train_step.py", "--model", model, "--modes", f"{mode},decode",
           "--sizes", str(TRAIN_LENGTH), "--batch", str(BATCH), "--warmup", "1", "--steps", "1",
           "--prompt-length", str(PROMPT), "--new-tokens", str(NEW_TOKENS), "--decode-batch", str(DECODE_BATCH),
           "--decode-calls", "1", "--out", str(out)]
    procs[model] = (subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True), out)
  for model, mode in runs.items():
    proc, out = procs[model]
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:] + stdout[-3000:]
    workload = bench.WORKLOADS[model]
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["framework"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((m, f) for m in (mode, "decode") for f in ("jax", "torch")), sorted(rows)
    train, decode = {f: rows[mode, f] for f in ("jax", "torch")}, {f: rows["decode", f] for f in ("jax", "torch")}

    for r in result["rows"]:
      assert r["model"] == model and r["examples_per_sec"] > 0 and r["peak_rss_mb"] > 0, r
      # The same weights on every row: the JAX side read the PyTorch reference's save_pretrained folder.
      assert r["weights_fingerprint"] == rows["decode", "jax"]["weights_fingerprint"], (r, rows["decode", "jax"])
      assert r["weights_fingerprint"]["values"] == workload.params, r
    assert all("write_reference_weights_s" in r for r in (train["jax"], decode["jax"]))
    for r in train.values():
      assert (r["size"], r["batch"]) == (TRAIN_LENGTH, BATCH), r
      assert math.isclose(r["tokens_per_sec"], r["examples_per_sec"] * TRAIN_LENGTH), r
    for r in decode.values():
      assert (r["size"], r["batch"], r["new_tokens"]) == (PROMPT, DECODE_BATCH, NEW_TOKENS), r
      assert math.isclose(r["tokens_per_sec"], r["examples_per_sec"] * NEW_TOKENS), r
      assert len(r["new_token_ids"]) == DECODE_BATCH and all(len(t) == NEW_TOKENS for t in r["new_token_ids"]), r
    assert train["jax"]["ratio_jax_over_pytorch"] > 0 and decode["jax"]["ratio_jax_over_pytorch"] > 0

    # Same model, same batch: the first losses agree, and they say something about the weights (far from the
    # ln(vocab) of a model with flat logits, which any weights near zero would give).
    jax_loss, torch_loss = train["jax"]["loss_first"], train["torch"]["loss_first"]
    assert abs(jax_loss - torch_loss) <= LOSS_TOL, (jax_loss, torch_loss)
    assert abs(jax_loss - math.log(workload.vocab_size)) > 0.5, jax_loss
    # The same weights train on both sides: all of them (full), only the final norm (frozen), or rank-8 adapters
    # on GPT-2's fused q/k/v projection (lora: peft's with fan_in_fan_out for the Conv1D), r * (in + out) each.
    hidden, layers = workload.hf_config().hidden_size, workload.hf_config().num_hidden_layers
    expected = {"full": workload.params, "frozen": hidden * (2 if model.startswith("gpt2") else 1),
                "lora": layers * bench.LORA_RANK * (hidden + 3 * hidden)}[mode]
    assert train["jax"]["trainable_params"] == train["torch"]["trainable_params"] == expected, train
    assert train["jax"]["trains"] == workload.trains(mode)
    # Greedy generation from the same prefill logits: the first new token of every prompt is the same.
    assert len(decode["jax"]["greedy_same_prefix"]) == DECODE_BATCH
    assert min(decode["jax"]["greedy_same_prefix"]) >= 1, (decode["jax"]["new_token_ids"],
                                                           decode["torch"]["new_token_ids"])
    assert f"| {model} | {PROMPT}+{NEW_TOKENS} tokens | decode | JAX |" in result["table"], result["table"]
    assert "new tok/s" in result["table"]


@pytest.mark.parametrize("name, positions", [("gpt2-small", 1024), ("llama-100m", 2048)])
def test_full_size_decoders_have_their_shapes(tmp_path, name, positions):
  """The full-size workloads, built as shapes only: the PyTorch reference on the meta device and the JAX causal LM
  the trainer builds from the same config.json (jax.eval_shape) have the stated parameter count, and the frozen
  mode's rules train the same final-norm weights on both sides."""
  import jax
  import numpy as np
  import torch

  from transfer import config_base, models, optim, rules
  bench = _bench()
  workload = bench.WORKLOADS[name]
  assert not workload.smoke_only and name in bench.WORKLOADS
  with torch.device("meta"):
    ref = workload.reference()
  torch_params = dict(ref.named_parameters())
  assert sum(p.numel() for p in torch_params.values()) == workload.params
  torch_trained = sum(p.numel() for k, p in torch_params.items() if re.fullmatch(workload.torch_frozen_trains, k))

  hf_config = workload.hf_config()
  hf_config.save_pretrained(tmp_path)   # config.json only: the architecture
  config = config_base.base()
  workload.jax_config(config, 128)
  config.model.architecture = str(tmp_path)
  module = models.build_lm(config.model)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), models.example_batch(config.model.name)))
  flat = rules.flatten(shapes["params"])
  assert sum(int(np.prod(s.shape)) for s in flat.values()) == workload.params
  specs = optim.param_specs(workload.param_rules("frozen"), list(flat))
  jax_trained = sum(int(np.prod(flat[p].shape)) for p, s in specs.items() if not s.freeze)
  norm = hf_config.hidden_size * (2 if name.startswith("gpt2") else 1)   # LayerNorm scale + bias; RMSNorm scale
  assert jax_trained == torch_trained == norm
  assert module.backbone.config.max_position_embeddings == positions


def test_decoder_checks_report_a_different_start():
  """The parent's decoder checks, alone: a PyTorch first loss off by more than the tolerance is reported (the run
  then exits 1), one within it is not; greedy tokens are compared prompt by prompt up to the first difference."""
  bench = _bench()
  rows = [{"model": "gpt2-small", "size": 128, "mode": "full", "framework": fw, "loss_first": 10.9}
          for fw in ("jax", "torch")]
  rows[1]["loss_first"] += 0.5 * LOSS_TOL
  assert bench.check_decoder_start_losses(rows) == [] and bench.check_start_losses(rows) == []
  rows[1]["loss_first"] += LOSS_TOL
  (problem,) = bench.check_decoder_start_losses(rows)
  assert "gpt2-small 128 full torch" in problem, problem
  decode = [{"model": "gpt2-small", "size": 32, "mode": "decode", "framework": "jax",
             "new_token_ids": [[5, 6, 7], [1, 2, 3]]},
            {"model": "gpt2-small", "size": 32, "mode": "decode", "framework": "torch",
             "new_token_ids": [[5, 6, 7], [1, 9, 3]]}]
  bench.compare_generations(decode)
  assert decode[0]["greedy_same_prefix"] == [3, 1] and "greedy_same_prefix" not in decode[1]
