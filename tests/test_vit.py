"""ViT: numerical parity with timm (timm state dicts and Google's .npz layouts), position-embedding resampling
against timm's, loading through ``load_pretrained``, bad input, and a short training run.

References are timm ``VisionTransformer``s with random weights scaled so that attention, MLPs and norms all move
the logits (timm's own init, std 0.02, would leave attention near uniform). Google's .npz files are written from
the reference (the inverse of timm's ``vision_transformer._load_weights``, checked by loading them back into timm).
Models run through ImageClassifier on uint8 images ([-1, 1] inside). Tolerance: 1e-4 max-abs on logits in
float32; resampled position embeddings: 1e-6.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from conftest import run_cli, tiny_config  # noqa: E402
from torch_refs import images, numpy_state, randomize_norms, torch_input  # noqa: E402
from transfer import models, pretrained, rules, train  # noqa: E402
from transfer.convert import ConversionError  # noqa: E402
from transfer.models import vit  # noqa: E402
from transfer.models.classifier import ImageClassifier  # noqa: E402

TOL = 1e-4         # float32 max-abs on logits
RESAMPLE_TOL = 1e-6
HALF = (0.5, 0.5, 0.5)


def _reference(patch, dim, depth, heads, size, pooling, num_classes=10, seed=0):
  torch.manual_seed(seed)
  ref = timm.models.vision_transformer.VisionTransformer(
      img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=num_classes,
      class_token=pooling == "cls", global_pool="token" if pooling == "cls" else "avg", fc_norm=False)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.Linear):
        m.weight.normal_(0.0, m.in_features ** -0.5), m.bias.normal_(0.0, 0.1)
    ref.pos_embed.normal_(0.0, 0.5)
    if ref.cls_token is not None:
      ref.cls_token.normal_(0.0, 0.5)
  return randomize_norms(torch, ref, None, seed=seed)


def _classifier(patch, dim, depth, heads, grid, pooling, num_classes=10):
  backbone = vit.ViT(patch, dim, depth, heads, 4 * dim, (grid, grid), pooling=pooling)
  return ImageClassifier(backbone, num_classes)


def _logits(module, variables, x):
  return np.asarray(jax.jit(lambda v, x: module.apply(v, {"image": x}))(variables, x))


def _ref_logits(ref, x):
  with torch.no_grad():
    return ref(torch_input(torch, x, HALF, HALF)).numpy()


def _google_npz(ref, big_vision: bool = False) -> dict[str, np.ndarray]:
  """The reference in Google's layout: vit_jax names, or big_vision's (top-level ``pos_embedding``, LayerNorm_0/1,
  MultiHeadDotProductAttention_0, MlpBlock_0)."""
  n = lambda t: t.detach().numpy().copy()
  dim, heads = ref.embed_dim, ref.blocks[0].attn.num_heads
  out = {"embedding/kernel": n(ref.patch_embed.proj.weight).transpose(2, 3, 1, 0),
         "embedding/bias": n(ref.patch_embed.proj.bias),
         "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding": n(ref.pos_embed),
         "Transformer/encoder_norm/scale": n(ref.norm.weight), "Transformer/encoder_norm/bias": n(ref.norm.bias),
         "head/kernel": n(ref.head.weight).T.copy(), "head/bias": n(ref.head.bias)}
  if ref.cls_token is not None:
    out["cls"] = n(ref.cls_token)
  ln2, mha, mlp = (1, 0, 0) if big_vision else (2, 1, 3)
  for i, blk in enumerate(ref.blocks):
    p = f"Transformer/encoderblock_{i}/"
    out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = n(blk.norm1.weight), n(blk.norm1.bias)
    out[p + f"LayerNorm_{ln2}/scale"], out[p + f"LayerNorm_{ln2}/bias"] = n(blk.norm2.weight), n(blk.norm2.bias)
    weights, biases = np.split(n(blk.attn.qkv.weight), 3), np.split(n(blk.attn.qkv.bias), 3)
    for name, w, b in zip(("query", "key", "value"), weights, biases):
      out[p + f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = w.T.reshape(dim, heads, dim // heads)
      out[p + f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = b.reshape(heads, dim // heads)
    out[p + f"MultiHeadDotProductAttention_{mha}/out/kernel"] = (
        n(blk.attn.proj.weight).reshape(dim, heads, dim // heads).transpose(1, 2, 0).copy())
    out[p + f"MultiHeadDotProductAttention_{mha}/out/bias"] = n(blk.attn.proj.bias)
    for j, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
      out[p + f"MlpBlock_{mlp}/Dense_{j}/kernel"] = n(fc.weight).T.copy()
      out[p + f"MlpBlock_{mlp}/Dense_{j}/bias"] = n(fc.bias)
  return out


def _check_npz_layout(ref, path, arch, size, pooling, x):
  """The file is in the layout timm's own npz loader reads: a fresh reference loaded from it agrees exactly."""
  fresh = _reference(*arch, size, pooling, seed=7)
  fresh.load_pretrained(str(path))
  np.testing.assert_array_equal(_ref_logits(fresh, x), _ref_logits(ref, x))


@pytest.mark.parametrize("arch,size,pooling", [
    ((16, 384, 12, 6), 64, "cls"),    # ViT-S/16's width and depth, grid 4
    ((32, 96, 3, 3), 64, "mean"),     # patch 32, grid 2, no class token
])
def test_timm_state_dict_parity(arch, size, pooling):
  ref = _reference(*arch, size, pooling)
  flat = vit.convert_state_dict(numpy_state(ref), num_heads=arch[3], source_name="timm vit")
  module = _classifier(*arch, size // arch[0], pooling)
  x = images(3, size)
  init = rules.flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), {"image": x})))
  assert {k: tuple(v.shape) for k, v in init.items()} == {k: v.shape for k, v in flat.items()}
  want = _ref_logits(ref, x)
  assert want.std(0).mean() > 0.05, "reference logits too degenerate for a meaningful comparison"
  np.testing.assert_allclose(_logits(module, rules.unflatten(flat), x), want, rtol=0, atol=TOL)


TIMM_NAMES = {"vit-ti16": "vit_tiny_patch16_224", "vit-s16": "vit_small_patch16_224",
              "vit-s32": "vit_small_patch32_224", "vit-b16": "vit_base_patch16_224",
              "vit-b32": "vit_base_patch32_224", "vit-l16": "vit_large_patch16_224",
              "vit-l32": "vit_large_patch32_224"}


def test_registry_sizes_are_timms():
  """Every registered size against timm's own definition (built on the meta device: shapes only, no memory), and
  ViT-Ti/16's full state dict converts to exactly the registry model's variables."""
  assert set(TIMM_NAMES) == set(vit.VARIANTS) - {"vit-test8"}
  for ours, theirs in TIMM_NAMES.items():
    with torch.device("meta"):
      ref = timm.create_model(theirs)
    v = vit.VARIANTS[ours]
    assert (ref.patch_embed.patch_size, ref.patch_embed.img_size) == ((v["patch"],) * 2, (v["resolution"],) * 2)
    assert (ref.embed_dim, len(ref.blocks), ref.blocks[0].attn.num_heads, ref.blocks[0].mlp.fc1.out_features) == (
        v["dim"], v["depth"], v["heads"], v["mlp_dim"]), ours
  flat = vit.convert_state_dict(numpy_state(timm.create_model("vit_tiny_patch16_224")), num_heads=3)
  module = models.build(ml_collections.ConfigDict({"name": "vit-ti16"}), 1000)
  init = rules.flatten(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), {"image": images(1, 224)})))
  assert {k: tuple(v.shape) for k, v in init.items()} == {k: v.shape for k, v in flat.items()}


def test_google_npz_parity_vit_s16_at_224(tmp_path):
  """vit_jax names, class token, through load_pretrained at the registry's native resolution (no resampling)."""
  arch = (16, 384, 12, 6)
  ref = _reference(*arch, 224, "cls", seed=1)
  np.savez(tmp_path / "vit_s16.npz", **_google_npz(ref))
  x = images(2, 224, seed=1)
  _check_npz_layout(ref, tmp_path / "vit_s16.npz", arch, 224, "cls", x)
  module, variables = pretrained.load_pretrained(str(tmp_path / "vit_s16.npz"), model="vit-s16")
  assert module.backbone.pooling == "cls" and module.num_classes == 10
  np.testing.assert_allclose(_logits(module, variables, x), _ref_logits(ref, x), rtol=0, atol=TOL)


def test_big_vision_npz_parity_mean_pooling(tmp_path):
  """big_vision names and 'gap' pooling (no class token) on the registry's test size: the pooling comes from
  the checkpoint."""
  arch = (8, 64, 2, 2)
  ref = _reference(*arch, 32, "mean", seed=2)
  np.savez(tmp_path / "bv.npz", **_google_npz(ref, big_vision=True))
  x = images(3, 32, seed=2)
  _check_npz_layout(ref, tmp_path / "bv.npz", arch, 32, "mean", x)
  module, variables = pretrained.load_pretrained(str(tmp_path / "bv.npz"), model="vit-test8")
  assert module.backbone.pooling == "mean" and "cls" not in variables["params"]["backbone"]
  np.testing.assert_allclose(_logits(module, variables, x), _ref_logits(ref, x), rtol=0, atol=TOL)


@pytest.mark.parametrize("old,new,prefix", [(14, 4, 1), (4, 6, 1), (7, 10, 0), (6, 3, 0), (2, 5, 1)])
def test_resample_posemb_matches_timm(old, new, prefix):
  posemb = np.random.default_rng(old * new).normal(size=(1, prefix + old * old, 24)).astype(np.float32)
  want = timm.layers.resample_abs_pos_embed(torch.from_numpy(posemb), [new, new], num_prefix_tokens=prefix,
                                            interpolation="bilinear", antialias=False).numpy()
  got = np.asarray(vit.resample_posemb(posemb, (old, old), (new, new), prefix))
  assert got.shape == (1, prefix + new * new, 24)
  np.testing.assert_array_equal(got[:, :prefix], posemb[:, :prefix])   # the class token's entry is kept apart
  np.testing.assert_allclose(got, want, rtol=0, atol=RESAMPLE_TOL)


def _timm_at(ref, arch, size, pooling):
  """timm's model for another input size, given the reference's weights with timm-resampled embeddings."""
  other = _reference(*arch, size, pooling, seed=9)
  state = ref.state_dict()
  state["pos_embed"] = timm.layers.resample_abs_pos_embed(
      state["pos_embed"], list(other.patch_embed.grid_size), num_prefix_tokens=1 if pooling == "cls" else 0,
      interpolation="bilinear", antialias=False)
  other.load_state_dict(state)
  return other.eval()


def test_new_resolution_at_run_time_matches_timm():
  """A model stored at grid 4 run on 96 px inputs (grid 6) = timm's model built for 96 px from resampled weights."""
  arch = (16, 96, 2, 3)
  ref = _reference(*arch, 64, "cls", seed=3)
  module = _classifier(*arch, 4, "cls")
  variables = rules.unflatten(vit.convert_state_dict(numpy_state(ref), num_heads=3))
  x = images(2, 96, seed=3)
  np.testing.assert_allclose(_logits(module, variables, x), _ref_logits(_timm_at(ref, arch, 96, "cls"), x),
                             rtol=0, atol=TOL)


def test_checkpoint_at_another_resolution_keeps_its_grid_and_resamples_once_per_call(tmp_path):
  """A vit-test8 checkpoint made at 48 px (grid 6, the registry's native size is 32 px = grid 4) loads with its
  own 6x6 table, unresampled; on 32 px inputs the call resamples it once, as timm's model built for 32 px from
  timm-resampled weights. A config may still ask for another stored grid: then the load resamples, once."""
  arch = (8, 64, 2, 2)
  ref = _reference(*arch, 48, "cls", seed=4)
  torch.save(ref.state_dict(), tmp_path / "vit48.pth")
  module, variables = pretrained.load_pretrained(str(tmp_path / "vit48.pth"), model="vit-test8")
  assert module.backbone.posemb_grid == (6, 6)
  np.testing.assert_array_equal(np.asarray(variables["params"]["backbone"]["pos_embedding"]),
                                ref.pos_embed.detach().numpy())
  small = _timm_at(ref, arch, 32, "cls")
  x = images(3, 32, seed=4)
  np.testing.assert_allclose(_logits(module, variables, x), _ref_logits(small, x), rtol=0, atol=TOL)
  # The trainer keeps the checkpoint's grid unless config.model.posemb_grid says otherwise.
  base = {"model.name": "vit-test8", "model.depth": None, "model.pretrained": str(tmp_path / "vit48.pth"),
          "param_rules": [("head/.*", dict(load=False)), (".*", {})]}
  batch = {"image": images(1, 32)}
  kept, params, _, _ = train.init_variables(tiny_config(**base), 10, batch)
  assert kept.backbone.posemb_grid == (6, 6)
  np.testing.assert_array_equal(params["backbone/pos_embedding"], ref.pos_embed.detach().numpy())
  resampled, params, _, _ = train.init_variables(tiny_config(**base, **{"model.posemb_grid": 4}), 10, batch)
  assert resampled.backbone.posemb_grid == (4, 4)
  np.testing.assert_allclose(params["backbone/pos_embedding"], small.pos_embed.detach().numpy(), rtol=0,
                             atol=RESAMPLE_TOL)


def test_bad_input_names_the_arrays(tmp_path):
  arch = (8, 64, 2, 2)
  arrays = _google_npz(_reference(*arch, 32, "cls", seed=5))
  bit_like = {"resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 64), np.float32)}
  np.savez(tmp_path / "bit.npz", **bit_like)
  with pytest.raises(ConversionError, match=r"bit\.npz is in none of the ViT checkpoint layouts.*"
                                            r"Its keys: resnet/root_block/standardized_conv2d/kernel"):
    pretrained.load_pretrained(str(tmp_path / "bit.npz"), model="vit-test8")
  # An in21k-style representation layer this model does not have: named, not silently dropped.
  np.savez(tmp_path / "prelogits.npz", **arrays, **{"pre_logits/kernel": np.zeros((64, 64), np.float32)})
  with pytest.raises(ConversionError, match=r"unmatched keys \(1\):\n    pre_logits/kernel"):
    pretrained.load_pretrained(str(tmp_path / "prelogits.npz"), model="vit-test8")
  # A query kernel in the wrong layout: the strict diff names the variable and both shapes.
  wrong = dict(arrays, **{"Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel":
                          np.zeros((64, 64), np.float32)})
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(ConversionError,
                     match=r"block_1/attn/query/kernel: checkpoint \(64, 64\) vs model \(64, 2, 32\)"):
    pretrained.load_pretrained(str(tmp_path / "wrong.npz"), model="vit-test8")
  # Position embeddings that are no square grid.
  odd = dict(arrays, **{"Transformer/posembed_input/pos_embedding": np.zeros((1, 1 + 12, 64), np.float32)})
  np.savez(tmp_path / "odd.npz", **odd)
  with pytest.raises(ConversionError, match=r"pos_embedding \(1, 13, 64\): 12 patch positions are not a square"):
    pretrained.load_pretrained(str(tmp_path / "odd.npz"), model="vit-test8")
  state = numpy_state(_reference(*arch, 32, "cls", seed=5))
  with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.qkv\.weight has 64 rows"):
    vit.convert_state_dict({**state, "blocks.0.attn.qkv.weight": np.zeros((64, 64), np.float32)}, num_heads=2)
  with pytest.raises(ValueError, match=r"config\.model\.pooling: 'first'"):
    models.build(ml_collections.ConfigDict({"name": "vit-test8", "pooling": "first"}), 3).init(
        jax.random.PRNGKey(0), {"image": images(1, 32)})
  with pytest.raises(ValueError, match=r"config\.model\.width=0\.5"):
    models.build(ml_collections.ConfigDict({"name": "vit-s16", "width": 0.5}), 3)


def test_short_training_run_tiny_vit(tmp_path, capsys):
  """The trainer end to end on vit-test8 (digits at 32 px), starting from a Google-layout checkpoint made at
  48 px (resampled at load), with a fresh head and layer-wise lr decay."""
  ref = _reference(8, 64, 2, 2, 48, "cls", seed=6)
  np.savez(tmp_path / "vit48.npz", **_google_npz(ref))
  config = tiny_config(**{"model.name": "vit-test8", "model.depth": None,
                          "model.pretrained": str(tmp_path / "vit48.npz"),
                          "param_rules": [("head/.*", dict(load=False)), (".*", {})], "layer_decay": 0.8,
                          "optimizer.name": "adamw", "schedule.lr": 1e-3})
  results = train.train(config, str(tmp_path / "run"))
  assert "pretrained: loaded 38 tensors" in capsys.readouterr().out   # all but the head's 2
  assert np.isfinite(results["eval/loss"]) and results["trainable_params"] > 100_000
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def test_pooling_that_disagrees_with_the_checkpoint_names_the_setting(tmp_path):
  """A mean-pooled checkpoint (no class token) under the default config.model.pooling='cls': an error that names
  the setting to change, not the shape mismatches it would cause."""
  ref = _reference(8, 64, 2, 2, 32, "mean", seed=3)
  np.savez(tmp_path / "gap.npz", **_google_npz(ref, big_vision=True))
  config = tiny_config(**{"model.name": "vit-test8", "model.depth": None, "model.pretrained": str(tmp_path / "gap.npz"),
                          "param_rules": [("head/.*", dict(load=False)), (".*", {})]})
  with pytest.raises(ValueError, match=r"config.model.pooling='cls', but .*gap.npz' has no class token .*"
                                       r"set config.model.pooling='mean'"):
    train.train(config, str(tmp_path / "run"))


def test_input_normalisation_per_checkpoint(tmp_path):
  """config.model.input_norm: 'auto' is the family's convention ([-1, 1] for ViT); 'imagenet' (DeiT, DINO) and
  explicit [mean, std] reach the classifier; a malformed value names the field."""
  build = lambda norm: models.build(ml_collections.ConfigDict({"name": "vit-test8", "input_norm": norm}), 3)
  assert (build("auto").input_mean, build("auto").input_std) == (127.5, 127.5)
  imagenet = build("imagenet")
  assert imagenet.input_mean == (123.675, 116.28, 103.53) and imagenet.input_std == (58.395, 57.12, 57.375)
  custom = build([[100, 110, 120], 64])
  assert custom.input_mean == (100.0, 110.0, 120.0) and custom.input_std == 64.0
  # The normalisation changes the features: same weights, other convention, other output (no head: features).
  features = lambda norm: models.build(ml_collections.ConfigDict({"name": "vit-test8", "input_norm": norm}), None)
  x = {"image": images(2, 32)}
  variables = features("auto").init(jax.random.PRNGKey(0), x)
  assert not np.allclose(features("auto").apply(variables, x), features("imagenet").apply(variables, x), atol=1e-3)
  for bad in ("caffe", [1, 2, 3], [[1, 2], 3], [0, 0], 5, [True, 1]):
    with pytest.raises(ValueError, match=r"config\.model\.input_norm="):
      build(bad)
  # From the command line, a name or a pair.
  out = run_cli(["--config", "tests/tiny_config.py:vit", "--workdir", str(tmp_path / "w"),
                 "--config.model.input_norm=imagenet", "--config.total_steps=3"])
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.load(open(tmp_path / "w" / "config.json"))["model"]["input_norm"] == "imagenet"
  assert build("[[100, 110, 120], 64]").input_mean == (100.0, 110.0, 120.0)   # as the command line passes it
