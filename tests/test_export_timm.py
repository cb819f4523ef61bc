"""Export to timm (``Family.to_timm``): a classifier of each image family written as a timm state dict, loaded with
``load_state_dict(strict=True)`` into ``timm.create_model``, gives the same logits; what timm cannot build, and
variables without a timm key (or timm keys without a variable), are errors naming them.

Every variable of our models is drawn at random (norm affines, biases, class token, position table, head: what
``init`` leaves constant or small), and BatchNorm running statistics are calibrated on a batch and then perturbed,
so a wrong mapping of any of them shows (dropping one BatchNorm's statistics, or swapping a block's query and key,
moves the logits by 0.5 to 2). timm's side normalises the images with the mean/std of its data config, which the
export sets (``pretrained_cfg_overlay``). Tolerance: 1e-4 max-abs on logits in float32, relative to the logits'
scale when it is above 1 (as the parity tests); measured 5e-7 to 8e-5 (ResNet-50 at width 0.25, logits up to 8.6).
"""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from torch_refs import images, torch_input  # noqa: E402
from transfer import models, rules  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402

TOL = 1e-4  # float32 max-abs on logits, relative to their scale above 1
NUM_CLASSES = 7


def _config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def _random_variables(cfg, size: int, seed: int = 0) -> dict:
  """The classifier's variables, all drawn at random: kernels at std fan_in^-0.5 (so a ViT's attention is not
  uniform), norm scales and every bias, the class token and position table (``init`` leaves these constant or
  small); BatchNorm running statistics are one batch's statistics (momentum 0 for that step), then shifted and
  scaled per channel. Shapes come from an abstract ``init``: nothing is compiled for it."""
  model = models.build(cfg, NUM_CLASSES)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), {"image": images(1, size)}))
  rng, flat = np.random.default_rng(seed), {}
  for path, spec in rules.flatten(shapes).items():
    shape, leaf = spec.shape, path.rsplit("/", 1)[-1]
    if path.startswith("batch_stats/"):   # placeholders until calibrated below
      flat[path] = np.zeros(shape) if leaf == "mean" else np.ones(shape)
    elif leaf == "scale":
      flat[path] = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("bias", "cls", "pos_embedding"):
      flat[path] = rng.normal(0.0, 0.5 if leaf != "bias" else 0.2, shape)
    else:
      assert leaf == "kernel", path
      fan_in = shape[0] if any(f"/attn/{q}/" in path for q in ("query", "key", "value")) else np.prod(shape[:-1])
      flat[path] = rng.normal(0.0, float(fan_in) ** -0.5, shape)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  if any(k.startswith("batch_stats/") for k in flat):
    calibrating = models.build(ml_collections.ConfigDict({**cfg.to_dict(), "bn_momentum": 0.0}), NUM_CLASSES)
    _, updates = jax.jit(lambda v, x: calibrating.apply(v, {"image": x}, backbone_train=True, mutable=["batch_stats"]))(
        rules.unflatten(flat), images(4, size, seed=seed + 100))
    for path, stat in rules.flatten(updates["batch_stats"]).items():
      stat = np.asarray(stat, np.float32)
      perturbed = stat + rng.normal(0.0, 0.1, stat.shape) if path.endswith("/mean") else \
          stat * rng.uniform(0.8, 1.25, stat.shape)
      flat["batch_stats/" + path] = perturbed.astype(np.float32)
  return rules.unflatten(flat)


def _timm_model(name: str, kwargs: dict, state: dict):
  ref = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return ref.eval()


@pytest.mark.parametrize("fields,size,timm_name", [
    (dict(name="resnet18"), 64, "resnet18"),
    # Bottleneck blocks, a width timm builds from its `channels` argument, a custom input normalisation.
    (dict(name="resnet50", width=0.25, input_norm=[[100, 110, 120], 64]), 64, "resnet50"),
    (dict(name="bit-r50x1"), 64, "resnetv2_50x1_bit"),
    (dict(name="vit-test8"), 32, "vit_tiny_patch16_224"),
    (dict(name="vit-test8", pooling="mean", posemb_grid=6), 48, "vit_tiny_patch16_224"),
    (dict(name="efficientnet-lite0"), 64, "tf_efficientnet_lite0"),
    # Symmetric padding trained from scratch on [-1, 1] inputs: timm's own default for this name is ImageNet's.
    (dict(name="efficientnet-lite0", padding="symmetric"), 64, "efficientnet_lite0"),
], ids=["resnet18", "resnet50-w0.25", "bit-r50x1", "vit-test8-cls", "vit-test8-mean-grid6", "lite0-same",
        "lite0-symmetric"])
def test_exported_model_matches_ours_in_timm(fields, size, timm_name):
  cfg = _config(**fields)
  variables = _random_variables(cfg, size)
  name, kwargs, state = models.family(cfg.name).to_timm(rules.flatten(variables), cfg=cfg, num_classes=NUM_CLASSES)
  assert name == timm_name
  assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith(".num_batches_tracked"))
  ref = _timm_model(name, kwargs, state)

  x = images(3, size, seed=1)
  model = models.build(cfg, NUM_CLASSES)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, {"image": x}))(variables, x))
  data = timm.data.resolve_model_data_config(ref)
  np.testing.assert_allclose(np.array(data["mean"]) * 255, np.broadcast_to(model.input_mean, 3), rtol=1e-6)
  np.testing.assert_allclose(np.array(data["std"]) * 255, np.broadcast_to(model.input_std, 3), rtol=1e-6)
  with torch.no_grad():
    want = ref(torch_input(torch, x, data["mean"], data["std"])).numpy()
  assert want.std(0).mean() > 0.05, "logits too degenerate for a meaningful comparison"
  np.testing.assert_allclose(logits, want, rtol=0, atol=TOL * max(1.0, float(np.abs(want).max())))


def _zero_variables(cfg) -> dict:
  """Zeros of the classifier's shapes: enough for the export's key and shape checks, nothing computed."""
  shapes = jax.eval_shape(lambda: models.build(cfg, NUM_CLASSES).init(jax.random.PRNGKey(0), models.example_batch(
      cfg.name)))
  return {k: np.zeros(v.shape, np.float32) for k, v in rules.flatten(shapes).items()}


def test_variables_without_timm_key_or_missing_are_named():
  cfg = _config(name="resnet18", width=0.25)
  to_timm = models.family(cfg.name).to_timm
  flat = _zero_variables(cfg)
  name, kwargs, state = to_timm(flat, cfg=cfg, num_classes=NUM_CLASSES)
  assert state["fc.weight"].shape == (NUM_CLASSES, 128) and state["bn1.num_batches_tracked"].dtype == np.int64
  extra = {"params/backbone/stage1_block0/se/fc1/kernel": np.zeros((16, 4), np.float32)}
  with pytest.raises(ConversionError, match=r"variables with no timm key \(1\):\n    "
                                            r"params/backbone/stage1_block0/se/fc1/kernel"):
    to_timm({**flat, **extra}, cfg=cfg, num_classes=NUM_CLASSES)
  # An unmerged LoRA adapter: named, with the way out.
  adapter = {"params/backbone/stage1_block0/conv1/lora_a": np.zeros((3, 3, 64, 4), np.float32)}
  with pytest.raises(ConversionError, match=r"transfer\.models\.lora\.merge.*\n.*no timm key \(1\):\n    "
                                            r"params/backbone/stage1_block0/conv1/lora_a"):
    to_timm({**flat, **adapter}, cfg=cfg, num_classes=NUM_CLASSES)
  # A variable the table maps but this network lacks (a fifth block in stage 1).
  fifth = {"params/backbone/stage1_block4/conv1/kernel": np.zeros((3, 3, 16, 16), np.float32)}
  with pytest.raises(ConversionError, match=r"does not have \(1\):\n    params/backbone/stage1_block4/conv1/kernel "
                                            r"\(-> layer1\.4\.conv1\.weight\)"):
    to_timm({**flat, **fifth}, cfg=cfg, num_classes=NUM_CLASSES)
  # Missing variables leave timm keys unfilled: both named.
  partial = {k: v for k, v in flat.items() if k not in ("params/head/bias", "batch_stats/backbone/stem_bn/var")}
  with pytest.raises(ConversionError, match=r"left unfilled \(2\):\n    batch_stats/backbone/stem_bn/var "
                                            r"\(-> bn1\.running_var\)\n    params/head/bias \(-> fc\.bias\)"):
    to_timm(partial, cfg=cfg, num_classes=NUM_CLASSES)
  with pytest.raises(ConversionError, match=r"shape mismatch \(2\):\n    params/head/bias: \(7,\) vs the network's "
                                            r"\(3,\)\n    params/head/kernel: \(128, 7\) vs the network's \(128, 3\)"):
    to_timm(flat, cfg=cfg, num_classes=3)
  # ViT: query, key and value kernels all fuse into timm's qkv; the shapes follow the config's grid.
  vit_cfg = _config(name="vit-test8", posemb_grid=6)
  vit_state = models.family("vit-test8").to_timm(_zero_variables(vit_cfg), cfg=vit_cfg, num_classes=NUM_CLASSES)[2]
  assert vit_state["blocks.1.attn.qkv.weight"].shape == (192, 64) and vit_state["pos_embed"].shape == (1, 37, 64)
  assert not any(".attn.q." in k or ".attn.k." in k or ".attn.v." in k for k in vit_state)


def test_configurations_timm_cannot_build_are_refused():
  assert {f.name for f in models.FAMILIES.values() if f.to_timm} == {"resnet", "bit", "vit", "efficientnet_lite"}
  export = lambda **fields: models.family(fields["name"]).to_timm({}, cfg=_config(**fields), num_classes=3)
  # timm fixes EfficientNet-Lite's multipliers and BiT's width factor by the model name.
  with pytest.raises(ValueError, match=r"config\.model\.width=None, config\.model\.depth=0\.1: timm builds "
                                       r"EfficientNet-Lite only at"):
    export(name="efficientnet-lite0", depth=0.1)
  with pytest.raises(ValueError, match=r"config\.model\.width=0\.5: timm builds a BiT network only at .*"
                                       r"bit-r50x3 \(width 3\)"):
    export(name="bit-r50x1", width=0.5)
  with pytest.raises(ValueError, match=r"config\.model\.pooling: 'first'"):
    export(name="vit-test8", pooling="first")
  # An override that is another registered size is that size, exactly.
  from transfer.models import efficientnet_lite, resnetv2
  assert efficientnet_lite.timm_model(_config(name="efficientnet-lite0", width=1.1, depth=1.2)) == \
      "tf_efficientnet_lite2"
  assert resnetv2.timm_model(_config(name="bit-r50x1", width=3)) == "resnetv2_50x3_bit"
