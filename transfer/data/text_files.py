"""Sentence (or sentence-pair) classification or regression from local TSV, CSV or JSONL files with named columns."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from transfer.data import ArrayDataset, warn_if_eval_is_train


# csv's default field limit is 128 KiB (131,072 characters); a long document in one cell is legitimate data. The
# largest value a C long holds on every platform.
CSV_FIELD_LIMIT = 2 ** 31 - 1
ENCODING = "utf-8"


def read_rows(path: str, fields: list[str]) -> list[tuple[int, list[str]]]:
  """``[(line number, [value of each field])]``; a malformed row is an error naming the file and line.

  Files are read as UTF-8 (a leading byte-order mark is dropped); a file in another encoding is an error naming
  its first line that is not UTF-8."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  try:
    return _parse_rows(path, fields)
  except UnicodeDecodeError as e:
    raise ValueError(_not_utf8(path, e)) from None


def _not_utf8(path: str, error: UnicodeDecodeError) -> str:
  """The error for a file that is not UTF-8, naming its first undecodable line (the decoder only knows an offset
  in its buffer). UTF-8 never has a newline byte inside a character, so decoding line by line finds it."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        raw.decode(ENCODING)
      except UnicodeDecodeError as e:
        return (f"{path}:{line_no}: not {ENCODING.upper()} text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                f"the line); data files must be {ENCODING.upper()}: convert it (e.g. iconv -f latin1 -t utf-8)")
  return f"{path}: not {ENCODING.upper()} text ({error.reason}); data files must be {ENCODING.upper()}"


def json_objects(path: str, lines, fields: list[str], hint: str = ""):
  """``(line number, object)`` for each non-blank line of a JSONL file: a line that is not a JSON object with every
  one of ``fields`` is an error naming the file and line (``hint``: which config fields name them)."""
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise ValueError(f"{path}:{line_no}: expected a JSON object with fields {fields}, got "
                       f"{type(obj).__name__} {line.strip()[:80]!r}")
    missing = [k for k in fields if k not in obj]
    if missing:
      raise ValueError(f"{path}:{line_no}: no field(s) {missing}{hint}; the row has {sorted(obj)}")
    yield line_no, obj


def _parse_rows(path: str, fields: list[str]) -> list[tuple[int, list[str]]]:
  ext = os.path.splitext(path)[1].lower()
  rows = []
  with open(path, newline="", encoding=ENCODING + "-sig") as f:
    if ext == ".jsonl":
      return [(line_no, [str(obj[k]) for k in fields]) for line_no, obj in json_objects(path, f, fields)]
    if ext not in (".tsv", ".csv"):
      raise ValueError(f"data file {path!r}: unknown format {ext!r}; use .tsv, .csv or .jsonl")
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else csv.reader(f)
    try:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: the file is empty (a header row naming the columns is needed)")
      missing = [k for k in fields if k not in header]
      if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the header has {header}")
      index = [header.index(k) for k in fields]
      for row in reader:
        if not row:
          continue
        if len(row) != len(header):
          raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields ({header}), got {len(row)}")
        rows.append((reader.line_num, [row[i] for i in index]))
    except csv.Error as e:   # a NUL byte, a field over the limit, an unterminated quote
      raise ValueError(f"{path}:{reader.line_num}: not a readable {ext[1:].upper()} row: {e}") from None
  return rows


def _label_names(values: list[str]) -> list[str]:
  """Sorted distinct labels: numerically when they are all integers (SST-2's 0/1), else alphabetically."""
  distinct = set(values)
  if all(v.lstrip("-").isdigit() for v in distinct):
    return sorted(distinct, key=int)
  return sorted(distinct)


def _score(value: str, where: str) -> float:
  try:
    score = float(value)
  except ValueError:
    score = float("nan")
  if not np.isfinite(score):
    raise ValueError(f"{where}: label {value!r} is not a finite number (config.task='regression')")
  return score


def load(cfg, tokenizer, task: str = "auto") -> tuple[ArrayDataset, ArrayDataset]:
  """(train, eval) for ``config.data`` of kind ``text_files``; texts tokenised to ``cfg.max_length``. ``task``
  (``config.task``): 'regression' reads the labels as scores; 'auto' or 'classification' as class names."""
  fields = [cfg.text_field] + ([cfg.pair_field] if cfg.get("pair_field") else []) + [cfg.label_field]
  warn_if_eval_is_train(cfg.train_file, cfg.eval_file, "eval_file", paths=True)
  splits = {"train": read_rows(cfg.train_file, fields), "eval": read_rows(cfg.eval_file, fields)}
  if task not in ("auto", "classification", "regression"):
    raise ValueError(f"config.task={task!r}: local text files with labels serve 'classification' or 'regression'")
  regression = task == "regression"
  names = [] if regression else (list(cfg.labels) if cfg.get("labels") else
                                 _label_names([r[-1] for _, r in splits["train"]]))
  ids = {name: i for i, name in enumerate(names)}
  out = []
  for split, path in (("train", cfg.train_file), ("eval", cfg.eval_file)):
    rows = splits[split]
    if split == "train" and cfg.get("train_examples"):  # a fixed random subset, for short runs
      keep = np.sort(np.random.default_rng(cfg.get("split_seed", 0)).permutation(len(rows))[:cfg.train_examples])
      rows = [rows[i] for i in keep]
    if not rows:
      raise ValueError(f"{path}: no {split} examples (the file has a header but no rows)")
    if regression:
      labels = np.array([_score(r[-1], f"{path}:{line_no}") for line_no, r in rows], np.float32)
    else:
      for line_no, r in rows:
        if r[-1] not in ids:
          raise ValueError(f"{path}:{line_no}: label {r[-1]!r} is not one of the classes {names}")
      labels = np.array([ids[r[-1]] for _, r in rows], np.int32)
    # Without their surrounding whitespace: SST-2's sentences end with a space, which a byte-level BPE (GPT-2's)
    # makes a token of its own, the one a decoder's last-token head would then always read.
    texts = [r[0].strip() for _, r in rows]
    pairs = [r[1].strip() for _, r in rows] if cfg.get("pair_field") else None
    enc = tokenizer.encode(texts, pairs, max_length=cfg.max_length, pad_to=cfg.max_length)
    if enc.num_truncated:
      print(f"data: {path}: {enc.num_truncated} of {len(rows)} rows truncated to {cfg.max_length} tokens",
            flush=True)
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if getattr(enc, "token_type_ids", None) is not None:   # encoders' segment ids; decoders have none
      inputs["token_type_ids"] = enc.token_type_ids
    out.append(ArrayDataset(inputs, labels, names, f"{os.path.basename(os.path.dirname(path))}/{split}",
                            task="regression" if regression else "classification"))
  return out[0], out[1]
