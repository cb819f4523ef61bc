"""Shared helpers for the decoder tests: random-weight ``transformers`` references, saving and loading them
through ``hf.read_folder`` and a family's key table, padded batches, and the logits tolerance.

References are tiny random-weight models whose norm scales and biases are randomised too (HF inits them to 1/0,
which would hide swapped or dropped rows) and whose ``initializer_range`` is 0.2, so attention is peaked and
logits are spread (at 0.02 a query/key mix-up, a wrong position or a broken mask could pass).
Tolerance: 1e-4 max-abs in float32 on logits at real (non-padded) tokens, relative to the logits' scale when that
is above 1: ``1e-4 * max(1, max |reference logits|)``.
"""
import os

os.environ['HF_HUB_OFFLINE'] = '1'  # never download; everything here is local

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from transfer import hf  # noqa: E402
from transfer.convert import merge_pretrained  # noqa: E402
from transfer.rules import flatten, unflatten  # noqa: E402

TOL = 1e-4


def randomize(model, seed=0):
  """Norm scales in [0.5, 1.5] and biases N(0, 0.2) (see module docstring); returns the model in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if p.ndim == 1 and ('norm' in key or 'ln_' in key) and key.endswith('weight'):
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      elif key.endswith('bias'):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return model.eval()


def load(ref, folder, family, *, model_kwargs=None):
  """Saves ``ref`` (safetensors) to ``folder``, reads it back with ``hf.read_folder`` and the family's key table,
  and merges it into the family's ``causal_lm`` with the strict diff. Returns (config, module, variables)."""
  ref.save_pretrained(folder)
  raw, state = hf.read_folder(folder)
  config_cls = getattr(family, 'GPT2Config', None) or getattr(family, 'LlamaConfig')
  config = config_cls.from_hf(raw, os.path.join(folder, 'config.json'))
  module = family.causal_lm(config, **(model_kwargs or {}))
  flat = family.convert_hf_state_dict(state, config, source_name=folder)
  return config, module, merge(module, flat)


def merge(module, flat, should_load=lambda _: True):
  """``flat`` merged into the module's variables; every variable must be loaded (nothing left at init)."""
  batch = {'input_ids': np.zeros((1, 4), np.int32), 'attention_mask': np.ones((1, 4), np.int32)}
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), batch))
  init = {k: np.zeros(v.shape, v.dtype) for k, v in flatten(shapes).items()}
  merged, report = merge_pretrained(init, flat, should_load=should_load, source_name='test')
  assert not report['kept_init'] and not report['dropped'], report
  return unflatten(merged)


def padded_batch(vocab, lengths, side, seed=0):
  """(ids, mask) with rows of ``lengths`` real tokens, padded on ``side`` ('left'/'right') with id 0."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = rng.integers(1, vocab, (len(lengths), width))
  real = np.arange(width)[None] < np.array(lengths)[:, None]
  mask = (real if side == 'right' else real[:, ::-1]).astype(np.int64)
  return np.where(mask == 1, ids, 0), mask


def hf_positions(mask):
  """``cumsum(mask) - 1`` with padded slots set to 1 (their value is irrelevant: nothing attends to them)."""
  positions = np.cumsum(mask, axis=1) - 1
  return np.where(mask == 1, positions, 1)


def hf_logits(ref, ids, mask):
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(hf_positions(mask))).logits.float().numpy()


def assert_close(ours, ref, mask, what='logits'):
  """Max-abs difference at real tokens under ``TOL * max(1, scale)``; returns the difference."""
  keep = np.asarray(mask) == 1
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.isfinite(ours[keep]).all()
  diff = np.abs(ours - ref)[keep].max()
  tol = TOL * max(1.0, float(np.abs(ref[keep]).max()))
  print(f'{what}: max-abs {diff:.2e} (tolerance {tol:.1e}, scale {np.abs(ref[keep]).max():.2f})')
  assert diff < tol, f'{what}: max-abs {diff:.2e} >= {tol:.2e}'
  return diff
