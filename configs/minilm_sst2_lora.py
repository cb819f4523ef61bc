"""all-MiniLM-L6-v2 on SST-2 four ways at the same number of steps: LoRA, full fine-tuning, a linear probe, and the
same network trained from scratch.

  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=lora --workdir runs/sst2_lora
  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=full --workdir runs/sst2_full
  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=probe --workdir runs/sst2_probe
  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=scratch --workdir runs/sst2_scratch

ARGS: ``mode`` = lora (rank 8, alpha 16 adapters on the attention projections query, key, value and out; the
encoder frozen under them; the new head trains), full (every weight, as configs/minilm_sst2.py) or probe (frozen
encoder, features cached, the head alone) or scratch (the same architecture and tokenizer at random init, every
weight at 0.1x the head's lr, 1e-3: a common transformer recipe, not tuned here; in the study below it never left
the majority class in 125 steps); ``n`` training sentences (a fixed random subset, default 8,000: one pass of 250
steps of 32); ``data`` = the folder with train.tsv and dev.tsv. Pooled by BERT's pooler ('cls'), the
pooling transformers' and PEFT's classifiers have, so every run exports (``python -m transfer.export``).

Expected: the README's LoRA table (experiments/lora_results.py measures it, n=8,000, one seed).

The sweep below is the study of pretrained vs scratch vs label budget and of probe vs LoRA vs full fine-tuning at
equal data (README, "Transfer, measured"): every mode x n in (800, 4000) x seeds 0-2, 24 runs; 41 min on 2 cores
with two at a time (2026-12-07):

  python -m transfer.sweep --config configs/minilm_sst2_lora.py --workdir runs/sst2_study --processes 2
"""
import ml_collections

from configs import minilm_sst2

MODES = ("lora", "full", "probe", "scratch")


def get_config(arg: str = "mode=lora") -> ml_collections.ConfigDict:
  from transfer import config_base
  args = config_base.config_args(arg, mode="lora", n=8000, data="../shared/data/sst2")
  if args["mode"] not in MODES:
    raise ValueError(f"configs/minilm_sst2_lora.py: mode={args['mode']!r}: use one of {MODES}")
  c = minilm_sst2.get_config(f"data={args['data']}")
  c.model.pooling = "cls"
  c.data.train_examples = int(args["n"])
  c.total_epochs, c.total_steps = None, int(args["n"]) // c.batch_size
  c.schedule.warmup_epochs, c.schedule.warmup_steps = None, c.total_steps // 10
  c.eval_every, c.checkpoint.every_steps = 0, 0   # dev touched once, at the end
  head = ("head/.*", dict(load=False, wd_mult=0.0))
  if args["mode"] == "lora":
    c.param_rules = [head, ("backbone/.*/attention/(query|key|value|out)/kernel",
                            dict(lr_mult=0.1, lora=dict(rank=8, alpha=16, dropout=0.05))),
                     (".*", dict(freeze=True))]
  elif args["mode"] == "probe":
    c.param_rules = [head, (".*", dict(freeze=True))]
  elif args["mode"] == "scratch":
    c.model.architecture, c.model.pretrained = c.model.pretrained, None   # its config.json and tokenizer only
    c.param_rules = [head, (".*(bias|scale|embedding)", dict(lr_mult=0.1, wd_mult=0.0)), (".*", dict(lr_mult=0.1))]
  return c


def sweep(arg: str = "") -> list[dict]:
  """mode x n (800 or 4,000 sentences: 25 or 125 steps) x seeds 0-2, seed by seed (each seed's eight points give
  every comparison). The probe's head trains for 10x the steps: on cached features a step costs about a
  millisecond, and at the others' 25 steps it has not converged (dev accuracy 0.52 at n=800), so the comparison
  is at equal data, with wall time and trainable parameters reported beside accuracy. The seed changes the head's
  and adapters' init, dropout and batch order; the n sentences are one fixed subset (``data.split_seed``).
  ``arg`` may set ``data``."""
  points = []
  for seed in range(3):
    for n in (800, 4000):
      for mode in ("scratch", "probe", "lora", "full"):
        point = {"arg:n": n, "arg:mode": mode}
        if mode == "probe":
          point["total_steps"] = 10 * (n // 32)
        points.append({**point, "seed": seed})
  return points
