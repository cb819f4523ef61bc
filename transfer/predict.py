"""A finished run's predictions on new inputs: ``python -m transfer.predict --workdir DIR --data FILE ...``.

Inputs come in the formats the trainer reads, prepared as its evaluation prepared them:
  - text runs: a ``.txt`` file (one text per line), or a ``.tsv``, ``.csv`` or ``.jsonl`` file with the run's
    ``config.data.text_field`` (and ``pair_field``) columns; tokenised with the run's tokenizer to its
    ``max_length``;
  - image runs: image files, folders of them (searched recursively, in sorted order), or ``.npz`` files with an
    ``image`` array; each image's central ``eval_crop`` square at the run's resolution;
  - causal-LM runs: prompts, one per line of a ``.txt`` file or the ``config.data.prompt_field`` of a ``.jsonl``.

Each input row gives one JSON object (JSONL, to ``--out`` or stdout) with ``input`` (the text, file or array row)
and, for classification, ``label`` (the predicted class name) and ``probabilities`` (class name -> probability);
for regression ``value``; for a causal LM the greedy ``continuation``. The model is the run's whole model: a LoRA
run's adapters merged, a cached-feature run's head re-attached to its backbone (``transfer.runs``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from transfer import data, models, runs, tasks

TEXT_FILES = (".txt", ".tsv", ".csv", ".jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Inputs, read as the run's training data were.
# ----------------------------------------------------------------------------------------------------------------
def _lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--data {path}: no such file")
  from transfer.data import text_files
  try:
    with open(path, encoding="utf-8-sig") as f:
      return [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise ValueError(text_files._not_utf8(path, e)) from None


def read_texts(paths: list[str], cfg) -> tuple[list[str], list[str], list[str] | None]:
  """(shown inputs, texts, pair texts or None) from text files (see the module docstring)."""
  from transfer.data import text_files
  fields = [cfg.text_field] + ([cfg.pair_field] if cfg.get("pair_field") else [])
  texts, pairs = [], []
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TEXT_FILES:
      raise ValueError(f"--data {path}: a text run reads {', '.join(TEXT_FILES)} files, not {ext or 'no extension'}")
    if ext == ".txt":
      if len(fields) == 2:
        raise ValueError(f"--data {path}: this run reads sentence pairs (columns {fields}); a .txt file holds one "
                         "text per line: use a .tsv, .csv or .jsonl file with those columns")
      rows = [[line] for line in _lines(path)]
    else:
      rows = [values for _, values in text_files.read_rows(path, fields)]   # names the file and missing column
    if not rows:
      raise ValueError(f"--data {path}: no texts in the file")
    texts += [r[0].strip() for r in rows]
    pairs += [r[1].strip() for r in rows] if len(fields) == 2 else []
  shown = [t if not pairs else f"{t}\t{p}" for t, p in zip(texts, pairs or texts)]
  return shown, texts, pairs or None


def _image_files(path: str) -> list[str]:
  from transfer.data.image_folder import IMAGE_EXTENSIONS
  if os.path.isdir(path):
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
      raise ValueError(f"--data {path}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--data {path}: no such file or folder")
  return [path]


def _npz_images(path: str) -> np.ndarray:
  try:
    with np.load(path, allow_pickle=False) as archive:
      if "image" not in archive.files:
        raise ValueError(f"--data {path}: no array 'image' (the file has {sorted(archive.files)}); expected 'image' "
                         "(N, H, W, 3) uint8")
      image = archive["image"]
  except (OSError, ValueError, AttributeError) as e:
    if str(e).startswith("--data"):
      raise
    raise ValueError(f"--data {path}: not a readable .npz archive with an 'image' array ({e})") from None
  if image.dtype != np.uint8 or not (image.ndim == 3 or (image.ndim == 4 and image.shape[-1] in (1, 3, 4))):
    raise ValueError(f"--data {path}: array 'image' is {image.dtype} {image.shape}; the run reads uint8 (N, H, W, 3) "
                     "(or grey (N, H, W), (N, H, W, 1), RGBA (N, H, W, 4)) pixels")
  return image


def read_images(paths: list[str], cfg) -> Iterator[tuple[str, np.ndarray]]:
  """``(where, uint8 (resolution, resolution, 3))`` per image: the evaluation crop the run measured with."""
  from transfer.data import image_ops, images
  resolution = int(cfg.resolution)
  eval_crop = 1.0 if cfg.name == "digits" else float(cfg.get("eval_crop", 0.875))   # digits: whole images
  short_side = -(-resolution * 1000 // round(eval_crop * 1000))   # as images.load: ceil(resolution / eval_crop)

  def view(where, raw):
    try:
      pixels = images.read_image(raw, short_side).pixels
    except images.UNREADABLE as e:
      raise ValueError(f"--data {where}: not a readable image ({e})") from None
    h, w = pixels.shape[:2]
    return where, image_ops.render(pixels, image_ops.center_box(w, h, eval_crop), resolution)

  for path in paths:
    if path.lower().endswith(".npz"):
      for i, pixels in enumerate(_npz_images(path)):
        yield view(f"{path}:image[{i}]", pixels)
    else:
      for file in _image_files(path):
        yield view(file, file)


def _batches(items: list, size: int) -> Iterator[tuple[list, int]]:
  """(rows padded to ``size`` with the first row, real count)."""
  for start in range(0, len(items), size):
    chunk = items[start:start + size]
    yield chunk + [chunk[0]] * (size - len(chunk)), len(chunk)


# ----------------------------------------------------------------------------------------------------------------
# Predictions.
# ----------------------------------------------------------------------------------------------------------------
def predict_classifier(workdir: str, inputs: list[str], *, checkpoint="last", batch_size: int = 32,
                       log=print) -> list[dict]:
  """One prediction per input row of a classification or regression run (module docstring)."""
  config, module, variables, class_names, step = runs.classifier_from_workdir(workdir, checkpoint)
  log(f"{workdir} step {step}: {config.model.name} "
      f"({'classes ' + ', '.join(class_names[:10]) if class_names else 'regression'})")
  apply = jax.jit(lambda v, batch: module.apply(v, batch, train=False).astype(jnp.float32),
                  compiler_options=models.compiler_options(config.model))
  outputs, shown = [], []
  if data.is_image_source(config.data.name):
    rows = list(read_images(inputs, config.data))
    shown = [where for where, _ in rows]
    for chunk, n in tqdm(list(_batches(rows, batch_size)), desc="predict", leave=False, disable=None):
      outputs.append(np.asarray(apply(variables, {"image": np.stack([pixels for _, pixels in chunk])}))[:n])
  else:
    from transfer import pretrained
    shown, texts, pairs = read_texts(inputs, config.data)
    tok = pretrained.tokenizer(config.model.get("architecture") or config.model.get("pretrained"))
    enc = tok.encode(texts, pairs, max_length=config.data.max_length, pad_to=config.data.max_length)
    if enc.num_truncated:
      log(f"note: {enc.num_truncated} of {len(texts)} texts cut to {config.data.max_length} tokens (the run's "
          "config.data.max_length)")
    fields = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if getattr(enc, "token_type_ids", None) is not None:
      fields["token_type_ids"] = enc.token_type_ids
    for chunk, n in tqdm(list(_batches(list(range(len(texts))), batch_size)), desc="predict", leave=False,
                         disable=None):
      batch = {k: v[np.asarray(chunk)] for k, v in fields.items()}
      outputs.append(np.asarray(apply(variables, batch))[:n])
  out = np.concatenate(outputs)
  task = tasks.TASKS["classification" if class_names else "regression"]
  rows = task.predictions(out, class_names) if class_names else task.predictions(out)
  return [{"input": where, **row} for where, row in zip(shown, rows)]


def predict_causal_lm(workdir: str, inputs: list[str], *, checkpoint="last", batch_size: int = 8,
                      max_new_tokens: int = 32, log=print) -> list[dict]:
  """The greedy continuation of each prompt (one per line of a .txt, or the prompt field of a .jsonl)."""
  from transfer import generate
  from transfer.data import text_files
  config = runs.read_config(workdir)
  prompts = []
  for path in inputs:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
      prompts += _lines(path)
    elif ext == ".jsonl":
      prompts += [values[0] for _, values in text_files.read_rows(path, [config.data.get("prompt_field", "prompt")])]
    else:
      raise ValueError(f"--data {path}: a causal-LM run reads prompts from .txt (one per line) or .jsonl files")
  if not prompts:
    raise ValueError(f"--data {', '.join(inputs)}: no prompts")
  module, variables, tokenizer, description = generate.load_model(workdir=workdir, checkpoint=checkpoint)
  log(description)
  context = module.backbone.config.max_position_embeddings
  if not 1 <= max_new_tokens < context:
    raise ValueError(f"--max_new_tokens {max_new_tokens}: must be at least 1 and leave room for a prompt in the "
                     f"model's context of {context} positions")
  rows = []
  for chunk, n in _batches(prompts, batch_size):
    ids, mask = generate.encode_prompts(tokenizer, chunk, limit=context - max_new_tokens, truncate=True, log=log)
    out = generate.generate(module, variables, ids, mask, max_new_tokens=max_new_tokens,
                            eos_token_id=list(tokenizer.stop_ids) or None, pad_token_id=tokenizer.pad_id)
    rows += [{"input": p, "continuation": generate.continuation_text(tokenizer, r)} for p, r in zip(chunk[:n], out)]
  return rows


def predict(workdir: str, inputs: list[str], *, checkpoint="last", batch_size: int = 32, max_new_tokens: int = 32,
            log=print) -> list[dict]:
  """The run's predictions on ``inputs`` (files or folders), one dict per input row."""
  if runs.task_of(runs.read_config(workdir)) == "causal_lm":
    return predict_causal_lm(workdir, inputs, checkpoint=checkpoint, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, log=log)
  return predict_classifier(workdir, inputs, checkpoint=checkpoint, batch_size=batch_size, log=log)


def main(argv=None) -> int:
  """Exit 2 for a bad command line, 1 for a run or input that cannot be used."""
  parser = argparse.ArgumentParser(prog="python -m transfer.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--data", required=True, nargs="+", help="input files or folders (see --help's formats)")
  parser.add_argument("--checkpoint", default="last",
                      help="'last' (default), 'best' (chosen on the run's validation split) or a step")
  parser.add_argument("--out", help="write JSONL here (default: stdout)")
  parser.add_argument("--batch_size", type=int, default=32, help="inputs per compiled batch (default 32)")
  parser.add_argument("--max_new_tokens", type=int, default=32, help="causal LM: tokens per continuation (default 32)")
  try:
    args = parser.parse_args(argv)
    if args.batch_size < 1:
      parser.error(f"--batch_size {args.batch_size}: must be at least 1")
  except SystemExit as e:
    return int(e.code or 0)
  log = (lambda msg: print(msg, file=sys.stderr, flush=True))
  try:
    rows = predict(args.workdir, args.data, checkpoint=args.checkpoint, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, log=log)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  if args.out:
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(lines)
    os.replace(tmp, args.out)
    log(f"wrote {len(rows)} predictions to {args.out}")
  else:
    sys.stdout.write(lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
