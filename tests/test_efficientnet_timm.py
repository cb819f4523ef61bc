"""EfficientNet-Lite from timm's state dicts: parity with timm, loading, bad input.

timm's ``tf_efficientnet_lite*`` models are the TF "lite" network (padding 'same': TF "SAME" padding from the
actual input, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation); its ``efficientnet_lite*`` models are the same
architecture with symmetric k//2 padding and eps 1e-5 (padding 'symmetric'), with the same keys and shapes. Their
blocks are numbered per stage, ours flat. References have random weights with randomised, calibrated BatchNorm.
Tolerance: 1e-4 max-abs on logits in float32. Measured: 1e-5 to 2.4e-5; the other padding is off by more than 1.
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


def _reference(variant: int, size: int, seed: int = 0, prefix: str = "tf_"):
  """A random-weight timm ``{prefix}efficientnet_lite{variant}``: prefix 'tf_' (TF padding) or '' (symmetric)."""
  torch.manual_seed(seed)
  ref = timm.create_model(f"{prefix}efficientnet_lite{variant}", num_classes=10)
  with torch.no_grad():   # timm's head init gives logits ~15, where float32 rounding alone is ~1e-4
    ref.classifier.weight.normal_(0.0, ref.num_features ** -0.5), ref.classifier.bias.normal_(0.0, 0.1)
  return randomize_norms(torch, ref, torch_input(torch, images(4, size, seed=seed + 100), HALF, HALF), seed=seed)


def _logits(module, variables, x):
  return np.asarray(jax.jit(lambda v, x: module.apply(v, {"image": x}))(variables, x))


@pytest.mark.parametrize("variant,size", [(0, 64), (2, 67)])   # 67: odd sizes at every stride-2 conv
def test_timm_parity(variant, size):
  ref = _reference(variant, size)
  flat = efficientnet_lite.convert_state_dict(numpy_state(ref), source_name=f"timm lite{variant}", padding="same")
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
  # timm's layout holds two networks: which one is for the caller to say, never guessed.
  with pytest.raises(ValueError, match=r"lite1\.pth is in timm's EfficientNet-Lite layout.*config\.model\.padding="
                                       r"'same' for tf_efficientnet_lite\*, 'symmetric' for timm's efficientnet_lite"):
    pretrained.load_pretrained(str(tmp_path / "lite1.pth"), model="efficientnet-lite1")
  module, variables = pretrained.load_pretrained(str(tmp_path / "lite1.pth"), model="efficientnet-lite1",
                                                 padding="same")
  assert module.backbone.padding == "same"
  assert sum(k.startswith("batch_stats/") for k in rules.flatten(variables)) > 0
  x = images(2, 48, seed=1)
  with torch.no_grad():
    want = ref(torch_input(torch, x, HALF, HALF)).numpy()
  np.testing.assert_allclose(_logits(module, variables, x), want, rtol=0, atol=TOL)
  # A lite1 checkpoint given as lite3 (wider, three blocks more): the strict diff lists what does not fit.
  with pytest.raises(ConversionError, match=r"lite1\.pth does not fit the model.*\n  missing from checkpoint \(\d+\)"
                                            r":\n    batch_stats/backbone/block_21/"):
    pretrained.load_pretrained(str(tmp_path / "lite1.pth"), model="efficientnet-lite3", padding="same")
  # EfficientNet-B0 has squeeze-excitation, which the lite network lacks: its keys are named, not dropped.
  b0 = numpy_state(timm.create_model("tf_efficientnet_b0", num_classes=10))
  with pytest.raises(ConversionError, match=r"unmatched keys \(\d+\):\n    blocks\.0\.0\.se\.conv_expand\.bias"):
    efficientnet_lite.convert_state_dict(b0, source_name="b0", padding="same")


@pytest.mark.parametrize("size", [64, 67])   # 64: even sizes at every stride-2 conv; 67: odd and even ones
def test_symmetric_padding_matches_timm_efficientnet_lite(size):
  """timm's own efficientnet_lite0 (k//2 padding, BatchNorm eps 1e-5) with padding='symmetric'; the same weights in
  the TF network (padding='same') load without any error but give other logits: why the converter asks."""
  ref = _reference(0, size, prefix="")
  state = numpy_state(ref)
  x = images(3, size)
  with torch.no_grad():
    want = ref(torch_input(torch, x, HALF, HALF)).numpy()
  assert want.std(0).mean() > 0.05, "reference logits too degenerate for a meaningful comparison"
  logits = {}
  for padding in ("symmetric", "same"):
    cfg = ml_collections.ConfigDict({"name": "efficientnet-lite0", "padding": padding})
    flat = efficientnet_lite.convert_state_dict(state, source_name="timm lite0", padding=padding)
    logits[padding] = _logits(models.build(cfg, 10), rules.unflatten(flat), x)
  np.testing.assert_allclose(logits["symmetric"], want, rtol=0, atol=TOL)
  assert np.abs(logits["same"] - want).max() > 0.1   # measured 1.1 to 1.7


def test_checkpoint_padding_is_told_or_inferred_never_guessed():
  timm_state = numpy_state(timm.create_model("efficientnet_lite0", num_classes=3))
  with pytest.raises(ValueError, match=r"^ckpt\.pth is in timm's EfficientNet-Lite layout, which two networks share"
                                       r".*config\.model\.padding='same' for tf_efficientnet_lite\*, 'symmetric' for "
                                       r"timm's efficientnet_lite\*"):
    efficientnet_lite.checkpoint_padding(timm_state, None, source_name="ckpt.pth")
  with pytest.raises(ValueError, match=r"^ckpt\.pth is in timm's EfficientNet-Lite layout"):
    efficientnet_lite.convert_state_dict(timm_state, source_name="ckpt.pth")
  for padding in ("same", "symmetric"):
    assert efficientnet_lite.checkpoint_padding(timm_state, padding) == padding
  with pytest.raises(ValueError, match=r"config\.model\.padding='valid': expected 'same' .* or 'symmetric'"):
    efficientnet_lite.checkpoint_padding(timm_state, "valid")
  # The family's converter settles config.model.padding from what it is told; the backbone is then built with it.
  # timm's own network was trained on ImageNet mean/std inputs: its 'auto' input normalisation says so.
  cfg = ml_collections.ConfigDict({"name": "efficientnet-lite0", "padding": "symmetric", "input_norm": "auto"})
  efficientnet_lite.FAMILY.convert(timm_state, cfg=cfg, hf_config=None, source_name="ckpt.pth")
  assert cfg.padding == "symmetric" and models.backbone(cfg).padding == "symmetric"
  assert cfg.input_norm == "imagenet" and models.build(cfg, 3).input_std == (58.395, 57.12, 57.375)
  for padding, norm in (("symmetric", "inception"), ("same", "auto")):   # a set norm, or the TF network's: kept
    cfg = ml_collections.ConfigDict({"name": "efficientnet-lite0", "padding": padding, "input_norm": norm})
    efficientnet_lite.FAMILY.convert(timm_state, cfg=cfg, hf_config=None, source_name="ckpt.pth")
    assert cfg.input_norm == norm
  with pytest.raises(ValueError, match=r"config\.model\.padding='valid'"):
    models.build(ml_collections.ConfigDict({"name": "efficientnet-lite0", "padding": "valid"}), 3).init(
        jax.random.PRNGKey(0), {"image": images(1, 32)})
