"""Shared pieces of the parity tests against PyTorch references (timm, torchvision); callers importorskip torch."""
from __future__ import annotations

import numpy as np

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """Random uint8 NHWC images: what the classifiers take."""
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def torch_input(torch, x: np.ndarray, mean, std):
  """uint8 NHWC -> the float NCHW tensor a reference expects, normalised as ``(x / 255 - mean) / std``."""
  x = (x.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))


def numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def randomize_norms(torch, model, batch, seed: int = 0):
  """Makes a random-weight reference a meaningful test: random norm affine parameters, BatchNorm running stats
  calibrated on ``batch`` and then perturbed, so activations stay O(1) at every depth and every BN entry matters
  (PyTorch's default init would make them vanish, and any converter would then pass). Returns the model in eval."""
  torch.manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm,
                                                        torch.nn.LayerNorm))]
  bns = [m for m in norms if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      if m.weight is not None:
        m.weight.uniform_(0.5, 1.5), m.bias.normal_(0.0, 0.3)
    for m in bns:
      m.reset_running_stats(), setattr(m, 'momentum', None)  # cumulative average = this batch's stats
    if bns:
      model.train()(batch)
    for m in bns:
      m.momentum = 0.1
      m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1)
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
  return model.eval()
