"""ResNet v1 (torchvision and timm share one layout): numerical parity with both libraries' references, loading
through ``load_pretrained``, bad input, layer-wise lr decay, and a short training run.

References have random weights with randomised, calibrated BatchNorm (``torch_refs.randomize_norms``) so every
tensor matters. Models run through the registry's ImageClassifier on uint8 images (ImageNet mean/std inside);
the references get the same images normalised in float64 first. Tolerance: 1e-4 max-abs on logits in float32,
relative to the logits' scale when it is above 1 (ResNet-50's reach 2.7: 50 layers of float32 rounding).
"""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402

from conftest import restore_checkpoint, tiny_config  # noqa: E402
from torch_refs import IMAGENET_MEAN, IMAGENET_STD, images, numpy_state, randomize_norms, torch_input  # noqa: E402
from transfer import models, pretrained, rules, train  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import resnet  # noqa: E402

TOL = 1e-4  # float32 max-abs on logits


def _reference(source: str, name: str, width: float, size: int, num_classes: int = 10, seed: int = 0):
  torch.manual_seed(seed)
  if source == "torchvision":
    assert width == 1.0, "torchvision's ResNet has no width option"
    ref = getattr(torchvision.models, name)(num_classes=num_classes)
  else:
    v = resnet.VARIANTS[name]
    block = timm.models.resnet.Bottleneck if v["bottleneck"] else timm.models.resnet.BasicBlock
    ref = timm.models.resnet.ResNet(block, list(v["depths"]), num_classes=num_classes,
                                    channels=tuple(int(c * width) for c in (64, 128, 256, 512)))
  calibration = torch_input(torch, images(4, size, seed=seed + 100), IMAGENET_MEAN, IMAGENET_STD)
  return randomize_norms(torch, ref, calibration, seed=seed)


def _model(name: str, width: float = 1.0, num_classes: int | None = 10):
  return models.build(ml_collections.ConfigDict({"name": name, "width": width}), num_classes)


def _logits(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, {"image": x}))(variables, x))


@pytest.mark.parametrize("source,name,width,size", [
    ("torchvision", "resnet18", 1.0, 64),
    ("torchvision", "resnet50", 1.0, 64),
    ("timm", "resnet34", 1.0, 67),     # odd sizes at every stride-2 layer
    ("timm", "resnet50", 0.25, 64),    # the width option, against timm's own narrow ResNet
])
def test_random_weight_parity(source, name, width, size):
  ref = _reference(source, name, width, size)
  flat = resnet.convert_state_dict(numpy_state(ref), source_name=f"{source} {name}")
  model = _model(name, width)
  x = images(3, size)
  init = rules.flatten(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), {"image": x})))
  assert sorted(init) == sorted(flat)   # every variable comes from the checkpoint, nothing is left over
  assert all(init[k].shape == flat[k].shape for k in init)
  assert sum(k.startswith("batch_stats/") for k in flat) == 2 * sum(k.endswith("/scale") for k in flat)

  logits = _logits(model, rules.unflatten(flat), x)
  with torch.no_grad():
    want = ref(torch_input(torch, x, IMAGENET_MEAN, IMAGENET_STD)).numpy()
  assert want.std(0).mean() > 0.05, "reference logits too degenerate for a meaningful comparison"
  np.testing.assert_allclose(logits, want, rtol=0, atol=TOL * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("name", sorted(resnet.VARIANTS))
def test_every_depth_converts_to_exactly_the_models_variables(name):
  """resnet101/152 differ from the parity-tested sizes only in blocks per stage: check the table and shapes.

  (Their logits are not compared: at 33-50 random-weight blocks the two float32 runs drift ~1.5e-4 apart, and
  both as far from a float64 run of the reference, which is rounding noise, not a model difference.)"""
  ref = getattr(torchvision.models, name)(num_classes=7)
  flat = resnet.convert_state_dict(numpy_state(ref), source_name=name)
  model = _model(name, num_classes=7)
  init = rules.flatten(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), {"image": images(1, 32)})))
  assert {k: tuple(v.shape) for k, v in init.items()} == {k: v.shape for k, v in flat.items()}


def test_train_mode_batchnorm_matches_torch():
  """Batch statistics in training mode, and the running averages they update (flax momentum 0.9 = torch 0.1)."""
  ref = _reference("torchvision", "resnet18", 1.0, 32, seed=1)
  state = numpy_state(ref)
  variables = rules.unflatten(resnet.convert_state_dict(state))
  model = _model("resnet18")
  x = images(4, 32, seed=1)
  logits, updates = jax.jit(lambda v, x: model.apply(v, {"image": x}, train=True, mutable=["batch_stats"]))(
      variables, x)
  with torch.no_grad():
    want = ref.train()(torch_input(torch, x, IMAGENET_MEAN, IMAGENET_STD)).numpy()
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=TOL)
  old, new = rules.flatten(variables["batch_stats"]), rules.flatten(updates["batch_stats"])
  torch_new = rules.flatten(rules.unflatten(resnet.convert_state_dict(numpy_state(ref)))["batch_stats"])
  assert all(not np.allclose(old[k], new[k]) for k in old), "every BatchNorm should update its running stats"
  for k in old:
    if k.endswith("/mean"):
      np.testing.assert_allclose(np.asarray(new[k]), torch_new[k], rtol=0, atol=1e-5, err_msg=k)


def test_load_pretrained_pth_and_safetensors(tmp_path):
  from safetensors.numpy import save_file
  ref = _reference("torchvision", "resnet18", 1.0, 32, seed=3)
  torch.save(ref.state_dict(), tmp_path / "tv18.pth")
  save_file(numpy_state(ref), str(tmp_path / "tv18.safetensors"))
  x = images(2, 32, seed=2)
  with torch.no_grad():
    want = ref(torch_input(torch, x, IMAGENET_MEAN, IMAGENET_STD)).numpy()
  for file in ("tv18.pth", "tv18.safetensors"):
    module, variables = pretrained.load_pretrained(str(tmp_path / file), model="resnet18")
    assert module.num_classes == 10 and "batch_stats" in variables
    np.testing.assert_allclose(_logits(module, variables, x), want, rtol=0, atol=TOL, err_msg=file)
  # A width-0.25 checkpoint does not fit the registry's resnet18: the strict diff names variables and shapes.
  torch.save(_reference("timm", "resnet18", 0.25, 32, seed=2).state_dict(), tmp_path / "narrow.pth")
  with pytest.raises(ConversionError, match=r"shape mismatch \(\d+\):\n    "
                     r"batch_stats/backbone/stage1_block0/bn1/mean: checkpoint \(16,\) vs model \(64,\)"):
    pretrained.load_pretrained(str(tmp_path / "narrow.pth"), model="resnet18")


def test_unknown_key_wrong_layout_and_bad_width():
  state = numpy_state(torchvision.models.resnet18(num_classes=3))
  assert resnet.convert_state_dict(state)["params/head/kernel"].shape == (512, 3)
  with pytest.raises(ConversionError, match=r"layer2\.0\.se\.fc1\.weight"):
    resnet.convert_state_dict({**state, "layer2.0.se.fc1.weight": np.zeros((8, 128, 1, 1), np.float32)},
                              source_name="seresnet")
  bit_like = {"stem.conv.weight": np.zeros((64, 3, 7, 7), np.float32), "norm.weight": np.zeros(2048, np.float32)}
  with pytest.raises(ConversionError,
                     match=r"bit\.pth is in none of the ResNet checkpoint layouts.*stem\.conv\.weight"):
    resnet.convert_state_dict(bit_like, source_name="bit.pth")
  with pytest.raises(ValueError, match=r"config\.model\.width=0\.3"):
    _model("resnet18", 0.3).init(jax.random.PRNGKey(0), {"image": images(1, 32)})
  with pytest.raises(ValueError, match=r"config\.model\.depth=0\.5"):
    models.build(ml_collections.ConfigDict({"name": "resnet50", "depth": 0.5}), 10)


def test_short_training_run_tiny_resnet(tmp_path):
  """The trainer end to end on resnet18 at width 0.25 (32 px digits), fine-tuning the last stage and the head:
  the backbone runs in training mode, and BatchNorm statistics follow their layer's rule, so the last stage's
  running statistics move while the frozen stem's and earlier stages' stay exactly as initialised."""
  rules_ = [("head/.*", {}), ("backbone/stage4_.*", {}), (".*", dict(freeze=True))]
  config = tiny_config(**{"model.name": "resnet18", "model.width": 0.25, "model.depth": None,
                          "param_rules": rules_, "checkpoint.every_steps": 100})   # saved once, at the end
  results = train.train(config, str(tmp_path))
  assert np.isfinite(results["eval/loss"]) and results["trainable_params"] > 100_000
  model = models.build(config.model, 10)
  init = jax.jit(lambda r: model.init(r, {"image": images(1, 32)}))(jax.random.split(jax.random.PRNGKey(0))[0])
  saved = rules.flatten(restore_checkpoint(tmp_path)["batch_stats"])
  assert sorted(saved) == sorted(rules.flatten(init["batch_stats"]))
  for k, v in rules.flatten(init["batch_stats"]).items():
    if k.startswith("backbone/stage4_"):
      assert not np.allclose(saved[k], v), k
    else:
      np.testing.assert_array_equal(saved[k], v, err_msg=k)


@pytest.mark.parametrize("name,width,depths", [("resnet18", 0.25, {"stem": 0, "stage1": 1, "stage4": 4}),
                                               ("bit-r50x1", 0.5, {"stem": 0, "stage1": 1, "stage4": 4, "norm": 5})])
def test_layer_decay_is_stage_wise(name, width, depths):
  from transfer import optim
  model = models.build(ml_collections.ConfigDict({"name": name, "width": width}), 10)
  paths = rules.flatten(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), {"image": images(1, 32)}))["params"])
  specs = optim.param_specs([(".*", {})], list(paths), layer_decay=0.5, layer_regexes=models.layer_regexes(model))
  top = max(depths.values()) + 1
  for prefix, depth in depths.items():
    mults = {s.lr_mult for p, s in specs.items() if p.startswith(f"backbone/{prefix}")}
    assert mults == {0.5 ** (top - depth)}, prefix
  assert {s.lr_mult for p, s in specs.items() if p.startswith("head/")} == {1.0}
