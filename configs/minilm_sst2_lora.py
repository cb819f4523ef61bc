"""all-MiniLM-L6-v2 on SST-2 three ways at the same number of steps: LoRA, full fine-tuning, a linear probe.

  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=lora --workdir runs/sst2_lora
  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=full --workdir runs/sst2_full
  python -m transfer.train --config configs/minilm_sst2_lora.py:mode=probe --workdir runs/sst2_probe

ARGS: ``mode`` = lora (rank 8, alpha 16 adapters on the attention projections query, key, value and out; the
encoder frozen under them; the new head trains), full (every weight, as configs/minilm_sst2.py) or probe (frozen
encoder, features cached, the head alone); ``n`` training sentences (a fixed random subset, default 8,000: one
pass of 250 steps of 32); ``data`` = the folder with train.tsv and dev.tsv. Pooled by BERT's pooler ('cls'), the
pooling transformers' and PEFT's classifiers have, so every run exports (``python -m transfer.export``).

Expected: the README's LoRA table (experiments/lora_results.py measures it).
"""
import ml_collections

from configs import minilm_sst2

MODES = ("lora", "full", "probe")


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
  return c
