"""A decoder written back out as a Hugging Face folder, and a causal-LM training run's model.

``save_decoder`` writes what transformers 5's ``save_pretrained`` writes for a causal LM: ``config.json`` with its
``architectures`` (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, ...), float32 ``model.safetensors`` under
HF's key names (a tied LM head is not stored: it is the token embedding), plus the tokenizer's files. A model
fine-tuned here then loads in ``transformers.AutoModelForCausalLM.from_pretrained`` and in
``transfer.load_pretrained``. The parameters are checked against the model that config.json describes before
anything is written (every missing, unexpected or mis-shaped tensor listed), and the folder is filled from a
temporary directory beside it, so a refused export leaves nothing behind.

``causal_lm_from_workdir`` builds a run's language model with the parameters ``transfer.runs`` reads from its
checkpoint (``python -m transfer.generate --workdir``), and ``export_workdir`` (``python -m transfer.export
--format hf``) writes it
out with the tokenizer of the checkpoint the run started from.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np

from transfer import models, rules, runs


# Copied from the tokenizer folder when present (tokenizer.json is required: the decoders' tokenizer reads it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "vocab.txt", "generation_config.json")
# Weight files a folder may already hold; ``overwrite`` removes them, so none is read instead of the new one.
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def _lm_param_shapes(module, fam) -> dict:
  """``{path: shape}`` of a causal LM's params (no collection prefix), from its abstract init: nothing allocated."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), fam.example_batch()))
  return {k: v.shape for k, v in rules.flatten(shapes.get("params", {})).items()}


def _relative_params(flat_params) -> dict[str, np.ndarray]:
  """Flat params keyed by module path (``backbone/wte/embedding``), as float32 numpy; ``params/``-prefixed keys
  (``rules.flatten(variables)``) are accepted too."""
  flat = dict(flat_params)
  if flat and all(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items()}
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def save_decoder(folder, flat_params, hf_config: dict, tokenizer_folder=None, *, overwrite: bool = False) -> str:
  """Writes a Hugging Face causal-LM folder; returns its path.

  ``flat_params``: ``{module path: array}`` of a ``CausalLM`` (``backbone/...`` and, untied, ``lm_head/kernel``),
  as ``rules.flatten(variables['params'])`` or ``params_from_workdir`` give them. ``hf_config``: the decoder's HF
  config dict (its ``model_type`` picks the family; vocabulary, shapes, special-token ids and tying come from it);
  written with ``architectures`` set and dtype float32. ``tokenizer_folder``: where tokenizer.json and its
  companions (``TOKENIZER_FILES``) are copied from; the tokenizer's ids must fit the vocabulary. A non-empty
  ``folder`` is refused unless ``overwrite``, which replaces the files written here and removes older weight files.
  """
  folder = os.path.abspath(os.fspath(folder))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise FileExistsError(f"export folder {folder} is a file")
  if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
    raise FileExistsError(f"export folder {folder} is not empty ({runs.listing(os.listdir(folder), 4)}); choose an "
                          "empty or new folder, or pass overwrite=True (--overwrite)")
  if not isinstance(hf_config, dict) or not isinstance(hf_config.get("model_type"), str):
    raise ValueError("save_decoder: hf_config must be a config.json dict with a 'model_type'")
  fam = models.family_of_model_type(hf_config["model_type"], "hf_config")
  if fam.to_hf is None:
    writable = sorted(f.name for f in models.FAMILIES.values() if f.to_hf is not None)
    raise ValueError(f"hf_config: model_type {hf_config['model_type']!r} is the {fam.name} family, not a decoder; "
                     f"export writes decoders: {writable}")
  if tokenizer_folder is not None and not os.path.isfile(os.path.join(tokenizer_folder, "tokenizer.json")):
    raise FileNotFoundError(f"tokenizer folder {tokenizer_folder}: no tokenizer.json to copy")
  flat = _relative_params(flat_params)

  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.export-", dir=parent)
  try:
    _write_json(os.path.join(staging, "config.json"), hf_config)
    # The model config.json describes, built as the loader builds it: every parameter must fit it exactly.
    module = models.build_lm(ml_collections.ConfigDict({"name": fam.name, "architecture": staging}))
    runs.check_params_fit(flat, _lm_param_shapes(module, fam), f"export to {folder}")
    config_json, state = fam.to_hf({"params/" + k: v for k, v in flat.items()}, hf_config=hf_config,
                                          source_name="hf_config")
    config_json["dtype"] = "float32"
    if "torch_dtype" in config_json:   # its name before transformers 5
      config_json["torch_dtype"] = "float32"
    _write_json(os.path.join(staging, "config.json"), config_json)
    if tokenizer_folder is not None:
      from transfer.text.causal_tokenizer import CausalTokenizer
      CausalTokenizer.from_folder(tokenizer_folder).check_vocab(module.backbone.config.vocab_size,
                                                                f"tokenizer folder {tokenizer_folder}")
      for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_folder, name)):
          shutil.copyfile(os.path.join(tokenizer_folder, name), os.path.join(staging, name))
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
              os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})   # what transformers expects

    os.makedirs(folder, exist_ok=True)
    if overwrite:
      for pattern in _WEIGHT_PATTERNS:
        for stale in glob.glob(os.path.join(folder, pattern)):
          os.remove(stale)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(folder, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return folder


def _write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# Training runs: the causal LM a run holds (transfer/runs.py reads the run).
# ----------------------------------------------------------------------------------------------------------------
def require_causal_lm(config, workdir) -> None:
  """A run whose model is a decoder with its LM head (task causal_lm), else a ValueError saying what it is."""
  task, model = runs.task_of(config), config.get("model", {}).get("name")
  if task != "causal_lm":
    data_name = config.get("data", {}).get("name")
    raise ValueError(f"--workdir {workdir} is a {task or 'non-causal-LM'} run (config.json: task="
                     f"{config.get('task', 'auto')!r}, data.name={data_name!r}, model.name={model!r}); it has no "
                     "next-token head to generate with or export. Use a causal-LM run (config.task='causal_lm', "
                     "data.name='lm_text'), or --model with a decoder checkpoint")


def causal_lm_from_workdir(workdir, checkpoint="last"):
  """(``config.model``, CausalLM module, variables, step) of a causal-LM run's checkpoint, strictly checked."""
  config = runs.read_config(workdir)
  require_causal_lm(config, workdir)
  step = runs.checkpoint_step(workdir, checkpoint)
  config, flat, _, _ = runs.variables_from_workdir(workdir, step)
  model_cfg = config.model
  module = models.build_lm(model_cfg)
  runs.check_params_fit(flat, _lm_param_shapes(module, models.family(model_cfg.name)),
                        f"--workdir {workdir} step {step}")
  return model_cfg, module, {"params": rules.unflatten(flat)}, step


def model_source(model_cfg) -> str:
  """The folder (or name) whose config.json and tokenizer a run's decoder comes from."""
  source = model_cfg.get("architecture") or model_cfg.get("pretrained")
  if not source:
    raise ValueError("config.model has neither pretrained nor architecture: the run's tokenizer cannot be found")
  return source


def export_workdir(workdir, folder, *, checkpoint="last", overwrite: bool = False) -> str:
  """A causal-LM run's checkpoint as a Hugging Face folder, with the config.json and tokenizer of its source."""
  from transfer import pretrained
  model_cfg, _, variables, _ = causal_lm_from_workdir(workdir, checkpoint)
  source = model_source(model_cfg)
  hf_config, _ = pretrained.hf_config(source)
  return save_decoder(folder, rules.flatten(variables["params"]), hf_config,
                      tokenizer_folder=pretrained.locate(source)[1], overwrite=overwrite)
