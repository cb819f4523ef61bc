"""A tiny causal-LM run as a config file, for launches in subprocesses (the sharding tests run it on 1 and on 8
simulated devices under several meshes):

  python -m transfer.train --config tests/tiny_lm_config.py:model=FOLDER,text=FILE --workdir /tmp/lm

ARGS: ``model``, a Hugging Face decoder folder (tests build one with ``test_decoder_transfer.decoder_folder``);
``text``, a plain-text file of paragraphs; ``steps``; ``family`` (gpt2 or llama, as the folder);
``sharding``, the value of the one sharding rule ('fsdp', 'tensor' or 'replicate'); ``lora=1``, rank-4 adapters
on the attention and MLP input projections with the rest frozen; ``accum``, micro-batches per step.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfer import config_base  # noqa: E402


def get_config(arg=""):
  args = config_base.config_args(arg, model=None, text=None, steps=6, family="gpt2", sharding="fsdp", lora=0,
                                 accum=1)
  if not args["model"] or not args["text"]:
    raise ValueError("tests/tiny_lm_config.py: ARGS model=FOLDER,text=FILE are required")
  c = config_base.base()
  c.model.name, c.model.pretrained, c.model.dropout = args["family"], args["model"], 0.0
  c.data.name, c.data.train_file, c.data.max_length, c.data.test_fraction = "lm_text", args["text"], 16, 0.25
  c.batch_size, c.eval_batch_size, c.total_steps, c.log_every = 8, 8, args["steps"], 1
  # SGD: updates proportional to gradients, so different reduction orders (1 device, 8 devices, split
  # parameters) stay within float tolerance; Adam's g/sqrt(v) would magnify rounding in near-zero gradients.
  c.optimizer.name, c.schedule.lr, c.schedule.warmup_steps = "sgd", 0.05, 0
  c.checkpoint.every_steps = 2
  c.sharding_rules = [(".*", args["sharding"])]
  c.grad_accum_steps = args["accum"]
  if args["lora"]:
    c.param_rules = [("backbone/.*(c_attn|c_fc)/kernel", dict(lora=dict(rank=4, alpha=8))),
                     (".*", dict(freeze=True))]
  return c
