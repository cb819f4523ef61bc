"""Which YNNPACK library fusions each family's programs get on CPU (transfer/models/layers.py: compiler_options).

Structure of the compiled programs, not timing (the timings are in experiments/results/library_fusions_2026-12-07.json):
XLA's default hands a BERT layer's attention core (QK^T, mask, softmax, AV) to YNNPACK as one op, and a CNN's
convolutions too. Under the family's options a transformer's programs make no library fusion and a BatchNorm CNN's
only reductions. The choice changes speed, not results: outputs and gradients equal XLA's default's to 1e-5 of their
scale (float32).
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from transfer import models, rules
from transfer.models import bert, layers

TOLERANCE = 1e-5   # max-abs, relative to the output's scale above 1


def _library_fusions(hlo: str) -> list[set[str]]:
  """The opcodes inside each YNNPACK fusion of an optimised HLO module."""
  bodies = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  called = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", hlo)
  return [set(re.findall(r"= \S+ ([\w\-]+)\(", bodies[name])) for name in called]


def _compiled(fn, args, options):
  compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def _close(a, b):
  scale = max(1.0, float(np.abs(b).max()))
  return float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= TOLERANCE * scale


def test_every_family_has_chosen_its_library_fusions():
  """A family's choice is measured (experiments/results/library_fusions_2026-12-07.json), never left to XLA's
  default by accident; every kind it names is one ``compiler_options`` knows."""
  for name, fam in models.FAMILIES.items():
    assert fam.cpu_library_fusions is not None, name
    assert set(fam.cpu_library_fusions) <= set(layers.LIBRARY_FUSIONS), (name, fam.cpu_library_fusions)


def test_bert_attention_core_is_no_longer_a_library_fusion():
  config = bert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2,
                           layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                           pad_token_id=0, model_type="bert")
  model = bert.BertEncoder(config)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 100, (8, 32)).astype(np.int32)
  mask = np.ones_like(ids)
  variables = model.init(jax.random.PRNGKey(0), ids, mask)
  forward = lambda v: model.apply(v, ids, mask)[0]
  reference, default_hlo = _compiled(forward, (variables,), None)
  out, hlo = _compiled(forward, (variables,), layers.compiler_options(models.FAMILIES["bert"].cpu_library_fusions))
  # What the options are for: XLA's default fuses each layer's scores, softmax and weighted sum into one op.
  attention = [ops for ops in _library_fusions(default_hlo) if {"dot", "exponential"} <= ops]
  assert len(attention) == config.num_hidden_layers, _library_fusions(default_hlo)
  assert _library_fusions(hlo) == []
  assert _close(out, reference)


class _ConvBatchNorm(nn.Module):
  """Two of a CNN family's conv -> BatchNorm -> ReLU6 units, built with the families' own BatchNorm factory."""

  @nn.compact
  def __call__(self, x, train: bool):
    bn = layers.batch_norm_factory(train=train, momentum=0.9, epsilon=1e-3, dtype=jnp.float32)
    for i, features in enumerate((16, 32)):
      x = nn.relu6(bn(f"bn{i}")(nn.Conv(features, (3, 3), use_bias=False, name=f"conv{i}")(x)))
    return jnp.mean(x, axis=(1, 2))


def test_batchnorm_cnn_keeps_only_reduction_fusions_in_its_training_gradient():
  """A CNN in training mode (BatchNorm on batch statistics), with EfficientNet-Lite's choice: its convolutions
  stay with XLA, its statistics' reductions go to YNNPACK (without them that family's full step is 3x slower)."""
  model = _ConvBatchNorm()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.tanh(out) ** 2)

  grad = jax.grad(loss)
  reference, default_hlo = _compiled(grad, (variables["params"],), None)
  out, hlo = _compiled(grad, (variables["params"],),
                       layers.compiler_options(models.FAMILIES["efficientnet_lite"].cpu_library_fusions))
  assert any("convolution" in ops for ops in _library_fusions(default_hlo)), _library_fusions(default_hlo)
  kept = _library_fusions(hlo)
  assert kept and all("reduce" in ops and "convolution" not in ops and "dot" not in ops for ops in kept), kept
  for path, g in rules.flatten(out).items():
    assert _close(g, rules.flatten(reference)[path]), path


def test_the_trainer_compiles_both_steps_with_the_family_options(monkeypatch):
  """``transfer.plan`` compiles the trainer's own steps (``train.sharded_steps``): both jits get the options."""
  from transfer import plan
  seen = []
  real_jit = jax.jit

  def spy(fn, *args, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(fn, *args, **kwargs)

  config = tiny_config(param_rules=[("head/.*", {}), ("backbone/.*", dict(freeze=True))])   # compiles quickly
  monkeypatch.setattr(jax, "jit", spy)
  plan.plan(config)
  expected = models.compiler_options(config.model)
  assert expected["xla_cpu_experimental_ynn_fusion_type"] == "LIBRARY_FUSION_TYPE_REDUCE"
  assert seen.count(expected) >= 2, seen


def test_an_xla_flags_choice_wins(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  assert "xla_cpu_experimental_ynn_fusion_type" not in layers.compiler_options(("reduce",))
  monkeypatch.setenv("XLA_FLAGS", "")
  assert layers.compiler_options(())["xla_cpu_experimental_ynn_fusion_type"] == ""
  with pytest.raises(ValueError, match="library fusions \\['convolution'\\]"):
    layers.compiler_options(("convolution",))
