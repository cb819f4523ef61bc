"""Byte-level BPE tokenisation for decoder (causal) language models: GPT-2, Llama 3 and their kin.

Read from a checkpoint folder's ``tokenizer.json`` with the Rust ``tokenizers`` library; the ids equal those of
``transformers.AutoTokenizer`` (v5) on the same folder. As there, the file's post-processor alone decides which
special tokens surround a text (``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` are ignored when
a tokenizer.json exists), and the special tokens the tokenizer files name win over the model's ``config.json`` /
``generation_config.json`` ids. Padding and truncation are set per call, never by the file (a ``tokenizer.json``
may carry its own).

Special tokens:
- ``eos_id``: what ``add_eos`` appends (the tokenizer's ``eos_token``, else the first ``eos_token_id`` of
  generation_config.json, then config.json); ``stop_ids``: every EOS id those files name (an instruction model's
  end-of-turn token and its end-of-text), where generation stops.
- ``bos_id``: the tokenizer's ``bos_token``, else the configs' ``bos_token_id``. Whether it is added is the
  post-processor's business (``prefix_ids``): Llama 3 adds it, GPT-2 does not.
- ``pad_id``: the tokenizer's ``pad_token``, else the configs' ``pad_token_id``, else the EOS token (GPT-2 has no
  pad token; padded positions are masked out by ``attention_mask``, so its id never matters). Said once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tokenizers

from transfer.text.tokenizer import read_json

_pad_notes_said: set[str] = set()   # folders whose "pad = EOS" note has been printed


@dataclasses.dataclass
class CausalEncoded:
  """int32 ``(N, L)`` arrays; ``num_truncated`` counts rows that lost tokens (an EOS with no room counts too)."""
  input_ids: np.ndarray
  attention_mask: np.ndarray
  num_truncated: int


def _token_string(value) -> str | None:
  """A special-token entry of tokenizer_config.json: a string, ``{"content": ...}`` (an AddedToken) or null."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _config_ids(value, where: str, vocab_size: int) -> list[int]:
  """``eos_token_id`` and the like: an id, a list of ids, or null -> a list, each checked against the vocabulary."""
  if value is None:
    return []
  values = value if isinstance(value, list) else [value]
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
      raise ValueError(f"{where}={value!r}: expected token ids in [0, {vocab_size}) (the tokenizer's vocabulary)")
  return list(values)


class CausalTokenizer:
  """Tokenisation for a decoder LM (see the module docstring for how special tokens are chosen)."""

  def __init__(self, backend: tokenizers.Tokenizer, *, eos_id: int | None, bos_id: int | None, pad_id: int,
               stop_ids: Sequence[int] = (), source: str = "tokenizer"):
    backend.no_padding()
    backend.no_truncation()
    self._base, self.source = backend, source
    self._by_length: dict[tuple[int, str], tokenizers.Tokenizer] = {}  # truncation is backend state
    self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1   # ids may be sparse
    self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, int(pad_id)
    self.stop_ids = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(stop_ids)))
    # The tokens the post-processor puts around a text (Llama 3: BOS before it): probed on one character.
    probe = backend.encode("a")
    special = probe.special_tokens_mask
    if 0 not in special:
      raise ValueError(f"{source}: the tokenizer turns the text 'a' into special tokens only")
    first, last = special.index(0), len(special) - special[::-1].index(0)
    self.prefix_ids, self.suffix_ids = tuple(probe.ids[:first]), tuple(probe.ids[last:])

  @classmethod
  def from_folder(cls, folder) -> "CausalTokenizer":
    """From ``folder/tokenizer.json`` and the folder's tokenizer_config.json, special_tokens_map.json,
    generation_config.json and config.json (each optional)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{folder}: no tokenizer.json (a decoder's tokenizer is read from the tokenizers "
                              "library's file; save one with transformers' tokenizer.save_pretrained)")
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:   # the Rust library raises its own Exception type
      raise ValueError(f"{path}: not a readable tokenizers file ({e})") from None
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    tok_config = read_json(folder, "tokenizer_config.json")
    special_map = read_json(folder, "special_tokens_map.json")
    model_config = read_json(folder, "config.json")
    gen_config = read_json(folder, "generation_config.json")

    def named(key: str) -> int | None:
      """The id of the special token the tokenizer files name for ``key``, if any."""
      for file, source in (("tokenizer_config.json", tok_config), ("special_tokens_map.json", special_map)):
        token = _token_string(source.get(key))
        if token is not None:
          token_id = backend.token_to_id(token)
          if token_id is None:
            raise ValueError(f"{os.path.join(folder, file)}: {key} {token!r} is not in tokenizer.json's vocabulary")
          return token_id
      return None

    def configured(key: str) -> list[int]:
      """``key`` (e.g. eos_token_id) from generation_config.json, then config.json: all ids named, in order."""
      ids = []
      for file, source in (("generation_config.json", gen_config), ("config.json", model_config)):
        ids += _config_ids(source.get(key), f"{os.path.join(folder, file)}: {key}", vocab_size)
      return list(dict.fromkeys(ids))

    eos_ids, bos_ids, pad_ids = configured("eos_token_id"), configured("bos_token_id"), configured("pad_token_id")
    eos_id = named("eos_token")
    eos_id = eos_id if eos_id is not None else (eos_ids[0] if eos_ids else None)
    bos_id = named("bos_token")
    bos_id = bos_id if bos_id is not None else (bos_ids[0] if bos_ids else None)
    pad_id = named("pad_token")
    pad_id = pad_id if pad_id is not None else (pad_ids[0] if pad_ids else None)
    if pad_id is None:
      if eos_id is None:
        raise ValueError(f"{folder}: the tokenizer has neither a pad nor an EOS token (tokenizer_config.json "
                         "pad_token / eos_token, or generation_config.json / config.json pad_token_id / "
                         "eos_token_id); a causal LM's data needs an EOS token")
      pad_id = eos_id
      if folder not in _pad_notes_said:
        _pad_notes_said.add(folder)
        print(f"tokenizer {folder}: no pad token; padding with the EOS token "
              f"{backend.id_to_token(eos_id)!r} (id {eos_id}); padded positions are masked out", flush=True)
    return cls(backend, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, stop_ids=eos_ids, source=folder)

  def _backend(self, max_length: int, side: str) -> tokenizers.Tokenizer:
    key = (max_length, side)
    if key not in self._by_length:
      tok = tokenizers.Tokenizer.from_str(self._base.to_str())
      tok.enable_truncation(max_length, direction=side)
      self._by_length[key] = tok
    return self._by_length[key]

  def tokens(self, texts: Sequence[str]) -> list[list[int]]:
    """The ids of each text alone: no special tokens, no truncation (the LM data assembles rows from these)."""
    if isinstance(texts, str):
      raise TypeError("tokens takes a list of strings; wrap a single text as [text]")
    return [e.ids for e in self._base.encode_batch(list(texts), add_special_tokens=False)]

  def encode(self, texts: Sequence[str], pairs: None = None, *, max_length: int, add_eos: bool = False,
             add_special_tokens: bool = True,
             padding_side: str = "right", truncation_side: str = "right", pad_to: int | None = None) -> CausalEncoded:
    """Ids for ``texts`` with the tokenizer's own special tokens (BOS for Llama 3), at most ``max_length`` each.

    ``add_eos`` appends ``eos_id`` to each row that ends where its text ends: a row cut by truncation, or with no
    room left for the EOS, gets none (and counts as truncated), so a model never learns to stop mid-text.
    Truncation keeps the start (``truncation_side='left'``: the end, for prompts) and the tokenizer's special
    tokens, as transformers does. L is ``pad_to`` if given, else the longest row. ``padding_side='left'`` puts the
    padding first (prompts for generation, whose next token then follows the last column).
    """
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings; wrap a single text as [text]")
    if pairs is not None:   # the same call as the encoders' tokenizer, which takes sentence pairs
      raise ValueError("a decoder's tokenizer reads one text per row: config.data.pair_field is for encoders "
                       "(BERT); join the two texts into one column for a decoder")
    for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
      if side not in ("left", "right"):
        raise ValueError(f"encode: {name}={side!r} is not 'left' or 'right'")
    if pad_to is not None and max_length > pad_to:
      raise ValueError(f"encode: max_length={max_length} > pad_to={pad_to}; rows could not fit")
    if add_eos and self.eos_id is None:
      raise ValueError(f"{self.source}: add_eos needs an EOS token, and the tokenizer has none")
    backend = self._backend(int(max_length), truncation_side)
    needed = backend.num_special_tokens_to_add(False) if add_special_tokens else 0
    if max_length <= needed:   # tokenizers would silently return over-long rows
      raise ValueError(f"encode: max_length={max_length} leaves no room for text after the {needed} special tokens")
    rows, truncated = [], 0
    for enc in backend.encode_batch(list(texts), add_special_tokens=add_special_tokens):
      ids, cut = list(enc.ids), bool(enc.overflowing)   # with stride 0, overflowing is non-empty iff truncated
      if add_eos and not cut:
        if len(ids) < max_length:
          ids.append(self.eos_id)
        else:
          cut = True
      rows.append(ids)
      truncated += cut
    length = pad_to if pad_to is not None else max((len(r) for r in rows), default=0)
    input_ids = np.full((len(rows), length), self.pad_id, np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
      where = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
      input_ids[i, where], attention_mask[i, where] = ids, 1
    return CausalEncoded(input_ids, attention_mask, truncated)

  def decode(self, ids, *, skip_special_tokens: bool = True):
    """Text of one row of ids (a list or 1-D array) or a list of texts for a 2-D array / list of rows.

    Special tokens (EOS, BOS, the pad token when it is special) are left out unless ``skip_special_tokens`` is
    False. Spaces are kept exactly as the tokens spell them (no clean-up of ' .' and the like)."""
    array = np.asarray(ids)
    if array.ndim == 2:
      return self._base.decode_batch(array.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens)
    if array.ndim != 1:
      raise ValueError(f"decode takes a row of ids or a 2-D batch of rows, got shape {array.shape}")
    return self._base.decode(array.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens)

  def check_vocab(self, embedding_rows: int, source: str) -> None:
    """Refuse a tokenizer whose ids could index past the model's embedding table (another model's tokenizer).

    Fewer tokens than rows is allowed: embedding tables are often padded (e.g. to a multiple of 64)."""
    if self.vocab_size > embedding_rows:
      raise ValueError(f"{source}: the tokenizer has ids up to {self.vocab_size - 1} but the model's embedding table "
                       f"has only {embedding_rows} rows (vocab_size); use the tokenizer that was trained with "
                       "this checkpoint")
