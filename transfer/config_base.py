"""Every config field the trainer reads, with its default and meaning. Configs start from ``base()``."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # init, dropout and data order; same seed + config -> same metrics

  c.model = ml_collections.ConfigDict()
  c.model.name = "efficientnet-lite0"                   # architecture (transfer.models)
  c.model.pretrained = config_dict.placeholder(str)     # short name or checkpoint file; None = from scratch
  c.model.width = config_dict.placeholder(float)        # override the variant's width multiplier (tests)
  c.model.depth = config_dict.placeholder(float)        # override the variant's depth multiplier (tests)
  c.model.dropout = 0.2                                 # before the head
  c.model.drop_path = 0.0                               # stochastic depth in the backbone
  c.model.bn_momentum = 0.9   # running-average momentum; 0.9 lets short fine-tuning runs' statistics catch up
  # Backbone mode: 'train' (BatchNorm batch statistics and updates, dropout, stochastic depth), 'inference', or
  # 'auto' (= 'train' if some backbone parameter trains). A frozen backbone in inference mode is a fixed extractor.
  c.model.backbone_mode = "auto"
  c.model.dtype = "float32"                             # computation dtype: float32 or bfloat16
  c.model.pooling = "cls"    # text: 'cls' (BERT pooler), 'first' (first token) or 'mean' (masked mean)
  c.model.architecture = config_dict.placeholder(str)   # text from scratch: a source whose config.json to use

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"                                # transfer.data.build
  c.data.resolution = 64                                # images are resized to resolution x resolution
  c.data.train_per_class = config_dict.placeholder(int)  # keep k labelled training images per class
  c.data.test_fraction = 0.2                            # fixed stratified held-out split
  c.data.split_seed = 0                                 # fixes the split and the k-per-class subset
  # name='text_files': local .tsv/.csv/.jsonl files with a header (see transfer/data/text_files.py)
  c.data.train_file = config_dict.placeholder(str)
  c.data.eval_file = config_dict.placeholder(str)
  c.data.text_field = "sentence"                        # column with the text
  c.data.pair_field = config_dict.placeholder(str)      # second text column, for sentence pairs
  c.data.label_field = "label"
  c.data.task = "auto"   # 'classification' or 'regression' (float score, MSE, Pearson/Spearman); auto: TFDS's, else cls
  c.data.labels = config_dict.placeholder(list)         # class names in order; default: sorted distinct labels
  c.data.max_length = 64                                # tokens per example (longer texts are truncated)
  c.data.pad_to_multiple_of = 16     # each text batch cut to its longest row, rounded up to this (0: max_length)
  c.data.train_examples = config_dict.placeholder(int)  # a fixed random subset of the training file
  # name='tfds_text': a TFDS text task by name (transfer/data/tfds_text.py TASKS), read through tfds.data_source
  c.data.tfds_name = config_dict.placeholder(str)       # e.g. 'glue/sst2', 'imdb_reviews', 'ag_news_subset'
  c.data.data_dir = config_dict.placeholder(str)        # TFDS data_dir holding the prepared (array_record) data
  c.data.download = False                               # True only with network; offline it fails at once
  c.data.train_split = config_dict.placeholder(str)     # override the task's splits (e.g. validation_mismatched)
  c.data.eval_split = config_dict.placeholder(str)

  c.batch_size = 32                # examples per optimizer step (all devices together)
  c.grad_accum_steps = 1           # split each batch into this many sequential micro-batches
  c.eval_batch_size = 128          # the last eval batch is padded and masked
  c.total_steps = config_dict.placeholder(int)     # training length: set this or total_epochs
  c.total_epochs = config_dict.placeholder(float)
  c.label_smoothing = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.lr = 1e-3                                  # peak learning rate (before per-rule multipliers)
  c.schedule.decay = "cosine"                           # after warmup: cosine, linear or constant
  c.schedule.warmup_steps = config_dict.placeholder(int)  # linear warmup from 0: steps or epochs
  c.schedule.warmup_epochs = config_dict.placeholder(float)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"             # adamw (decoupled decay) or sgd (L2 decay, momentum)
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.momentum = 0.9             # sgd only
  c.optimizer.nesterov = False           # sgd only
  c.optimizer.weight_decay = 0.0         # times each rule's wd_mult
  c.optimizer.grad_clip_norm = 1.0       # global-norm clipping; 0 turns it off

  # The one rule list (first full-path match wins) for lr_mult, wd_mult, freeze and load; see transfer.optim.
  c.param_rules = [(".*", {})]
  c.layer_decay = 0.0              # layer-wise lr decay factor for numbered blocks (0 = off), e.g. 0.8

  # A frozen backbone in inference mode is run once over the data and its features cached (transfer/features.py):
  # 'on', 'off' or 'auto' (= whenever the backbone is fixed). Cache folder: default WORKDIR/features.
  c.feature_cache = "auto"
  c.feature_cache_dir = config_dict.placeholder(str)

  c.log_every = 10                 # steps between metrics.jsonl rows
  c.eval_every = 0                 # steps between evaluations (0: only at the end)
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100   # also saved at the end
  c.checkpoint.keep_last = 2       # plus the best by best_metric
  c.checkpoint.best_metric = "auto"   # auto: eval/accuracy, or eval/pearson for regression
  c.checkpoint.best_mode = "max"
  c.fault = ml_collections.ConfigDict()
  c.fault.kill_at_step = config_dict.placeholder(int)   # tests: SIGKILL the run after this step
  return c
