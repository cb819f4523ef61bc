"""Causal-LM (next-token) training of a GPT-2 or Llama-family decoder on plain text: pretraining from scratch,
or continued pretraining of a real checkpoint on your domain's text.

  # From scratch: an architecture folder (config.json + tokenizer.json) and text files (documents split by blank
  # lines); experiments/decoder_transfer.py writes both for its SST-2 study.
  python -m transfer.train --config configs/gpt_pretrain.py:arch=runs/decoder/arch,text=runs/decoder/corpus.txt \\
      --workdir runs/decoder/pretrain
  # Continued pretraining of a checkpoint (a Hugging Face folder or cached hub id):
  python -m transfer.train --config configs/gpt_pretrain.py:pretrained=PATH,text=my_domain.txt,steps=2000 \\
      --workdir runs/continued

ARGS: ``arch`` (scratch) or ``pretrained`` (continue), ``text`` (a .txt file or a folder of them; 2% of its
documents are held out for the eval loss and perplexity), ``eval_text`` (a separate eval file instead),
``steps``, ``length`` (tokens per packed row), ``batch``, ``lr``.

Expected (experiments/decoder_transfer.py, 2 CPU cores): the 4-layer, 256-wide GPT-2 (4.2M parameters) on
SST-2's and AG News's training texts (1.5M tokens) -> see the README's decoder table for its held-out perplexity.
"""
import ml_collections

from transfer import config_base

# The ARGS of the launch command above (for the tests, which check every shipped config).
EXAMPLE_ARG = "arch=runs/decoder/arch,text=runs/decoder/corpus.txt"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_base.config_args(arg, arch=None, pretrained=None, text=None, eval_text=None, family="gpt2",
                                 steps=900, length=128, batch=32, lr=2e-3)
  if bool(args["arch"]) == bool(args["pretrained"]):
    raise ValueError("configs/gpt_pretrain.py: give exactly one of ARGS arch=FOLDER (from scratch) or "
                     "pretrained=SOURCE (continued pretraining)")
  if not args["text"]:
    raise ValueError("configs/gpt_pretrain.py: ARGS text=FILE_OR_FOLDER (plain text) is required")
  c = config_base.base()
  c.task = "causal_lm"
  c.model.name = args["family"]
  c.model.architecture, c.model.pretrained = args["arch"], args["pretrained"]
  c.model.dropout = 0.0
  c.data.name, c.data.train_file, c.data.eval_file = "lm_text", args["text"], args["eval_text"]
  c.data.test_fraction = 0.02          # documents held out when there is no eval_text
  c.data.max_length, c.data.pad_to_multiple_of = args["length"], 0
  c.batch_size, c.eval_batch_size = args["batch"], 64
  c.total_steps = args["steps"]
  c.schedule.lr, c.schedule.warmup_steps, c.schedule.decay = args["lr"], max(1, args["steps"] // 20), "cosine"
  c.optimizer.weight_decay = 0.1
  c.param_rules = [(".*(bias|scale|embedding)", dict(wd_mult=0.0)), (".*", {})]   # decay the matrices only
  c.log_every, c.eval_every = 50, 500
  c.checkpoint.every_steps = 500
  return c
