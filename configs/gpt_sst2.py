"""A decoder classifies SST-2 sentiment from its mean-pooled states: the downstream half of
experiments/decoder_transfer.py.

  python -m transfer.train --config configs/gpt_sst2.py:init=pretrained,model=runs/decoder/pretrained_hf,fraction=0.1 \\
      --workdir runs/decoder/sst2_pretrained_10
  python -m transfer.train --config configs/gpt_sst2.py:init=scratch,model=runs/decoder/arch,fraction=0.1 \\
      --workdir runs/decoder/sst2_scratch_10

ARGS: ``init`` = pretrained (``model`` is a Hugging Face folder or hub id whose weights load) or scratch (``model``
only gives the architecture and tokenizer: the same network, random init); ``fraction`` of SST-2's 67,349 labelled
training sentences (a fixed random subset); ``data`` = the folder with train.tsv and dev.tsv; ``steps``;
``pooling`` (mean, or last: the last token's state); ``mode`` = full (every weight trains, the backbone at 0.3x
the new head's learning rate), lora (rank-8 adapters on c_attn and c_fc at the head's rate, the rest frozen) or
probe (the backbone frozen: its features cached, the head alone). Accuracy on the 872 dev sentences.

Expected: see the README's decoder table (experiments/decoder_transfer.py measures it).
"""
import ml_collections

from transfer import config_base

# The ARGS of the launch command above (for the tests, which check every shipped config).
EXAMPLE_ARG = "init=scratch,model=runs/decoder/arch,fraction=0.1"

SST2_TRAIN = 67_349


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_base.config_args(arg, init="pretrained", model=None, family="gpt2", fraction=1.0,
                                 data="../shared/data/sst2", steps=0, lr=1e-3, pooling="mean", mode="full")
  if args["init"] not in ("pretrained", "scratch") or not args["model"]:
    raise ValueError("configs/gpt_sst2.py: ARGS init=pretrained|scratch and model=FOLDER are required")
  if not 0 < args["fraction"] <= 1:
    raise ValueError(f"configs/gpt_sst2.py: fraction={args['fraction']} must be in (0, 1]")
  c = config_base.base()
  # Mean pooling: on a held-out part of SST-2's *training* split (never dev), a ridge probe on the small
  # pretrained GPT's mean-pooled features reached 0.65 against 0.59 for the random network's, and on its last-token
  # features (GPT2ForSequenceClassification's choice, pooling=last) only 0.59 against 0.57: a 4-layer LM trained
  # for 25 minutes keeps little of a sentence in its last position (experiments/decoder_transfer.py).
  c.model.name, c.model.pooling, c.model.dropout = args["family"], args["pooling"], 0.1
  if args["init"] == "pretrained":
    c.model.pretrained = args["model"]
  else:
    c.model.architecture = args["model"]
  c.data.name = "text_files"
  c.data.train_file, c.data.eval_file = f"{args['data']}/train.tsv", f"{args['data']}/dev.tsv"
  c.data.text_field, c.data.label_field, c.data.max_length = "sentence", "label", 64
  examples = round(args["fraction"] * SST2_TRAIN)
  c.data.train_examples = None if args["fraction"] == 1 else examples
  c.batch_size, c.eval_batch_size = 32, 128
  # About 4 passes over a small subset, at least 200 steps, at most 400 (a fifth of a pass over all 67k
  # sentences: the six runs of the study fit in about 25 minutes on 2 CPU cores).
  c.total_steps = args["steps"] or int(min(max(200, 4 * examples / 32), 400))
  c.schedule.lr, c.schedule.warmup_steps = args["lr"], c.total_steps // 10
  c.optimizer.weight_decay = 0.01
  c.param_rules = [
      ("head/.*", dict(load=False, wd_mult=0.0)),
      (".*(bias|scale|embedding)", dict(lr_mult=0.3, wd_mult=0.0)),
      ("backbone/.*", dict(lr_mult=0.3)),
  ]
  if args["mode"] == "lora":   # rank-8 adapters on the attention and MLP input projections, the rest frozen
    c.param_rules = [c.param_rules[0], ("backbone/.*(c_attn|c_fc)/kernel", dict(lora=dict(rank=8, alpha=16))),
                     (".*", dict(freeze=True))]
  elif args["mode"] == "probe":
    c.param_rules = [c.param_rules[0], (".*", dict(freeze=True))]
  elif args["mode"] != "full":
    raise ValueError(f"configs/gpt_sst2.py: mode={args['mode']!r}: use full, lora or probe")
  c.log_every, c.eval_every = 50, 0
  c.checkpoint.every_steps = 500
  return c
