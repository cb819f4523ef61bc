"""LoRA adapters through the parameter rules (transfer/models/lora.py).

Against ``peft``: the same weights give the same Dense and strided, padded Conv outputs (1e-5 max-abs, float32).
In every family: at step 0 (B = 0) the adapted model's outputs equal the base model's exactly; with trained
(non-zero) adapters, the merged kernels give the adapted outputs to 1e-5 max-abs (times the outputs' scale when
it is above 1; float32). Through the trainer: only adapters and
the head change, the kernels under the adapters and the BatchNorm statistics stay as loaded, and no feature cache.
"""
import json
import os
import re
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, restore_checkpoint, run_cli, tiny_config
from safetensors.numpy import load_file, save_file
from transfer import config_check, load_pretrained, models, optim, rules, runs, train
from transfer.models import bert, gpt2, layers, llama, lora, resnetv2, vit
from transfer.models.classifier import ImageClassifier, TextClassifier

MERGE_TOL = 1e-5
ATTN = ("backbone/.*(query|value|q_proj|v_proj|c_attn)/kernel", dict(lora=dict(rank=4, alpha=8)))


def _adapted_params(module, example, adapters, seed=0):
  return jax.jit(lambda r: module.clone(adapters=adapters).init(r, example))(jax.random.PRNGKey(seed))["params"]


def _randomise_b(params, seed=1):
  """Trained-looking adapters: B is zero at init, which would make any merge look right."""
  flat = rules.flatten(params)
  rng = np.random.default_rng(seed)
  return rules.unflatten({p: rng.normal(0, 0.5, np.shape(v)).astype(np.float32) if p.endswith("lora_b") else v
                          for p, v in flat.items()})


def _text_batch(vocab=50):
  rng = np.random.default_rng(0)
  mask = np.ones((2, 7), np.int32)
  mask[1, 5:] = 0
  return {"input_ids": rng.integers(0, vocab, (2, 7)).astype(np.int32), "attention_mask": mask}


def _image_batch(size):
  return {"image": np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.uint8)}


GPT2 = gpt2.GPT2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, intermediate_size=64)
LLAMA = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16)
BERT = bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)

# (family, module, batch, rule): every adaptable layer kind: Dense (attention, MLP, LM head), nn.Conv (ResNet,
# EfficientNet 1x1 and the strided stem, ViT's patch embedding), BiT's weight-standardised StdConv.
ALL_KERNELS = dict(lora=dict(rank=2, alpha=4))
CASES = {
    "bert": (lambda: TextClassifier(backbone=bert.BertEncoder(BERT), num_classes=3), _text_batch(),
             [ATTN, ("backbone/.*(intermediate|output)/kernel", ALL_KERNELS)]),
    "gpt2": (lambda: gpt2.causal_lm(GPT2), _text_batch(), [("backbone/.*/kernel", ALL_KERNELS)]),
    "llama": (lambda: llama.causal_lm(LLAMA), _text_batch(), [("(backbone/.*|lm_head)/kernel", ALL_KERNELS)]),
    "vit": (lambda: ImageClassifier(backbone=vit.ViT(8, 32, 2, 4, 64, (2, 2)), num_classes=3), _image_batch(16),
            [("backbone/.*/kernel", ALL_KERNELS)]),
    "resnet": (lambda: models.build(ml_collections.ConfigDict({"name": "resnet18", "width": 0.25}), 3),
               _image_batch(32), [("backbone/.*/kernel", ALL_KERNELS)]),
    "bit": (lambda: ImageClassifier(backbone=resnetv2.ResNetV2((1, 1, 1, 1), width=0.5), num_classes=3),
            _image_batch(32), [("backbone/.*conv.*/kernel", ALL_KERNELS)]),
    "efficientnet": (lambda: models.build(ml_collections.ConfigDict({"name": "efficientnet-lite0", "depth": 0.1}), 3),
                     _image_batch(32), [("backbone/(stem_conv|top_conv|.*(expand|project)_conv)/kernel", ALL_KERNELS)]),
}

LONG_CASES = {"efficientnet"}   # a minute each in make test's budget: run by make test-long


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in LONG_CASES else n
                                  for n in sorted(CASES)])
def test_adapters_start_at_the_base_model_and_merge_back(name):
  build, batch, rule_list = CASES[name]
  base = build()
  adapters = lora.targets(rule_list + [(".*", {})])
  params = _adapted_params(base, batch, adapters)
  rng = np.random.default_rng(2)   # a new head starts at zero: give it weights, or every output is 0
  flat = {p: rng.normal(0, 0.5, v.shape).astype(np.float32) if p == "head/kernel" else v
          for p, v in rules.flatten(params).items()}
  params = rules.unflatten(flat)
  n_adapters = sum(p.endswith("lora_a") for p in flat)
  kernels = [p for p in flat if p.endswith("/kernel") and lora.spec_for(p, adapters)]
  assert n_adapters == len(kernels) >= 2, (n_adapters, kernels)
  assert all(flat[p].dtype == jnp.float32 for p in flat if lora.is_adapter(p))
  state = {k: v for k, v in jax.jit(lambda r: base.init(r, batch))(jax.random.PRNGKey(0)).items() if k != "params"}
  base_params = {p: v for p, v in flat.items() if not lora.is_adapter(p)}
  adapted = base.clone(adapters=adapters)

  def out(module, p):
    return np.asarray(module.apply({"params": p, **state}, batch), np.float64)

  reference = out(base, rules.unflatten(base_params))
  np.testing.assert_array_equal(out(adapted, params), reference)   # B = 0: exactly the base model

  trained = _randomise_b(params)
  with_adapters = out(adapted, trained)
  assert np.abs(with_adapters - reference).max() > 1e-2   # the adapters do change the outputs
  merged = lora.merge(rules.flatten(trained), adapters)
  assert set(merged) == set(base_params)
  scale = max(1.0, np.abs(with_adapters).max())   # the tolerance is relative to the outputs' scale above 1
  np.testing.assert_allclose(out(base, rules.unflatten(merged)), with_adapters, rtol=0, atol=MERGE_TOL * scale)


def test_conv_adapter_gradients_are_materialised_once_and_unchanged():
  """Conv adapters under a frozen, inference-mode EfficientNet: the output cotangent of each adapted conv passes a
  gradient barrier, so XLA's CPU backend materialises it once instead of fusing the BatchNorm, ReLU6 and depthwise
  chain into the transposed copy each adapter's weight-gradient matmul reads (that fusion made the full-size LoRA
  step 22.9 s instead of 6.1 s). Structure of the compiled gradient, not timing: with the trainer's compiler
  options one barrier per adapter survives and every transposing copy reads one operand (without them: no barrier,
  copies of up to 29 operands at this size). The gradients are the same with and without (1e-6, float32)."""
  build, batch, _ = CASES["efficientnet"]
  adapters = lora.targets([("backbone/.*(expand|project)_conv/kernel", dict(lora=dict(rank=2, alpha=4))), (".*", {})])
  base = build()
  model = base.clone(adapters=adapters)
  flat = rules.flatten(_randomise_b(_adapted_params(base, batch, adapters)))
  flat["head/kernel"] = np.random.default_rng(2).normal(0, 0.5, flat["head/kernel"].shape).astype(np.float32)
  trainable = {p: v for p, v in flat.items() if lora.is_adapter(p)}
  frozen = {p: v for p, v in flat.items() if not lora.is_adapter(p)}
  batch_stats = jax.jit(lambda r: model.init(r, batch))(jax.random.PRNGKey(0))["batch_stats"]

  def loss(trainable, frozen):
    params = rules.unflatten({**trainable, **frozen})
    out = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True, backbone_train=False)
    return jnp.sum(out ** 2)

  grads, hlo = {}, {}
  for name, options in (("barrier", layers.compiler_options()), ("fused", None)):
    compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(trainable, frozen).compile()
    grads[name], hlo[name] = compiled(trainable, frozen), compiled.as_text()
  n_adapters = sum(p.endswith("lora_a") for p in trainable)
  assert n_adapters >= 10
  assert hlo["barrier"].count("opt-barrier(") == n_adapters
  copy_operands = [len(m.group(1).split(", ")) for m in
                   re.finditer(r"%copy\S* = f32\[\d+,\d+\]\{1,0\} fusion\((.*?)\), kind=", hlo["barrier"])]
  assert len(copy_operands) >= n_adapters and max(copy_operands) == 1, copy_operands
  scale = max(1.0, max(float(np.abs(g).max()) for g in grads["fused"].values()))
  for path, g in grads["fused"].items():
    assert np.abs(g).max() > 0, path
    np.testing.assert_allclose(grads["barrier"][path], g, rtol=0, atol=1e-6 * scale, err_msg=path)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="fc")(x)


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")(x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_same_outputs_as_peft(kind):
  """peft's LoraLayer with the same base and adapter weights (B random) gives our outputs; tolerance 1e-5."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  layer = torch.nn.Linear(12, 5) if kind == "linear" else torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
  wrapper = torch.nn.Sequential()
  wrapper.add_module("layer", layer)
  cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["layer"], lora_dropout=0.0)
  model = peft.get_peft_model(wrapper, cfg).eval()
  lora_layer = model.base_model.model.layer
  with torch.no_grad():
    lora_layer.lora_B["default"].weight.normal_()
  a = lora_layer.lora_A["default"].weight.detach().numpy()
  b = lora_layer.lora_B["default"].weight.detach().numpy()
  w, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
  x = np.random.default_rng(0).normal(size=(2, 12) if kind == "linear" else (2, 8, 8, 3)).astype(np.float32)
  if kind == "linear":
    module, name = _Dense(), "fc"
    params = {name: {"kernel": w.T, "bias": bias, "lora_a": a.T, "lora_b": b.T}}
    theirs = model(torch.from_numpy(x)).detach().numpy()
  else:
    module, name = _Conv(), "conv"
    params = {name: {"kernel": w.transpose(2, 3, 1, 0), "bias": bias, "lora_a": a.transpose(2, 3, 1, 0),
                     "lora_b": b[:, :, 0, 0].T}}
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  with lora.adapting(lora.targets([(f"{name}/kernel", dict(lora=dict(rank=3, alpha=6)))]), train=False):
    ours = np.asarray(module.apply({"params": params}, x))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
  # peft's initialisation: A uniform within 1/sqrt(fan_in) (Kaiming, a = sqrt(5)), B zero; ours the same law.
  with lora.adapting(lora.targets([(f"{name}/kernel", dict(lora=dict(rank=3, alpha=6)))]), train=False):
    init = module.init(jax.random.PRNGKey(0), x)["params"][name]
  fan_in = 12 if kind == "linear" else 27
  assert np.abs(init["lora_a"]).max() <= 1 / np.sqrt(fan_in) and np.abs(init["lora_a"]).max() > 0.8 / np.sqrt(fan_in)
  assert not np.any(init["lora_b"])


def test_rslora_scale_and_dropout_only_in_training():
  assert lora.parse(dict(rank=16, alpha=8), "r").scale == 0.5
  assert lora.parse(dict(rank=16, alpha=8, rslora=True), "r").scale == 2.0
  x = np.ones((64, 12), np.float32)
  adapters = lora.targets([("fc/kernel", dict(lora=dict(rank=3, alpha=3, dropout=0.5)))])
  with lora.adapting(adapters, train=False):
    params = _Dense().init(jax.random.PRNGKey(0), x)["params"]
  params = _randomise_b(params)

  def run(train, seed):
    with lora.adapting(adapters, train=train):
      return np.asarray(_Dense().apply({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(seed)}))
  assert np.array_equal(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1))
  # Dropout on the adapter's input only: the base path is the same whatever the mask.
  base = np.asarray(_Dense().apply({"params": {"fc": {k: params["fc"][k] for k in ("kernel", "bias")}}}, x))
  assert not np.allclose(run(True, 0), base)


@pytest.mark.parametrize("rule,message", [
    (("backbone/.*/bias", dict(lora=dict(rank=2))), r"backbone/.*bias is not one \(a bias, scale or embedding\)"),
    (("backbone/.*dw_conv/kernel", dict(lora=dict(rank=2))),
     r"dw_conv/kernel is a kernel of a layer that takes no LoRA adapter"),
    (("backbone/.*/kernel", dict(lora=dict(rank=2), freeze=True)), r"lora with freeze=True trains nothing"),
])
def test_rules_that_cannot_adapt_are_errors_naming_the_path(rule, message):
  build, batch, _ = CASES["efficientnet"]
  adapters = lora.targets([rule, (".*", {})])
  # The interceptor adds adapters where it can; param_specs refuses what it could not honour.
  shapes = jax.eval_shape(lambda: build().clone(adapters=adapters).init(jax.random.PRNGKey(0), batch))
  with pytest.raises(ValueError, match=message):
    optim.param_specs([rule, (".*", {})], list(rules.flatten(shapes["params"])))


def test_bad_lora_fields_fail_config_check_naming_the_rule():
  for fields, message in [(dict(rank=0), "lora rank must be an integer >= 1"),
                          (dict(rank=4, alpha=-1), "lora alpha must be"), (dict(rank=4, dropout=1.0), "lora dropout must be in"),
                          (dict(rank=4, scale=2), "unknown lora")]:
    config = tiny_config(param_rules=[("head/.*", {}), ("backbone/.*", dict(lora=fields))])
    with pytest.raises(ValueError, match=r"config.param_rules\[1\] \('backbone/\.\*'\): " + message):
      config_check.validate(config)
  with pytest.raises(ValueError, match=r"LoRA on backbone/stem_conv/kernel: rank 64 is above the kernel's smaller"):
    build, batch, _ = CASES["efficientnet"]
    build().clone(adapters=lora.targets([("backbone/stem_conv/kernel", dict(lora=dict(rank=64)))])).init(
        jax.random.PRNGKey(0), batch)


def test_lora_run_trains_adapters_and_head_only(tmp_path, capsys):
  """EfficientNet-Lite (tiny, BatchNorm) with conv adapters: the backbone stays in inference mode (running
  statistics), the adapters and the head train, the rules table shows the adapters, and the checkpoints hold the
  trainable state only (no frozen base, no BatchNorm statistics)."""
  rule = ("backbone/.*(expand|project)_conv/kernel", dict(lora=dict(rank=4, alpha=8)))
  config = tiny_config(param_rules=[("head/.*", {}), rule, (".*", dict(freeze=True))], total_steps=4)
  config.schedule.lr, config.checkpoint.every_steps, config.checkpoint.keep_last = 0.05, 1, 4
  workdir = str(tmp_path / "run")
  results = train.train(config, workdir)
  out = capsys.readouterr().out
  assert "r4 a8: 13 adapters" in out and "backbone in inference mode" in out, out
  assert results["feature_cache"] is False
  first, last = restore_checkpoint(workdir, 1), restore_checkpoint(workdir, 4)
  assert sorted(last) == ["nonfinite_step", "opt_state", "rng", "step", "trainable"]
  trainable = rules.flatten(last["trainable"])
  assert set(trainable) == {p for p in trainable if lora.is_adapter(p) or p.startswith("head/")}
  assert sum(lora.is_adapter(p) for p in trainable) == 26   # block_0 has no expansion conv
  assert sum(v.size for v in trainable.values()) == results["trainable_params"] < results["frozen_params"] / 20
  moved = [p for p, v in rules.flatten(first["trainable"]).items() if p.endswith("lora_b")
           and not np.array_equal(trainable[p], v)]
  assert len(moved) == 13
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["param_rules"][1][1]["lora"] == {"rank": 4, "alpha": 8}
  with open(os.path.join(workdir, runs.BASE_FILE)) as f:
    recorded = json.load(f)
  assert recorded["source"] == "the seeded init (config.seed=0)"
  assert any(k.startswith("frozen/backbone/") and k.endswith("_conv/kernel") for k in recorded["sha256"])
  assert any(k.startswith("batch_stats/") for k in recorded["sha256"])


@pytest.mark.long
def test_lora_kill_and_resume_gives_bit_identical_adapters(tmp_path):
  """SIGKILL right after the step-6 save started, then a relaunch: the base is rebuilt (seeded init), checked
  against base.json, and the final adapters and head equal the uninterrupted run's bit for bit."""
  args = ["--config", os.path.join(ROOT, "tests", "tiny_config.py") + ":lora"]
  full = run_cli(args + ["--workdir", str(tmp_path / "full")])
  assert full.returncode == 0, full.stderr[-3000:]
  killed = run_cli(args + ["--workdir", str(tmp_path / "resumed"), "--config.fault.kill_at_step=6"])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run_cli(args + ["--workdir", str(tmp_path / "resumed")])
  assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
  a, b = restore_checkpoint(tmp_path / "full"), restore_checkpoint(tmp_path / "resumed")
  assert int(a["step"]) == int(b["step"]) == 8 and "frozen" not in b
  flat_a, flat_b = rules.flatten(a["trainable"]), rules.flatten(b["trainable"])
  assert sorted(flat_a) == sorted(flat_b) and sum(lora.is_adapter(p) for p in flat_a) == 26
  for p, v in flat_a.items():
    np.testing.assert_array_equal(flat_b[p], v, err_msg=p)


def test_lora_language_model_run_exports_merged_to_transformers(tmp_path):
  """A causal-LM run on a GPT-2 folder with adapters on the attention and MLP input projections (everything else
  frozen): only adapters train; the run's parameters read back merged (no adapter left), give the adapted model's
  logits (1e-5 times their scale above 1), and transformers loads the exported folder with the same logits
  (1e-4 times scale: another implementation)."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from test_decoder_transfer import decoder_folder
  from transfer import config_base, hf_export
  corpus = [f"the {a} {b} sat on the {c}" for a in ("red", "big", "old") for b in ("cat", "dog", "bird")
            for c in ("mat", "hill", "roof")]
  folder = decoder_folder(tmp_path / "ckpt", corpus, vocab=200, width=32)
  (tmp_path / "text.txt").write_text("\n\n".join(corpus * 4) + "\n")
  c = config_base.base()
  c.task, c.model.name, c.model.pretrained, c.model.dropout = "causal_lm", "gpt2", folder, 0.0
  c.data.name, c.data.max_length, c.data.train_file = "lm_text", 16, str(tmp_path / "text.txt")
  c.batch_size, c.eval_batch_size, c.total_steps, c.log_every = 8, 16, 12, 6
  c.schedule.lr, c.schedule.warmup_steps, c.checkpoint.every_steps = 1e-2, 0, 0
  c.param_rules = [("backbone/.*(c_attn|c_fc)/kernel", dict(lora=dict(rank=4, alpha=8))), (".*", dict(freeze=True))]
  workdir = str(tmp_path / "run")
  train.train(c, workdir)
  saved = restore_checkpoint(workdir)
  assert sorted(rules.flatten(saved["trainable"])) == sorted(
      f"backbone/h_{i}/{part}/lora_{ab}" for i in (0, 1) for part in ("attn/c_attn", "c_fc") for ab in "ab")
  assert "frozen" not in saved   # the base is the folder's, recorded by digest

  config, merged, _, _ = runs.variables_from_workdir(workdir)
  model_cfg = config.model
  assert not any(lora.is_adapter(p) for p in merged)
  ids = np.array([[5, 9, 17, 33, 2, 40]], np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  base = models.build_lm(model_cfg)
  adapted = models.with_adapters(base, c.param_rules)
  _, variables = load_pretrained(folder)
  params = {**rules.flatten(variables["params"]), **rules.flatten(saved["trainable"])}
  expected = np.asarray(adapted.apply({"params": rules.unflatten(params)}, batch))
  got = np.asarray(base.apply({"params": rules.unflatten(merged)}, batch))
  scale = max(1.0, np.abs(expected).max())
  np.testing.assert_allclose(got, expected, rtol=0, atol=MERGE_TOL * scale)

  with open(os.path.join(folder, "config.json")) as f:
    out = hf_export.save_decoder(tmp_path / "export", merged, json.load(f), tokenizer_folder=folder)
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)).logits.numpy()
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(torch.tensor(ids)).logits.numpy()
  assert np.abs(theirs - expected).max() < 1e-4 * scale
  assert np.abs(original - expected).max() > 1e-2   # the adapters learnt something

  # The same run as PEFT adapters on the folder's transformers model (GPT-2's Conv1D: fan_in_fan_out).
  peft = pytest.importorskip("peft")
  from transfer import export
  adapters = tmp_path / "peft"
  export.export(workdir, adapters, "peft")
  adapter_config = json.load(open(adapters / "adapter_config.json"))
  assert adapter_config["fan_in_fan_out"] and adapter_config["task_type"] == "CAUSAL_LM"
  assert adapter_config["target_modules"] == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn",
                                                                                                  "mlp.c_fc")]
  with torch.no_grad():
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), adapters)
    theirs = peft_model.eval()(torch.tensor(ids)).logits.numpy()
  assert np.abs(theirs - expected).max() < 1e-4 * scale

  # The base changes under the run (a re-saved folder with one tensor altered): resuming, exporting are refused.
  state = load_file(os.path.join(folder, "model.safetensors"))
  key = next(k for k in state if k.endswith("h.0.mlp.c_fc.weight"))
  state[key] = state[key] * 1.01
  save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"the base model under this run's trained parameters changed: config.model."
                                       r"pretrained='.*ckpt' now gives 1 of 28 arrays different .* e.g. "
                                       r"frozen/backbone/h_0/c_fc/kernel"):
    train.train(c, workdir)
  with pytest.raises(ValueError, match=r"trained parameters changed since it was trained: 1 arrays differ"):
    runs.variables_from_workdir(workdir)


def test_adapters_stay_float32_under_a_bfloat16_base():
  """A bfloat16 encoder: the adapters are float32 parameters (their updates are not rounded away), the adapted
  output is bfloat16 like the base's, and at step 0 it is the base's exactly."""
  model = TextClassifier(backbone=bert.BertEncoder(BERT, dtype=jnp.bfloat16), num_classes=3)
  adapters = lora.targets([ATTN, (".*", {})])
  batch = _text_batch()
  params = _adapted_params(model, batch, adapters)
  flat = rules.flatten(params)
  assert {flat[p].dtype for p in flat if lora.is_adapter(p)} == {jnp.dtype(jnp.float32)}
  base = {p: v for p, v in flat.items() if not lora.is_adapter(p)}
  features = lambda m, p: m.clone(num_classes=None).apply({"params": p}, batch)
  adapted = features(model.clone(adapters=adapters), params)
  assert adapted.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(adapted, np.float32),
                                np.asarray(features(model, rules.unflatten(base)), np.float32))
