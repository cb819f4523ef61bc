"""EfficientNet-Lite from timm's ``tf_efficientnet_lite*`` state dicts: parity with timm, loading, bad input.

timm's ``tf_`` models are the TF "lite" network our module implements (TF "SAME" padding from the actual input,
BatchNorm eps 1e-3, ReLU6, no squeeze-excitation); their blocks are numbered per stage, ours flat. References have
random weights with randomised, calibrated BatchNorm. Tolerance: 1e-4 max-abs on logits in float32.
"""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from torch_refs import images, numpy_state, randomize_norms, torch_input  # noqa: E402
from transfer import models, pretrained, rules  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import efficientnet_lite  # noqa: E402

TOL = 1e-4  # float32 max-abs on logits
HALF = (0.5, 0.5, 0.5)   # [-1, 1] inputs


def _reference(variant: int, size: int, seed: int = 0):
  torch.manual_seed(seed)
  ref = timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=10)
  with torch.no_grad():   # timm's head init gives logits ~15, where float32 rounding alone is ~1e-4
    ref.classifier.weight.normal_(0.0, ref.num_features ** -0.5), ref.classifier.bias.normal_(0.0, 0.1)
  return randomize_norms(torch, ref, torch_input(torch, images(4, size, seed=seed + 100), HALF, HALF), seed=seed)


def _logits(module, variables, x):
  return np.asarray(jax.jit(lambda v, x: module.apply(v, {"image": x}))(variables, x))


@pytest.mark.parametrize("variant,size", [(0, 64), (2, 67)])   # 67: odd sizes at every stride-2 conv
def test_timm_parity(variant, size):
  ref = _reference(variant, size)
  flat = efficientnet_lite.convert_state_dict(numpy_state(ref), source_name=f"timm lite{variant}")
  module = models.build(ml_collections.ConfigDict({"name": f"efficientnet-lite{variant}"}), 10)
  x = images(3, size)
  init = rules.flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), {"image": x})))
  assert {k: tuple(v.shape) for k, v in init.items()} == {k: v.shape for k, v in flat.items()}
  with torch.no_grad():
    want = ref(torch_input(torch, x, HALF, HALF)).numpy()
  assert want.std(0).mean() > 0.05, "reference logits too degenerate for a meaningful comparison"
  np.testing.assert_allclose(_logits(module, rules.unflatten(flat), x), want, rtol=0, atol=TOL)


def test_load_pretrained_timm_file_and_squeeze_excitation_is_refused(tmp_path):
  ref = _reference(1, 48, seed=1)
  torch.save(ref.state_dict(), tmp_path / "lite1.pth")
  module, variables = pretrained.load_pretrained(str(tmp_path / "lite1.pth"), model="efficientnet-lite1")
  assert sum(k.startswith("batch_stats/") for k in rules.flatten(variables)) > 0
  x = images(2, 48, seed=1)
  with torch.no_grad():
    want = ref(torch_input(torch, x, HALF, HALF)).numpy()
  np.testing.assert_allclose(_logits(module, variables, x), want, rtol=0, atol=TOL)
  # A lite1 checkpoint given as lite3 (wider, three blocks more): the strict diff lists what does not fit.
  with pytest.raises(ConversionError, match=r"lite1\.pth does not fit the model.*\n  missing from checkpoint \(\d+\)"
                                            r":\n    batch_stats/backbone/block_21/"):
    pretrained.load_pretrained(str(tmp_path / "lite1.pth"), model="efficientnet-lite3")
  # EfficientNet-B0 has squeeze-excitation, which the lite network lacks: its keys are named, not dropped.
  b0 = numpy_state(timm.create_model("tf_efficientnet_b0", num_classes=10))
  with pytest.raises(ConversionError, match=r"unmatched keys \(\d+\):\n    blocks\.0\.0\.se\.conv_expand\.bias"):
    efficientnet_lite.convert_state_dict(b0, source_name="b0")
