"""ResNet v2 as in BiT: numerical parity with timm's BiT network from Google's .npz layout and timm's state-dict
layout, loading through ``load_pretrained``, registry sizes, bad input.

The reference (timm's ``ResNetV2`` as ``resnetv2_*_bit`` builds it) has random weights, random GroupNorm affines
and a head scaled so the logits vary. Its weights are written out as Google's BiT .npz (the inverse of timm's
own npz loader, checked by loading the file back into timm). Models run on uint8 images ([-1, 1] inside).
Tolerance: 1e-4 max-abs on logits in float32.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from torch_refs import images, numpy_state, randomize_norms, torch_input  # noqa: E402
from transfer import pretrained, rules  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import resnetv2  # noqa: E402
from transfer.models.classifier import ImageClassifier  # noqa: E402

TOL = 1e-4  # float32 max-abs on logits
HALF = (0.5, 0.5, 0.5)   # BiT's inputs are [-1, 1]: (x / 255 - 0.5) / 0.5


def _reference(depths, width, num_classes=10, seed=0):
  """timm's BiT network (``resnetv2_50x1_bit``'s constructor arguments) with random GroupNorm affines and a head
  large enough that the logits vary (timm initialises it at std 0.01)."""
  torch.manual_seed(seed)
  ref = timm.models.resnetv2.ResNetV2(list(depths), width_factor=width, num_classes=num_classes, stem_type="fixed",
                                      conv_layer=partial(timm.layers.StdConv2d, eps=1e-8))
  with torch.no_grad():
    ref.head.fc.weight.normal_(0.0, 2.0 / ref.num_features ** 0.5), ref.head.fc.bias.normal_(0.0, 0.5)
  return randomize_norms(torch, ref, None, seed=seed)


def _google_npz(ref) -> dict[str, np.ndarray]:
  """The reference's weights in Google's BiT .npz layout: the inverse of timm's ``resnetv2._load_weights``."""
  hwio = lambda w: w.detach().numpy().transpose(2, 3, 1, 0).copy()
  vec = lambda p: p.detach().numpy().copy()
  out = {"resnet/root_block/standardized_conv2d/kernel": hwio(ref.stem.conv.weight),
         "resnet/group_norm/gamma": vec(ref.norm.weight), "resnet/group_norm/beta": vec(ref.norm.bias),
         "resnet/head/conv2d/kernel": hwio(ref.head.fc.weight), "resnet/head/conv2d/bias": vec(ref.head.fc.bias)}
  for i, stage in enumerate(ref.stages):
    for j, block in enumerate(stage.blocks):
      unit = f"resnet/block{i + 1}/unit{j + 1:02d}/"
      for letter, n in zip("abc", (1, 2, 3)):
        out[f"{unit}{letter}/standardized_conv2d/kernel"] = hwio(getattr(block, f"conv{n}").weight)
        out[f"{unit}{letter}/group_norm/gamma"] = vec(getattr(block, f"norm{n}").weight)
        out[f"{unit}{letter}/group_norm/beta"] = vec(getattr(block, f"norm{n}").bias)
      if block.downsample is not None:
        out[f"{unit}a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
  return out


def _logits(module, variables, x):
  return np.asarray(jax.jit(lambda v, x: module.apply(v, {"image": x}))(variables, x))


def _ref_logits(ref, x):
  with torch.no_grad():
    return ref(torch_input(torch, x, HALF, HALF)).numpy()


@pytest.mark.parametrize("depths,width,size", [
    ((3, 4, 6, 3), 1, 64),    # R50x1 (bit-r50x1)
    ((1, 1, 1, 1), 2, 56),    # another depth, width factor 2; 56 px: odd sizes after the stem
])
def test_npz_and_timm_layouts_match_timm(tmp_path, depths, width, size):
  ref = _reference(depths, width)
  arrays = _google_npz(ref)
  np.savez(tmp_path / "bit.npz", **arrays)
  x = images(3, size)
  want = _ref_logits(ref, x)
  assert want.std(0).mean() > 0.05, "reference logits too degenerate for a meaningful comparison"

  # The file really is in the layout timm's BiT loader reads: a fresh timm model loaded from it agrees.
  fresh = _reference(depths, width, seed=1)
  fresh.load_pretrained(str(tmp_path / "bit.npz"))
  np.testing.assert_array_equal(_ref_logits(fresh, x), want)

  if depths == resnetv2.VARIANTS["bit-r50x1"]["depths"] and width == 1:
    module, variables = pretrained.load_pretrained(str(tmp_path / "bit.npz"), model="bit-r50x1")
  else:
    module = ImageClassifier(resnetv2.ResNetV2(depths, width), num_classes=10)
    variables = rules.unflatten(resnetv2.convert_state_dict(pretrained.read_checkpoint(str(tmp_path / "bit.npz"))))
  assert "batch_stats" not in variables and module.num_classes == 10
  init = rules.flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), {"image": x})))
  assert sorted(init) == sorted(rules.flatten(variables))
  np.testing.assert_allclose(_logits(module, variables, x), want, rtol=0, atol=TOL)

  # timm's own state-dict layout converts to the same variables.
  from_timm = resnetv2.convert_state_dict(numpy_state(ref), source_name="timm resnetv2")
  for k, v in rules.flatten(variables).items():
    np.testing.assert_array_equal(from_timm[k], np.asarray(v), err_msg=k)


def test_registry_sizes_are_timms():
  """Every registered BiT size against timm's ``resnetv2_*_bit`` (meta device: shapes only)."""
  for name, v in resnetv2.VARIANTS.items():
    depth, width = name[len("bit-r"):].split("x")
    with torch.device("meta"):
      ref = timm.create_model(f"resnetv2_{depth}x{width}_bit")
    assert tuple(len(stage.blocks) for stage in ref.stages) == v["depths"], name
    assert (ref.stem.conv.out_channels, ref.num_features) == (64 * v["width"], 2048 * v["width"]), name


def test_bad_npz_names_the_arrays(tmp_path):
  good = _google_npz(_reference((1, 1, 1, 1), 0.5, seed=2))
  vit_like = {"embedding/kernel": np.zeros((16, 16, 3, 8), np.float32), "cls": np.zeros((1, 1, 8), np.float32)}
  np.savez(tmp_path / "vit.npz", **vit_like)
  with pytest.raises(ConversionError, match=r"vit\.npz is in none of the BiT ResNet v2 checkpoint layouts.*"
                                            r"Google BiT \.npz.*Its keys: cls, embedding/kernel"):
    pretrained.load_pretrained(str(tmp_path / "vit.npz"), model="bit-r50x1")
  extra = dict(good, **{"resnet/block1/unit01/a/weight_std/scale": np.ones(32, np.float32)})
  with pytest.raises(ConversionError, match=r"unmatched keys \(1\):\n    resnet/block1/unit01/a/weight_std/scale"):
    resnetv2.convert_state_dict(extra, source_name="extra.npz")
  np.savez(tmp_path / "object.npz", **dict(good, **{"resnet/meta": np.array([{"a": 1}], dtype=object)}))
  with pytest.raises(ValueError, match=r"object\.npz: not a plain numeric \.npz"):
    pretrained.load_pretrained(str(tmp_path / "object.npz"), model="bit-r50x1")
  with pytest.raises(ValueError, match=r"config\.model\.width=0\.25: 64 x 0\.25 = 16 channels"):
    ImageClassifier(resnetv2.ResNetV2((1, 1, 1, 1), 0.25), 3).init(jax.random.PRNGKey(0), {"image": images(1, 32)})
