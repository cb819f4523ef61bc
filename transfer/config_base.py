"""Every config field the trainer reads, with its default and meaning. Configs start from ``base()``.

``transfer/config_check.py`` checks every field's type and range (and that no other field is set) before any
work. On the command line ``--config.FIELD=None`` clears a field, and a length given there (total_steps or
total_epochs, schedule.warmup_steps or warmup_epochs) replaces the config file's other one, with a note."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def auto_or(value) -> config_dict.FieldReference:
  """A field that holds a number or 'auto' (filled in by the auto rule, ``transfer/hyper_rule.py``). Typed
  ``object``, so the command line takes either: ``--config.data.resolution=128`` or ``=auto``."""
  return config_dict.FieldReference(value, field_type=object)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # init, dropout and data order; same seed + config -> same metrics
  # Random bits for dropout, stochastic depth and LoRA dropout: 'rbg' (XLA's RngBitGenerator, keyed per step and
  # per layer by threefry from the seed; fast on every backend) or 'threefry' (JAX's default counter-based
  # generator; lowers to rolled loops on CPU). Both are deterministic and the same on 1 or N devices; the two
  # draw different masks, so a run resumes with the value it started with (recorded in config.json; a relaunch
  # that changes it is an error). Memory: 'rbg' materialises its bits (one op nothing fuses into) and keeps them
  # for the backward pass, where XLA fuses 'threefry' into each mask's use and keeps nothing; with attention
  # dropout on long sequences that is most of the activations (transfer.plan shows it; README, "More than one
  # device"), so a run short of memory, remat above all, wants 'threefry'.
  c.dropout_rng_impl = "rbg"
  # What the run learns (transfer/tasks): 'classification', 'regression' (one score: MSE; Pearson/Spearman),
  # 'causal_lm' (next-token prediction with a decoder; data.name='lm_text'), or 'auto' = the data's own task
  # (TFDS datasets know theirs; local labelled files and image data: classification; lm_text: causal_lm).
  # A task the data cannot serve is an error.
  c.task = "auto"

  c.model = ml_collections.ConfigDict()
  # Architecture (transfer.models.NAMES): efficientnet-lite0..4, resnet18/34/50/101/152, bit-r50x1 ... bit-r152x4
  # (ResNet v2 as in BiT), vit-ti16/s16/s32/b16/b32/l16/l32 (and vit-test8, a test size), bert.
  c.model.name = "efficientnet-lite0"
  c.model.pretrained = config_dict.placeholder(str)     # short name or checkpoint file; None = from scratch
  # Overrides (small test models): width replaces the variant's channel multiplier (EfficientNet-Lite's width,
  # ResNet's 1.0 for its stages, not the 64-channel stem, BiT's width factor); depth replaces EfficientNet-Lite's
  # depth multiplier. Other families' depths, and every ViT size, come from the name.
  c.model.width = config_dict.placeholder(float)
  c.model.depth = config_dict.placeholder(float)
  c.model.dropout = 0.2                                 # before the head
  c.model.drop_path = 0.0                               # stochastic depth in the backbone
  c.model.bn_momentum = 0.9   # running-average momentum; 0.9 lets short fine-tuning runs' statistics catch up
  # Backbone mode: 'train' (BatchNorm batch statistics and updates, dropout, stochastic depth), 'inference', or
  # 'auto' (= 'train' if some backbone parameter trains). A frozen backbone in inference mode is a fixed extractor.
  c.model.backbone_mode = "auto"
  c.model.dtype = "float32"                             # computation dtype: float32 or bfloat16
  # bf16 projections on the CPU (transfer/native, an MKL extension built by `make`): 'auto' uses it where the CPU
  # has AMX tiles and the step runs on one device, 'mkl' always (MKL emulates bf16 without AMX: for tests and
  # measurement), 'xla' never (XLA computes bf16 dots in float32 on the CPU). Ignored for float32 and off the CPU.
  c.model.bf16_matmul = "auto"
  # Rematerialisation of the transformer families' repeated blocks (ViT, BERT, GPT-2, Llama): 'none' keeps every
  # activation for the backward pass; 'block' keeps only each block's input and recomputes the rest; 'dots' keeps
  # the matmul outputs and recomputes the elementwise work between them. Same results, less activation memory.
  c.model.remat = "none"
  # Images: how pixels are normalised before the backbone. 'auto' = the family's usual checkpoints ([-1, 1] for
  # EfficientNet-Lite, BiT and Google's ViTs; ImageNet mean/std for ResNets), 'imagenet', 'inception' ([-1, 1]),
  # or [mean, std] in pixel units. Set 'imagenet' for DeiT or DINO ViT checkpoints.
  c.model.input_norm = config_dict.FieldReference("auto", field_type=object)   # a name or a [mean, std] pair
  # Text: 'cls' (BERT pooler), 'first' (first token), 'mean' (masked mean) or 'last' (last non-padding token: the
  # pooling for decoders, which have no pooler).
  c.model.pooling = "cls"
  # ViT: 'cls' (class token) or 'mean' (no class token, mean of the patch tokens); it must match the checkpoint.
  # ViT: side of the stored position-embedding table, in patches. None: the checkpoint's own grid (or the
  # variant's native one from scratch); each call resamples it to the input's grid. A number resamples at load.
  c.model.posemb_grid = config_dict.placeholder(int)
  # EfficientNet-Lite: 'same' (TF "SAME" padding: the packaged weights, timm's tf_efficientnet_lite*) or
  # 'symmetric' (k//2: timm's efficientnet_lite*). None: from the checkpoint's layout (from scratch: 'same'); a
  # timm file does not say which, and is an error without it.
  c.model.padding = config_dict.placeholder(str)
  c.model.architecture = config_dict.placeholder(str)   # text from scratch: a source whose config.json to use

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"   # transfer.data.build: digits, text_files, tfds_text, image_folder, npz, tfds_image
  # Images are resolution x resolution pixels; 'auto': by the training images' median shorter side (128 px for
  # small images such as digits' 8x8, else 224, ImageNet's), printed with its reason (transfer/hyper_rule.py).
  c.data.resolution = auto_or("auto")
  c.data.train_per_class = config_dict.placeholder(int)  # keep k labelled training images per class
  c.data.test_fraction = 0.2         # fixed stratified held-out split (images: when the data has no eval split)
  c.data.split_seed = 0              # fixes the held-out split, the training subsets and the validation split
  # Model selection: this fraction of the training examples (after train_per_class / train_examples; stratified by
  # class) is held out as a validation split. Periodic evaluations (eval_every) and the last step measure it
  # (val/* in metrics.jsonl), the best checkpoint is chosen on it (checkpoint.best_metric 'auto': val/accuracy,
  # ...), and the eval split is measured once, at the chosen checkpoint (results.json: eval/*, selected_step).
  # 0: no validation split; evaluations measure the eval split and no checkpoint is chosen by a metric (the last
  # is reported), since choosing on the reported split would overstate it.
  c.data.val_fraction = 0.0
  # Images (image_folder, npz, tfds_image; see transfer/data/images.py). Photos are kept on the host with their
  # shorter side at most resolution / eval_crop; each batch is cropped from them at request time.
  # name='image_folder': data_dir = ROOT with ROOT/CLASS/*.jpg|png (test_fraction held out) or ROOT/train/CLASS/...
  #   and ROOT/val (validation, test)/CLASS/... (train_split / eval_split rename those folders).
  # name='npz': train_file (and eval_file, else test_fraction held out) with arrays 'image' (N, H, W, 3) uint8
  #   and 'label' (N,) class ids, optionally 'class_names'. name='tfds_image': tfds_name (cifar10, cifar100,
  #   oxford_iiit_pet, oxford_flowers102, dtd, eurosat) with data_dir, download, train_split, eval_split below.
  # Training rows: 'crop_flip' (random crop of crop_min_area..1 of the area, any aspect in 3/4..4/3, and a
  # mirror), 'flip' (the eval crop and a mirror) or 'none'; random by (seed, step, row), so resumable.
  c.data.augment = "crop_flip"
  c.data.crop_min_area = 0.08       # crop_flip: the smallest crop, as a fraction of the image's area
  # Evaluation rows: the central square of this fraction of the shorter side. Cached features (a frozen
  # backbone) are extracted from this evaluation view of the training images too: no augmentation.
  c.data.eval_crop = 0.875
  c.data.strict = False    # files that are not usable images: skipped with a count and the first paths (True: error)
  # name='text_files': local .tsv/.csv/.jsonl files with a header (see transfer/data/text_files.py)
  c.data.train_file = config_dict.placeholder(str)
  c.data.eval_file = config_dict.placeholder(str)
  c.data.text_field = "sentence"                        # column with the text
  c.data.pair_field = config_dict.placeholder(str)      # second text column, for sentence pairs
  c.data.label_field = "label"
  # name='lm_text' (transfer/data/lm_text.py): .jsonl prompt/response rows (the loss covers the response and its
  # EOS), or .txt files / a folder of them (documents split by blank lines, packed into max_length rows).
  c.data.prompt_field = "prompt"       # lm_text .jsonl: the prompt (context only, never a target)
  c.data.response_field = "response"   # lm_text .jsonl: the response (the targets, then EOS)
  c.data.labels = config_dict.placeholder(list)         # class names in order; default: sorted distinct labels
  c.data.max_length = 64                                # tokens per example (longer texts are truncated)
  c.data.pad_to_multiple_of = 16     # each text batch cut to its longest row, rounded up to this (0: max_length)
  c.data.train_examples = config_dict.placeholder(int)  # a fixed random subset of the training set
  # name='tfds_text' / 'tfds_image': a TFDS dataset by name (tfds_text.py TASKS, tfds_image.py DATASETS), read
  # through tfds.data_source (array_record, no TensorFlow)
  c.data.tfds_name = config_dict.placeholder(str)       # e.g. 'glue/sst2', 'imdb_reviews', 'cifar10', 'dtd'
  c.data.data_dir = config_dict.placeholder(str)        # TFDS data_dir (prepared data); image_folder: ROOT
  c.data.download = False                               # True only with network; offline it fails at once
  c.data.train_split = config_dict.placeholder(str)     # override the splits (e.g. validation_mismatched, folders)
  c.data.eval_split = config_dict.placeholder(str)

  c.batch_size = 32                # examples per optimizer step (all devices together)
  c.grad_accum_steps = 1           # split each batch into this many sequential micro-batches
  c.eval_batch_size = 128          # the last eval batch is padded and masked
  c.total_steps = auto_or(None)    # training length: set this or total_epochs; 'auto': by the training set's size
  c.total_epochs = config_dict.placeholder(float)   # > 0; only one of total_steps and total_epochs is set
  c.label_smoothing = 0.0
  # Mixup's Beta(alpha, alpha) (0 = off; 'auto': 0.1 from 20,000 training images up), images only: on the host,
  # from (seed, step); the loss takes the blended soft labels. Not with cached features (they are per image).
  c.mixup = auto_or(0.0)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.lr = 1e-3                                  # peak learning rate (before per-rule multipliers)
  c.schedule.decay = "cosine"                           # after warmup: cosine, linear or constant
  c.schedule.warmup_steps = auto_or(None)   # linear warmup from 0: steps or epochs; 'auto': a tenth of training
  c.schedule.warmup_epochs = config_dict.placeholder(float)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"             # adamw (decoupled decay) or sgd (L2 decay, momentum)
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.momentum = 0.9             # sgd only
  c.optimizer.nesterov = False           # sgd only
  c.optimizer.weight_decay = 0.0         # times each rule's wd_mult
  c.optimizer.grad_clip_norm = 1.0       # global-norm clipping; 0 turns it off
  c.optimizer.mu_dtype = "float32"       # Adam's first moment (SGD's momentum): 'bfloat16' halves its memory

  # The one rule list (first full-path match wins) for lr_mult, wd_mult, freeze, load and LoRA adapters
  # (lora=dict(rank, alpha, dropout, rslora) on Dense/conv kernels; transfer/models/lora.py); see transfer.optim.
  c.param_rules = [(".*", {})]
  c.layer_decay = 0.0              # layer-wise lr decay factor for numbered blocks (0 = off), e.g. 0.8

  # Devices (transfer/sharding.py). The mesh's axes and sizes: 'data' splits the batch and replicates the state,
  # 'fsdp' splits the batch and every parameter with its optimizer state (fully sharded data parallel), 'tensor'
  # splits attention heads and MLP units. Sizes multiply to the device count; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Which parameter is split how, first full-path match wins: 'replicate', 'fsdp' (largest dimension the fsdp
  # size divides), 'tensor' (the family's tensor-parallel layout, 'fsdp' for parameters it does not name), or a
  # per-dimension spec such as (None, 'tensor'). Optimizer state follows its parameter. With fsdp=tensor=1 (the
  # default mesh) every rule means 'replicate'.
  c.sharding_rules = [(".*", "fsdp")]

  # A frozen backbone in inference mode is run once over the data and its features cached (transfer/features.py):
  # 'on', 'off' or 'auto' (= whenever the backbone is fixed). Cache folder: default WORKDIR/features.
  c.feature_cache = "auto"
  c.feature_cache_dir = config_dict.placeholder(str)

  c.log_every = 10                 # steps between metrics.jsonl rows (>= 1)
  c.eval_every = 0                 # steps between evaluations (0: only at the end)
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100   # steps between saves (0: only at the end); also saved at the end
  c.checkpoint.keep_last = 2       # plus the best by best_metric
  # A validation metric (val/...; needs data.val_fraction > 0) the best checkpoint is chosen by. 'auto': the task's
  # (val/accuracy; val/pearson for regression; val/loss for causal LMs) with a validation split, else none. An
  # eval/... metric is refused: it would choose on the split that is reported.
  c.checkpoint.best_metric = "auto"
  c.checkpoint.best_mode = "auto"     # 'max', 'min', or auto: the task's for its metric; min for */loss, */mse,
                                      # */perplexity; else max
  c.fault = ml_collections.ConfigDict()
  c.fault.kill_at_step = config_dict.placeholder(int)   # tests: SIGKILL the run after this step
  c.fault.nan_at_step = config_dict.placeholder(int)    # tests: this step's input images are NaN (a non-finite loss)
  return c


def config_args(arg: str, **defaults) -> dict:
  """``configs/NAME.py:ARGS`` -> a dict: ``ARGS`` is ``key=value,key=value``; every key must be one of
  ``defaults``, whose values also give each key's type (int, float, str, or None for a string that may be unset).
  The one parser every config file uses, so a typo is an error naming the key, never silently ignored."""
  out = dict(defaults)
  for item in (part for part in (arg or "").split(",") if part.strip()):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"config ARGS {arg!r}: {item!r} is not key=value")
    if key not in defaults:
      raise ValueError(f"config ARGS {arg!r}: unknown key {key!r}; this config takes {sorted(defaults)}")
    kind = type(defaults[key]) if defaults[key] is not None else str
    try:
      out[key] = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
    except ValueError:
      raise ValueError(f"config ARGS {arg!r}: {key}={value!r} is not a {kind.__name__}") from None
  return out
