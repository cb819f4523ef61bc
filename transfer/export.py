"""A finished run in the formats people serve with: ``python -m transfer.export --workdir DIR --out OUT --format F``.

  - ``hf``: a transformers folder (``config.json``, ``model.safetensors``, the tokenizer's files), LoRA merged:
    ``AutoModelForSequenceClassification`` for a text classifier or regressor (the head under transformers' names,
    ``id2label`` from the run's classes), ``AutoModelForCausalLM`` for a causal-LM run.
  - ``peft``: a LoRA run's adapters (``adapter_config.json``, ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(base, OUT)`` puts on the transformers base model the run started from; a
    classifier's new head travels in ``modules_to_save``. GPT-2's Conv1D layers are marked ``fan_in_fan_out``.
  - ``timm``: ``model.safetensors`` that ``timm.create_model(NAME, num_classes=K, **model_args)`` loads strictly,
    with timm's ``config.json`` (architecture, model_args, label names, input mean/std), so that
    ``timm.create_model('local-dir:OUT', pretrained=True)`` builds and loads it in one call.

Which formats a run has comes from its model family (``Family.to_hf``, ``to_hf_classifier``, ``hf_weight``,
``to_timm``); another is refused naming the ones that apply. Files are written to a temporary folder beside OUT and
moved in at the end, so a refused or failed export leaves nothing; a non-empty OUT is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from transfer import hf_export, models, rules, runs
from transfer.models import lora

FORMATS = ("hf", "peft", "timm")


def _is_lora_run(config) -> bool:
  return bool(lora.targets(config.get("param_rules")))


def formats_of(config) -> dict[str, str | None]:
  """``{format: None if the run can be written in it, else why not}``."""
  fam, task = models.family(config.model.name), runs.task_of(config)
  lm = task == "causal_lm"
  hf = (None if (fam.to_hf is not None if lm else fam.to_hf_classifier is not None) else
        f"the {fam.name} family has no transformers {'causal-LM' if lm else 'sequence-classification'} export")
  peft = ("the run has no LoRA adapters (no param_rules entry with lora)" if not _is_lora_run(config) else
          hf or (None if fam.hf_weight is not None else f"the {fam.name} family's weights have no transformers names"))
  timm = None if fam.to_timm is not None else f"the {fam.name} family is not a timm model"
  return {"hf": hf, "peft": peft, "timm": timm}


class _Staged:
  """A temporary folder beside ``out`` whose files replace ``out``'s on success (``commit``)."""

  def __init__(self, out: str, overwrite: bool):
    self.out = os.path.abspath(out)
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      raise FileExistsError(f"--out {self.out} is a file")
    if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
      raise FileExistsError(f"--out {self.out} is not empty ({runs.listing(os.listdir(self.out), 4)}); choose an "
                            "empty or new folder, or pass --overwrite")
    os.makedirs(os.path.dirname(self.out), exist_ok=True)
    self.dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.export-", dir=os.path.dirname(self.out))

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def json(self, name: str, value: dict) -> None:
    with open(self.path(name), "w") as f:
      json.dump(value, f, indent=2, sort_keys=True)
      f.write("\n")

  def safetensors(self, name: str, tensors: dict) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, self.path(name), metadata={"format": "pt"})

  def commit(self) -> str:
    os.makedirs(self.out, exist_ok=True)
    for name in os.listdir(self.dir):
      os.replace(os.path.join(self.dir, name), os.path.join(self.out, name))
    return self.out

  def discard(self) -> None:
    shutil.rmtree(self.dir, ignore_errors=True)


def _source(config) -> str:
  return config.model.get("architecture") or config.model.get("pretrained")


def _copy_tokenizer(config, staged: _Staged) -> None:
  from transfer import pretrained
  folder = pretrained.locate(_source(config))[1]
  for name in hf_export.TOKENIZER_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      shutil.copyfile(os.path.join(folder, name), staged.path(name))


# ----------------------------------------------------------------------------------------------------------------
# The formats.
# ----------------------------------------------------------------------------------------------------------------
def _write_hf(workdir, checkpoint, config, staged: _Staged) -> None:
  from transfer import pretrained
  hf_config, _ = pretrained.hf_config(_source(config))
  if runs.task_of(config) == "causal_lm":
    hf_export.export_workdir(workdir, staged.dir, checkpoint=checkpoint)
    return
  config, _, variables, class_names, _ = runs.classifier_from_workdir(workdir, checkpoint)
  fam = models.family(config.model.name)
  config_json, state = fam.to_hf_classifier(rules.flatten(variables["params"]), hf_config=hf_config,
                                            class_names=class_names or None,
                                            pooling=config.model.get("pooling") or fam.pooling)
  staged.json("config.json", config_json)
  staged.safetensors("model.safetensors", {k: np.asarray(v, np.float32) for k, v in state.items()})
  _copy_tokenizer(config, staged)


def _write_peft(workdir, checkpoint, config, staged: _Staged) -> None:
  from transfer import pretrained
  config, flat, _, _ = runs.variables_from_workdir(workdir, checkpoint, merge_lora=False)
  fam = models.family(config.model.name)
  hf_config, _ = pretrained.hf_config(_source(config))
  adapters = lora.targets(config.param_rules)
  trainable = set(runs.trainable_paths(workdir, checkpoint))
  lm = runs.task_of(config) == "causal_lm"
  if not lm and (config.model.get("pooling") or fam.pooling) != "cls":
    raise ValueError(f"--format peft: config.model.pooling={config.model.get('pooling')!r}; the transformers "
                     "classifier a PEFT adapter goes on reads BERT's pooler ('cls'); export the merged model with "
                     "--format hf instead")
  others = sorted(p for p in trainable if not lora.is_adapter(p) and not p.startswith("head/"))
  if others:
    raise ValueError(f"--format peft holds adapters and the head, but this run also trained {runs.listing(others, 4)}"
                     "; export the merged model with --format hf")
  tensors, modules, specs, conv1d = {}, [], {}, set()
  for a_path in sorted(p for p in flat if p.endswith("/lora_a")):
    kernel = lora.kernel_of(a_path)
    key, is_conv1d = fam.hf_weight(kernel, hf_config=hf_config)
    module = key.rsplit(".", 1)[0]
    a, b = np.asarray(flat[a_path], np.float32), np.asarray(flat[a_path[:-1] + "b"], np.float32)
    rank = a.shape[-1]
    if np.ndim(flat[kernel]) == 4:
      raise ValueError(f"--format peft: {kernel} is a convolution; PEFT adapters here go on transformers' linear "
                       "layers")
    tensors[f"base_model.model.{module}.lora_A.weight"] = a.reshape(-1, rank).T
    tensors[f"base_model.model.{module}.lora_B.weight"] = b.reshape(rank, -1).T
    modules.append(module)
    specs[module] = lora.spec_for(kernel, adapters)
    if is_conv1d:
      conv1d.add(module)
  if conv1d and conv1d != set(modules):
    raise ValueError(f"--format peft: fan_in_fan_out is one setting per adapter file, and the targets mix Conv1D "
                     f"({runs.listing(conv1d, 3)}) and Linear layers")
  first = specs[modules[0]]
  if any((s.dropout, s.rslora) != (first.dropout, first.rslora) for s in specs.values()):
    raise ValueError("--format peft: the LoRA rules differ in dropout or rslora, which PEFT sets once per adapter")
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM" if lm else "SEQ_CLS",
      "base_model_name_or_path": _source(config), "target_modules": modules,
      "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
      "rank_pattern": {m: s.rank for m, s in specs.items() if s.rank != first.rank},
      "alpha_pattern": {m: s.alpha for m, s in specs.items() if s.alpha != first.alpha},
      "fan_in_fan_out": bool(conv1d), "bias": "none", "inference_mode": True, "init_lora_weights": True,
      "modules_to_save": None if lm else ["classifier"],
  }
  if not lm:   # the new head, under transformers' name (the rest of the classifier is the base's)
    _, class_names = runs.read_labels(workdir)
    _, state = fam.to_hf_classifier(lora.merge(flat, adapters), hf_config=hf_config,
                                    class_names=class_names or None, pooling="cls")
    for name in ("classifier.weight", "classifier.bias"):
      tensors[f"base_model.model.{name}"] = state[name]
  staged.json("adapter_config.json", adapter_config)
  staged.safetensors("adapter_model.safetensors", tensors)


def _write_timm(workdir, checkpoint, config, staged: _Staged) -> None:
  config, _, variables, class_names, _ = runs.classifier_from_workdir(workdir, checkpoint)
  fam = models.family(config.model.name)
  name, kwargs, state = fam.to_timm(rules.flatten(variables), cfg=config.model, num_classes=len(class_names))
  kwargs = dict(kwargs)
  overlay = kwargs.pop("pretrained_cfg_overlay", {})
  resolution = int(config.data.resolution)
  staged.json("config.json", {
      "architecture": name, "num_classes": len(class_names), "label_names": class_names, "model_args": kwargs,
      "pretrained_cfg": {**overlay, "input_size": [3, resolution, resolution], "num_classes": len(class_names),
                         "crop_pct": float(config.data.get("eval_crop", 0.875)), "crop_mode": "center",
                         "interpolation": "bilinear", "fixed_input_size": "img_size" in kwargs}})
  staged.safetensors("model.safetensors", state)


WRITERS = {"hf": _write_hf, "peft": _write_peft, "timm": _write_timm}


def export(workdir, out, fmt: str, *, checkpoint="last", overwrite: bool = False) -> str:
  """Writes run ``workdir``'s checkpoint ``checkpoint`` to folder ``out`` in format ``fmt``; returns the folder."""
  if fmt not in FORMATS:
    raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
  config = runs.read_config(workdir)
  reasons = formats_of(config)
  if reasons[fmt]:
    usable = [f for f, why in reasons.items() if why is None]
    raise ValueError(f"--format {fmt}: {reasons[fmt]} (--workdir {workdir}, config.model.name="
                     f"{config.model.name!r}, task {runs.task_of(config)}); formats for this run: "
                     f"{', '.join(usable) or 'none'}")
  staged = _Staged(out, overwrite)
  try:
    WRITERS[fmt](workdir, checkpoint, config, staged)
    if overwrite:   # weights an earlier export left would be read instead of the new ones
      for name in os.listdir(staged.out) if os.path.isdir(staged.out) else ():
        if name.endswith((".safetensors", ".bin", ".safetensors.index.json")) and not os.path.exists(staged.path(name)):
          os.remove(os.path.join(staged.out, name))
    return staged.commit()
  finally:
    staged.discard()


def main(argv=None) -> int:
  """Exit 2 for a bad command line, 1 for a run or folder that cannot be exported."""
  parser = argparse.ArgumentParser(prog="python -m transfer.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--out", required=True, help="the folder to write (new or empty, unless --overwrite)")
  parser.add_argument("--format", required=True, choices=FORMATS, help="hf, peft or timm (see --help)")
  parser.add_argument("--checkpoint", default="last",
                      help="'last' (default), 'best' (chosen on the run's validation split) or a step")
  parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    out = export(args.workdir, args.out, args.format, checkpoint=args.checkpoint, overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out} ({args.format})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
