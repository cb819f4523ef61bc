"""The gradient barrier of pre-LayerNorm stacks (transfer/models/layers.py: ``gradient_barrier``).

In ``x + f(LN(x))`` blocks the residual stream's gradient is a chain of adds through every later block, and XLA's
CPU backend fuses that chain into each consumer: the largest backward fusion grows with depth (and its cost with
depth squared). A barrier on the cotangent at each block's input and after the attention residual keeps it
materialised. Structure of the compiled gradient, not timing: with the trainer's compiler options the largest
fusion of an 8-block model is no larger than a 2-block model's, while without them it grows (ViT, GPT-2; XLA does
not duplicate Llama's RMSNorm chain, so there the barrier changes nothing, measured); the gradients equal the
unbarriered ones (XLA drops the barriers without the options) to 1e-6 relative to their scale, float32.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import rules
from transfer.models import gpt2, layers, llama, vit
from transfer.models.classifier import ImageClassifier


def _image_case(depth):
  model = ImageClassifier(backbone=vit.ViT(8, 32, depth, 4, 64, (2, 2)), num_classes=3)
  batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)}
  return model, batch


def _text_batch():
  return {"input_ids": np.random.default_rng(0).integers(0, 50, (4, 12)).astype(np.int32),
          "attention_mask": np.ones((4, 12), np.int32)}


CASES = {
    "vit": _image_case,
    "gpt2": lambda depth: (gpt2.causal_lm(gpt2.GPT2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=depth, num_attention_heads=4, max_position_embeddings=16,
        intermediate_size=64)), _text_batch()),
    "llama": lambda depth: (llama.causal_lm(llama.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=depth, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=16)), _text_batch()),
}
GROWS_WITHOUT_BARRIER = {"vit": True, "gpt2": True, "llama": False}


def _compiled_gradient(name, depth, options):
  """(gradient of a scalar of the outputs w.r.t. every parameter, the optimised HLO text)."""
  model, batch = CASES[name](depth)
  params = jax.jit(lambda r: model.init(r, batch))(jax.random.PRNGKey(0))["params"]
  rng = np.random.default_rng(1)   # a new head starts at zero: give every parameter weights
  params = rules.unflatten({p: (v + rng.normal(0, 0.2, np.shape(v))).astype(np.float32)
                            for p, v in rules.flatten(params).items()})

  def loss(params):
    out = model.apply({"params": params}, batch)
    return jnp.mean(jnp.tanh(out.astype(jnp.float32)) ** 2)

  compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(params).compile()
  return rules.flatten(compiled(params)), compiled.as_text()


def _largest_fusion(hlo: str) -> int:
  return max(len(m.group(1).split(", ")) for m in re.finditer(r"= \S+ fusion\((.*?)\), kind=", hlo))


@pytest.mark.parametrize("name", sorted(CASES))
def test_largest_backward_fusion_does_not_grow_with_depth_and_gradients_are_unchanged(name):
  options = layers.compiler_options()
  assert options, "these tests run on CPU, where the barrier is on"
  barrier = {d: _compiled_gradient(name, d, options) for d in (2, 8)}
  fused = {d: _compiled_gradient(name, d, None) for d in (2, 8)}
  sizes = {d: _largest_fusion(barrier[d][1]) for d in (2, 8)}
  unbarriered = {d: _largest_fusion(fused[d][1]) for d in (2, 8)}
  assert barrier[8][1].count("opt-barrier(") >= 2 * 8
  assert sizes[8] <= sizes[2], (sizes, unbarriered)
  # What the barrier is for: without it the fusion grows with depth (a full ViT-S/16 gradient 1.95x slower).
  assert (unbarriered[8] > unbarriered[2]) == GROWS_WITHOUT_BARRIER[name], unbarriered
  for depth in (2, 8):
    grads, reference = barrier[depth][0], fused[depth][0]
    scale = max(1.0, max(float(np.abs(g).max()) for g in reference.values()))
    for path, g in reference.items():
      np.testing.assert_allclose(grads[path], g, rtol=0, atol=1e-6 * scale, err_msg=f"{name} depth {depth} {path}")
