"""Causal-LM data from local files (``config.data.name='lm_text'``): each split is a ``.jsonl`` file of prompt /
response pairs, or plain text (a ``.txt`` file, or a folder of them) packed into fixed-length rows.

Every row carries ``input_ids``, ``attention_mask`` and ``loss_mask`` (N, max_length) int32. ``loss_mask[i, t]``
is 1 exactly where token t is a target: predicted from the logits at t - 1 (so column 0 is never a target).

- Prompt / response (``.jsonl``, one object per line with string fields ``config.data.prompt_field`` and
  ``response_field``): a row is the tokenizer's own prefix (Llama 3's BOS; GPT-2 has none), the prompt's tokens,
  the response's tokens and EOS, cut to ``max_length`` (with a printed count). The response and its EOS are the
  targets; the prompt is context only. A row whose cut left no target is dropped (counted). With an empty prompt and
  no prefix the row starts with EOS, so the response's first token has something to be predicted from. Prompt and
  response are tokenised separately, so the response's tokens are those it has on its own.
- Plain text (``.txt``): documents are separated by blank lines (a folder: every ``.txt`` in it, in name order,
  each split the same way). The stream is ``start doc1 EOS [BOS] doc2 EOS ...`` where ``start`` is the prefix (or
  EOS when there is none) and each later document gets the tokenizer's prefix too. Every document token and every
  EOS is a target; the start and BOS tokens are context. The stream is cut into rows of ``max_length`` that overlap
  by one token (row k starts where row k - 1 ends), so every target is predicted exactly once across the split;
  the last row is padded (attention and loss masks 0), never dropped. Documents in a row attend to the ones before
  them, as in GPT-2's own training.

Evaluation: ``config.data.eval_file``, else ``test_fraction`` of the training file's rows (JSONL) or documents
(text), drawn by ``split_seed``.
"""
from __future__ import annotations

import os

import numpy as np

from transfer.data import ArrayDataset, warn_if_eval_is_train
from transfer.data.text_files import ENCODING, _not_utf8, json_objects

TEXT_SUFFIX, PAIRS_SUFFIX = ".txt", ".jsonl"


def _read_text(path: str) -> str:
  """A UTF-8 file's text (a byte-order mark dropped, newlines as '\\n'); another encoding names its first bad line."""
  try:
    with open(path, encoding=ENCODING + "-sig") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(_not_utf8(path, e)) from None


def read_pairs(path: str, prompt_field: str, response_field: str) -> list[tuple[int, str, str]]:
  """``[(line number, prompt, response)]`` of a JSONL file; a row without either string field names the file and
  line."""
  rows = []
  for line_no, obj in json_objects(path, _read_text(path).split("\n"), [prompt_field, response_field],
                                   " (config.data.prompt_field / response_field)"):
    for k in (prompt_field, response_field):
      if not isinstance(obj[k], str):
        raise ValueError(f"{path}:{line_no}: field {k!r} is {type(obj[k]).__name__} {obj[k]!r}, not a string")
    rows.append((line_no, obj[prompt_field], obj[response_field]))
  if not rows:
    raise ValueError(f"{path}: no rows (expected one JSON object per line with {prompt_field!r} and "
                     f"{response_field!r})")
  return rows


def split_documents(text: str) -> list[str]:
  """Documents of a text: runs of lines that are not blank (only whitespace), joined by '\\n'."""
  documents, lines = [], []
  for line in text.split("\n") + [""]:
    if line.strip():
      lines.append(line)
    elif lines:
      documents.append("\n".join(lines))
      lines = []
  return documents


def read_documents(path: str) -> list[str]:
  """The documents of a ``.txt`` file, or of every ``.txt`` file of a folder in name order."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(TEXT_SUFFIX))
    if not files:
      raise ValueError(f"{path}: a folder with no {TEXT_SUFFIX} files")
  else:
    files = [path]
  documents = [doc for file in files for doc in split_documents(_read_text(file))]
  if not documents:
    raise ValueError(f"{path}: no text (documents are separated by blank lines)")
  return documents


def _need_eos(tokenizer) -> int:
  if tokenizer.eos_id is None:
    raise ValueError(f"{tokenizer.source}: the tokenizer has no EOS token, which causal-LM data needs")
  return tokenizer.eos_id


def _as_arrays(rows: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` (N, max_length) int32 from (ids, targets) rows."""
  input_ids = np.full((len(rows), max_length), pad_id, np.int32)
  attention_mask = np.zeros((len(rows), max_length), np.int32)
  loss_mask = np.zeros((len(rows), max_length), np.int32)
  for i, (ids, targets) in enumerate(rows):
    input_ids[i, :len(ids)], attention_mask[i, :len(ids)], loss_mask[i, :len(ids)] = ids, 1, targets
  loss_mask[:, 0] = 0   # nothing precedes column 0
  return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def prompt_response_rows(tokenizer, pairs: list[tuple[str, str]], max_length: int, where: str = "data"
                         ) -> dict[str, np.ndarray]:
  """Rows of prefix + prompt + response + EOS with the response and EOS as targets (see the module docstring)."""
  eos = _need_eos(tokenizer)
  if max_length < 2:
    raise ValueError(f"config.data.max_length={max_length}: a causal-LM row needs at least 2 tokens")
  prompts = tokenizer.tokens([p for p, _ in pairs])
  responses = tokenizer.tokens([r for _, r in pairs])
  rows, truncated, dropped = [], 0, 0
  for prompt, response in zip(prompts, responses):
    start = list(tokenizer.prefix_ids) or ([] if prompt else [eos])
    context = start + prompt
    ids = context + response + [eos]
    targets = [0] * len(context) + [1] * (len(response) + 1)
    if len(ids) > max_length:
      truncated += 1
      ids, targets = ids[:max_length], targets[:max_length]
    if not any(targets[1:]):
      dropped += 1
      continue
    rows.append((ids, targets))
  if truncated or dropped:
    print(f"data: {where}: {truncated} of {len(pairs)} rows truncated to {max_length} tokens (config.data."
          f"max_length)" + (f"; {dropped} dropped: no response token left" if dropped else ""), flush=True)
  if not rows:
    raise ValueError(f"{where}: every row's prompt fills config.data.max_length={max_length}; no response "
                     "token is left to learn from: raise max_length")
  return _as_arrays(rows, max_length, tokenizer.pad_id)


def packed_rows(tokenizer, documents: list[str], max_length: int) -> dict[str, np.ndarray]:
  """The documents' token stream cut into rows of ``max_length`` overlapping by one token (module docstring)."""
  eos = _need_eos(tokenizer)
  if max_length < 2:
    raise ValueError(f"config.data.max_length={max_length}: packed rows overlap by one token, so they need at "
                     "least 2")
  prefix = list(tokenizer.prefix_ids)
  stream, is_target = [], []
  for doc in tokenizer.tokens(documents):
    start = prefix if prefix else ([] if stream else [eos])
    stream += start + doc + [eos]
    is_target += [0] * len(start) + [1] * (len(doc) + 1)
  step = max_length - 1
  rows = [(stream[k:k + max_length], is_target[k:k + max_length]) for k in range(0, len(stream) - 1, step)]
  return _as_arrays(rows, max_length, tokenizer.pad_id)


def _rows_for(path: str, cfg, tokenizer, items) -> dict[str, np.ndarray]:
  if path.endswith(PAIRS_SUFFIX):
    return prompt_response_rows(tokenizer, [(p, r) for _, p, r in items], cfg.max_length, where=path)
  return packed_rows(tokenizer, items, cfg.max_length)


def _read(path: str, cfg):
  """The file's items: (line, prompt, response) triples for ``.jsonl``, documents for ``.txt`` or a folder."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  if path.endswith(PAIRS_SUFFIX):
    return read_pairs(path, cfg.get("prompt_field") or "prompt", cfg.get("response_field") or "response")
  if os.path.isdir(path) or path.endswith(TEXT_SUFFIX):
    return read_documents(path)
  raise ValueError(f"data file {path!r}: unknown format; lm_text reads {PAIRS_SUFFIX} (prompt/response rows), "
                   f"{TEXT_SUFFIX} (plain text) or a folder of {TEXT_SUFFIX} files")


def _name(path: str, split: str) -> str:
  return f"{os.path.splitext(os.path.basename(os.path.normpath(path)))[0]}/{split}"


def load(cfg, tokenizer) -> tuple[ArrayDataset, ArrayDataset]:
  """(train, eval) causal-LM datasets for ``config.data`` (``train_file``; ``eval_file`` or ``test_fraction``)."""
  if not cfg.get("train_file"):
    raise ValueError("config.data.train_file: lm_text needs a .jsonl, .txt or folder of .txt files")
  train_items = _read(cfg.train_file, cfg)
  eval_path = cfg.get("eval_file")
  if eval_path:
    warn_if_eval_is_train(cfg.train_file, eval_path, "eval_file", paths=True)
    eval_items = _read(eval_path, cfg)
  else:
    fraction = cfg.get("test_fraction") or 0.0
    if not 0 < fraction < 1:
      raise ValueError(f"config.data.eval_file is unset and config.data.test_fraction={fraction} holds nothing "
                       "out: set one of them")
    n_eval = max(1, int(round(fraction * len(train_items))))
    if n_eval >= len(train_items):
      raise ValueError(f"{cfg.train_file}: {len(train_items)} rows or documents cannot be split into train and "
                       f"eval by config.data.test_fraction={fraction}: set config.data.eval_file")
    order = np.random.default_rng(cfg.get("split_seed", 0)).permutation(len(train_items))
    held = set(order[:n_eval].tolist())
    eval_items = [x for i, x in enumerate(train_items) if i in held]
    train_items = [x for i, x in enumerate(train_items) if i not in held]
    eval_path = cfg.train_file
  out = []
  for split, path, items in (("train", cfg.train_file, train_items), ("eval", eval_path, eval_items)):
    inputs = _rows_for(path, cfg, tokenizer, items)
    if split == "train" and cfg.get("train_examples"):   # a fixed random subset of rows, for short runs
      keep = np.sort(np.random.default_rng(cfg.get("split_seed", 0)).permutation(len(inputs["input_ids"]))
                     [:cfg.train_examples])
      inputs = {k: v[keep] for k, v in inputs.items()}
    kind = "prompt/response rows" if path.endswith(PAIRS_SUFFIX) else "packed rows"
    print(f"data: {path} ({split}): {len(inputs['input_ids'])} {kind} of {cfg.max_length} tokens, "
          f"{int(inputs['loss_mask'].sum())} target tokens", flush=True)
    out.append(ArrayDataset(inputs, None, [], _name(path, split), task="causal_lm"))
  return out[0], out[1]


def build(cfg, model_cfg) -> tuple[ArrayDataset, ArrayDataset]:
  """``load`` with ``config.model``'s tokenizer, checked against the model's vocabulary and position table."""
  from transfer import models, pretrained
  source = model_cfg.get("architecture") or model_cfg.get("pretrained")
  if not source:
    raise ValueError("config.data.name='lm_text' needs config.model.pretrained (or .architecture) to find the "
                     "tokenizer")
  if models.family(model_cfg.name).kind != "decoder":
    raise ValueError(f"config.data.name='lm_text' is next-token data for a decoder; config.model.name="
                     f"{model_cfg.name!r} is not one (decoders: "
                     f"{sorted(f.name for f in models.FAMILIES.values() if f.kind == 'decoder')})")
  tokenizer = pretrained.tokenizer(source)
  model_config = models.backbone(model_cfg).config
  tokenizer.check_vocab(model_config.vocab_size, source)
  if cfg.max_length > model_config.max_position_embeddings:
    raise ValueError(f"config.data.max_length={cfg.max_length} is longer than the model's "
                     f"{model_config.max_position_embeddings} positions ({source}): lower it")
  multiple = cfg.get("pad_to_multiple_of", 0)
  if multiple < 0:
    raise ValueError(f"config.data.pad_to_multiple_of must be >= 0 (0: every batch at max_length), got {multiple}")
  splits = load(cfg, tokenizer)
  for split in splits:
    split.pad_to_multiple_of = multiple
  return splits
