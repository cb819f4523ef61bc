"""BERT-style tokenisation on the Rust ``tokenizers`` library, with truncation and padding set here, per call.

A ``tokenizer.json`` can carry its own padding and truncation (all-MiniLM-L6-v2's pads and truncates every row
to 128); those are switched off so batch shapes depend only on ``encode``'s arguments.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

_SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]"}


@dataclasses.dataclass
class Encoded:
  """int32 ``(N, L)`` arrays, right-padded; ``num_truncated`` counts rows that lost tokens (for the caller to report)."""
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  attention_mask: np.ndarray
  num_truncated: int


def read_json(folder: str, name: str) -> dict:
  """``folder/name``'s JSON object ({} when the file is absent); malformed JSON is an error naming the file."""
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _from_vocab_txt(path: str, config: dict, special: dict[str, str]) -> tokenizers.Tokenizer:
  """The same pipeline transformers builds from ``vocab.txt`` (its BertConverter), so ids match tokenizer.json's."""
  with open(path, encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}  # as transformers' load_vocab: later duplicates win
  lower = config.get("do_lower_case", True)
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=special["unk_token"], max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"), lowercase=lower)  # strip_accents None: strip iff lower-casing
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  cls, sep = special["cls_token"], special["sep_token"]
  for token in (cls, sep):
    if token not in vocab:
      raise ValueError(f"{path}: special token {token!r} is not in the vocabulary")
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  # Special tokens typed in the text ("[SEP]") match whole, before lower-casing, as with tokenizer.json.
  tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in special.values()])
  return tok


class Tokenizer:
  """BERT-style tokenisation with the `tokenizers` library, configured here rather than by the file's own settings."""

  def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str], max_length: int):
    backend.no_padding()
    backend.no_truncation()
    self._base, self.max_length = backend, int(max_length)
    self._by_length: dict[int, tokenizers.Tokenizer] = {}  # truncation is backend state: one copy per max_length
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
    ids = {}
    for key in ("pad_token", "cls_token", "sep_token"):
      ids[key] = backend.token_to_id(special[key])
      if ids[key] is None:
        raise ValueError(f"tokenizer: {key} {special[key]!r} is not in the vocabulary")
    self.pad_id, self.cls_id, self.sep_id = ids["pad_token"], ids["cls_token"], ids["sep_token"]

  @classmethod
  def from_folder(cls, folder, *, max_length: int | None = None) -> "Tokenizer":
    """tokenizer.json if present, else vocab.txt (WordPiece; ``do_lower_case`` from tokenizer_config.json)."""
    folder = os.fspath(folder)
    config = read_json(folder, "tokenizer_config.json")
    special = dict(_SPECIAL)
    for source in (config, read_json(folder, "special_tokens_map.json")):
      for key in _SPECIAL:
        value = source.get(key)
        if value:
          special[key] = value["content"] if isinstance(value, dict) else value
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
      backend = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif os.path.exists(os.path.join(folder, "vocab.txt")):
      backend = _from_vocab_txt(os.path.join(folder, "vocab.txt"), config, special)
    else:
      raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
    if max_length is None:
      # transformers writes a huge placeholder (1e30) for "no limit"; then the position table is the limit.
      model_max = config.get("model_max_length")
      if isinstance(model_max, (int, float)) and 0 < model_max < 1e6:
        max_length = int(model_max)
      else:
        max_length = read_json(folder, "config.json").get("max_position_embeddings", 512)
    return cls(backend, special, max_length)

  def _backend(self, max_length: int) -> tokenizers.Tokenizer:
    if max_length not in self._by_length:
      tok = tokenizers.Tokenizer.from_str(self._base.to_str())
      tok.enable_truncation(max_length, strategy="longest_first")
      self._by_length[max_length] = tok
    return self._by_length[max_length]

  def encode(self, texts: list[str], pairs: list[str] | None = None, *, max_length: int | None = None,
             pad_to: int | None = None) -> Encoded:
    """Ids for ``texts`` (and sentence ``pairs``), truncated longest-first at ``max_length`` incl. special tokens.

    L is ``pad_to`` if given, else the longest row (dynamic padding). ``pad_to`` also caps the default
    ``max_length``; an explicit ``max_length > pad_to`` is an error rather than a row that cannot fit.
    Empty ``texts`` gives (0, 0) arrays, or (0, pad_to); an empty string still gets [CLS] [SEP].
    """
    if isinstance(texts, str) or isinstance(pairs, str):
      raise TypeError("encode takes lists of strings; wrap a single text as [text]")
    if pairs is not None and len(pairs) != len(texts):
      raise ValueError(f"encode: {len(texts)} texts but {len(pairs)} pairs")
    if pad_to is not None and max_length is not None and max_length > pad_to:
      raise ValueError(f"encode: max_length={max_length} > pad_to={pad_to}; rows could not fit")
    if max_length is None:
      max_length = self.max_length if pad_to is None else min(self.max_length, pad_to)
    backend = self._backend(int(max_length))
    needed = backend.num_special_tokens_to_add(pairs is not None)
    if max_length < needed:  # tokenizers would silently return over-long rows
      raise ValueError(f"encode: max_length={max_length} leaves no room for the {needed} special tokens")
    batch = list(texts) if pairs is None else list(zip(texts, pairs))
    rows = backend.encode_batch(batch)
    length = pad_to if pad_to is not None else max((len(r.ids) for r in rows), default=0)
    input_ids = np.full((len(rows), length), self.pad_id, np.int32)
    token_type_ids = np.zeros((len(rows), length), np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
      n = len(row.ids)
      input_ids[i, :n], token_type_ids[i, :n], attention_mask[i, :n] = row.ids, row.type_ids, row.attention_mask
    # With stride 0, overflowing is non-empty exactly when truncation removed tokens.
    return Encoded(input_ids, token_type_ids, attention_mask, sum(1 for r in rows if r.overflowing))

  def check_vocab(self, embedding_rows: int, source: str) -> None:
    """Refuse a tokenizer whose ids could index past the model's embedding table (the wrong tokenizer).

    Fewer tokens than rows is allowed: embedding tables are often padded (e.g. to a multiple of 8).
    """
    if self.vocab_size > embedding_rows:
      raise ValueError(f"{source}: the tokenizer has {self.vocab_size} tokens but the model's embedding table has "
                       f"only {embedding_rows} rows; use the tokenizer that was trained with this checkpoint")
