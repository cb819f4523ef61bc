"""all-MiniLM-L6-v2 (6-layer BERT) fine-tuned on SST-2 sentiment, from local TSV files.

  python -m transfer.train --config configs/minilm_sst2.py --workdir runs/minilm_sst2 \\
      [--config.data.train_examples=2000]

ARGS (``configs/minilm_sst2.py:ARGS``): ``data=DIR`` the folder with ``train.tsv`` and ``dev.tsv`` (header
``sentence<TAB>label``; default ``../shared/data/sst2``). Full fine-tuning: every weight trains, the encoder at
0.005x the new head's learning rate (5e-5 vs 1e-2) (layer-wise decay available with ``--config.layer_decay=0.9``); mean pooling, as the
checkpoint was trained for sentence embeddings. Reports accuracy on the 872-sentence dev split.

Expected (2 CPU cores): 640 training sentences, one pass, length 48 -> 0.77 dev accuracy in ~35 s;
20,000 sentences (--config.data.train_examples=20000), one pass -> 0.873 in ~20 min. The full-data run (67k
sentences, --config.total_epochs=2) -> 0.893 dev accuracy (106 min while other jobs shared the cores).
"""
import ml_collections

from transfer import config_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  folder = config_base.config_args(arg, data="../shared/data/sst2")["data"]
  c = config_base.base()
  c.model.name, c.model.pretrained, c.model.pooling, c.model.dropout = "bert", "all-minilm-l6-v2", "mean", 0.1
  c.data.name = "text_files"
  c.data.train_file, c.data.eval_file = f"{folder}/train.tsv", f"{folder}/dev.tsv"
  c.data.text_field, c.data.label_field, c.data.max_length = "sentence", "label", 64
  c.batch_size, c.eval_batch_size = 32, 128
  c.total_epochs = 1.0
  c.schedule.lr, c.schedule.warmup_epochs = 1e-2, 0.1    # the new (zero) head's; the encoder's is 5e-5
  c.optimizer.weight_decay = 0.01
  c.param_rules = [
      ("head/.*", dict(load=False, wd_mult=0.0)),
      (".*(bias|scale)", dict(lr_mult=0.005, wd_mult=0.0)),   # no decay on biases and LayerNorm scales
      ("backbone/.*", dict(lr_mult=0.005)),
  ]
  c.log_every, c.eval_every = 20, 500
  c.checkpoint.every_steps = 500
  return c
