"""transfer: pretrained models converted to Flax, adapted to new tasks by fine-tuning or feature extraction."""


def load_pretrained(source, **kwargs):
  """``(module, variables)`` for a short name or checkpoint file; see ``transfer.pretrained.load_pretrained``."""
  from transfer.pretrained import load_pretrained as _load
  return _load(source, **kwargs)
