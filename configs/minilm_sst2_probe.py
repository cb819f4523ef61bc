"""all-MiniLM-L6-v2 as a frozen feature extractor for SST-2: a linear probe on cached sentence embeddings.

  python -m transfer.train --config configs/minilm_sst2_probe.py --workdir runs/minilm_sst2_probe

ARGS as configs/minilm_sst2.py (``data=DIR``). The encoder is frozen and in inference mode, so the trainer runs it
once over the training and dev sentences (one forward pass each), caches the mean-pooled features in
``WORKDIR/features`` (reused by later runs with the same model and data), and trains only the linear head on them:
the wall time is about one forward pass over the data, not epochs of it.

Expected (2 cores): all 67,349 training sentences -> 0.806 dev accuracy in ~19 min, nearly all of it the one forward
pass; 4,000 sentences (--config.data.train_examples=4000) -> 0.797 in ~100 s.
"""
import ml_collections

from configs import minilm_sst2


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return as_probe(minilm_sst2.get_config(arg))


def as_probe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A fine-tuning config turned into a linear probe: frozen encoder (features cached), head-only training."""
  c.param_rules = [("head/.*", dict(load=False, wd_mult=0.0)), ("backbone/.*", dict(freeze=True))]
  c.total_epochs = 10.0          # epochs over the cached features: cheap
  c.batch_size = 256
  c.schedule.lr, c.schedule.warmup_epochs = 1e-2, 0.5
  c.eval_every, c.checkpoint.every_steps = 0, 0
  return c
