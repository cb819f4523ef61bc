"""config.model.remat (transfer/models/layers.py: ``remat``): rematerialised blocks compute the same loss and
gradients as kept activations (same params, same dropout rng: the recomputation draws the same masks), keep the
parameter paths that checkpoint key tables name, lower the compiled gradient's temporary memory, and leave cached
decoding unchanged.

Gradients are compiled with the trainer's options (``layers.compiler_options``): without them XLA's CPU
backend drops remat's CSE barriers and merges the recomputation back into the forward pass, so nothing would be
recomputed (and no memory saved). Tolerance: losses and gradients within 1e-6 max-abs times max(1, the gradients'
largest entry), float32 (measured: <= 1e-7).
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from transfer import models, rules  # noqa: E402
from transfer.models import gpt2, layers  # noqa: E402

POLICIES = models.REMAT_POLICIES
TOLERANCE = 1e-6
# Dropout keys: XLA's CPU backend compiles RngBitGenerator's bits twice as fast as threefry's, and the masks are
# as reproducible (the test is about recomputation drawing the same ones).
dropout_key = lambda seed: jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
  """config.json folders of tiny 1-block models (vit-test8 has 2), dropout on (HF's defaults; Llama's attention
  dropout set)."""
  tmp = tmp_path_factory.mktemp("architectures")
  folders = {}
  for name, config in (
      ("bert", transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32)),
      ("gpt2", transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                       bos_token_id=1, eos_token_id=2)),
      ("llama", transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                         attention_dropout=0.1, bos_token_id=1, eos_token_id=2))):
    folders[name] = str(tmp / name)
    config.save_pretrained(folders[name])
  return folders


def _cfg(name, architecture, remat):
  cfg = ml_collections.ConfigDict({"name": name, "architecture": architecture, "pretrained": None, "remat": remat})
  if name.startswith("vit"):
    cfg.drop_path = 0.2   # the blocks' only randomness in a ViT
  return cfg


def _batch(name, n=4, length=16):
  rng = np.random.default_rng(0)
  if name.startswith("vit"):
    return {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), "label": rng.integers(0, 3, n)}
  mask = np.ones((n, length), np.int32)
  mask[0, :5] = 0   # one left-padded row
  return {"input_ids": rng.integers(3, 64, (n, length)).astype(np.int32), "attention_mask": mask,
          "label": rng.integers(0, 3, n).astype(np.int32)}


def _param_shapes(model, batch):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]


def _params(model, batch):
  """Random params of the model's shapes (no init to compile; a LayerNorm scale near 1 is not needed here)."""
  rng = np.random.default_rng(1)
  return rules.unflatten({p: rng.normal(0, 0.2, v.shape).astype(np.float32)
                          for p, v in rules.flatten(_param_shapes(model, batch)).items()})


def _loss_fn(model, batch):
  labels = jax.nn.one_hot(batch["label"], 3)

  def loss(params, key):
    logits = model.apply({"params": params}, batch, train=True, rngs={"dropout": key})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))
  return loss


def _compiled_grad(model, batch, params):
  """``(params, dropout key) -> (loss, gradients)``, compiled with the trainer's options, plus LLVM's optimisation
  level 0 (half the compile time; the HLO passes, CSE included, and the buffer assignment are unchanged)."""
  options = {**(layers.compiler_options() or {}), "xla_backend_optimization_level": "0"}
  return jax.jit(jax.value_and_grad(_loss_fn(model, batch)), compiler_options=options).lower(
      params, dropout_key(0)).compile()


@pytest.mark.parametrize("name", ["vit-test8", "bert", "gpt2", "llama"])
def test_every_policy_gives_the_same_loss_gradients_and_param_paths(name, architectures):
  batch = _batch(name)
  built = {p: models.build(_cfg(name, architectures.get(name), p), 3) for p in POLICIES}
  params = _params(built["none"], batch)
  paths = sorted(rules.flatten(params))
  # the key tables' names: backbone/block_i/..., layer_i, h_i, layers_i
  blocks = {m.group(0) for p in paths if (m := re.match(r"backbone/(block|layer|h|layers)_\d+/", p))}
  assert blocks, paths
  results = {}
  for policy, model in built.items():
    assert sorted(rules.flatten(_param_shapes(model, batch))) == paths, policy
    forward = str(jax.make_jaxpr(_loss_fn(model, batch))(params, dropout_key(7)))
    assert forward.count("remat2[") == (0 if policy == "none" else len(blocks)), policy   # one remat per block
    assert ("policy=<function save_projections" in forward) == (policy == "dots"), policy
    step = _compiled_grad(model, batch, params)
    loss, grads = step(params, dropout_key(7))
    results[policy] = float(loss), rules.flatten(grads)
    if policy == "none":   # dropout is on (another key, another loss), so equal losses below mean equal masks
      assert abs(float(step(params, dropout_key(8))[0]) - float(loss)) > 1e-4
  reference_loss, reference = results["none"]
  scale = max(1.0, max(float(np.abs(g).max()) for g in reference.values()))
  for policy in ("block", "dots"):
    loss, grads = results[policy]
    assert abs(loss - reference_loss) <= TOLERANCE, (policy, loss, reference_loss)
    worst = max(float(np.abs(grads[p] - reference[p]).max()) for p in paths)
    assert worst <= TOLERANCE * scale, (policy, worst)


def test_block_remat_shrinks_the_compiled_gradients_temporary_memory(tmp_path):
  """GPT-2 of 4 blocks, width 64, batch 8 x 64 tokens (activations dominate, as in real fine-tuning). Measured
  temp bytes: none 20.9 MB, block 6.7 MB (0.32x), dots 9.3 MB (0.45x); asserted with margin."""
  folder = str(tmp_path / "gpt2")
  transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=64).save_pretrained(folder)
  batch = {"input_ids": np.random.default_rng(0).integers(0, 128, (8, 64)).astype(np.int32),
           "attention_mask": np.ones((8, 64), np.int32), "label": np.zeros(8, np.int32)}
  temp = {}
  for policy in ("none", "block"):
    model = models.build(_cfg("gpt2", folder, policy), 3)
    params = _param_shapes(model, batch)
    temp[policy] = _compiled_grad(model, batch, params).memory_analysis().temp_size_in_bytes
  assert temp["block"] <= 0.6 * temp["none"], temp


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_decoding_is_unchanged_by_remat(name, architectures):
  """A prefill into the KV cache and one cached step: the same logits with remat as without (the blocks take the
  cache and its traced index through ``nn.remat``). tests/test_generate.py runs whole generations."""
  ids = np.random.default_rng(0).integers(3, 64, (2, 5)).astype(np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
  logits = {}
  for policy in ("none", "block"):
    module = models.build_lm(_cfg(name, architectures[name], policy))
    variables = {"params": _params(module, {"input_ids": ids, "attention_mask": mask})}

    def prefill_and_step(variables):
      cache = module.apply(variables, 2, 8, method="init_cache")
      first, cache = module.apply(variables, ids, mask, cache=cache, method="decode")
      step = jnp.argmax(first[:, -1], axis=-1)[:, None]
      second, _ = module.apply(variables, step, jnp.ones_like(step), cache=cache, method="decode")
      return first, second
    logits[policy] = jax.jit(prefill_and_step)(variables)
  for cached, reference in zip(logits["block"], logits["none"]):
    np.testing.assert_allclose(cached, reference, rtol=0, atol=1e-6)


def test_an_unknown_policy_names_config_model_remat():
  with pytest.raises(ValueError, match=r"config.model.remat: 'scan' is not one of \('none', 'block', 'dots'\)"):
    layers.remat(gpt2.Block, "scan")
  model = models.build(_cfg("vit-test8", None, "everything"), 3)
  with pytest.raises(ValueError, match=r"config.model.remat: 'everything'"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _batch("vit-test8", n=1)))
  assert layers.remat(gpt2.Block, "none") is gpt2.Block
