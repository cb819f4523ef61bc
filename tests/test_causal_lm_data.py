"""Causal-LM data: the byte-level BPE tokenizer against transformers, prompt/response and packed rows, the task's
loss and evaluation against numpy."""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from transfer.data import ArrayDataset, lm_text
from transfer.tasks.causal_lm import CausalLM
from transfer.text import causal_tokenizer
from transfer.text.causal_tokenizer import CausalTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! Hello again, world.",
    "café naïve Ångström crème brûlée", "日本語のテキストと中文", "emoji 🤖🎉 and ❤️ hearts",
    "def f(x):\n    return x + 1\n", "Numbers 3.14159 and 1,000,000 and 42nd.", "  leading and trailing spaces  ",
] * 10
TEXTS = ["Hello world", " Hello world", "The quick brown fox jumps over the lazy dog. " * 4, "", "x",
         "日本語 🤖 café", "tab\tand\nnewline", "typed <|endoftext|> special", "unseen words: zebra quokka",
         "   spaces   "]
GPT2_EOS, LLAMA_BOS, LLAMA_EOT, LLAMA_EOS = "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"


def train_byte_bpe(special: list[str]) -> tokenizers.Tokenizer:
  """A byte-level BPE (GPT-2's scheme) of about 400 tokens trained on CORPUS; special tokens get the first ids."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def write_folder(folder, tok: tokenizers.Tokenizer, files: dict) -> str:
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  for name, content in files.items():
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f)
  return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Tokenizer folders shaped like GPT-2's (no BOS, no pad) and Llama 3's (a post-processor that adds BOS)."""
  root = tmp_path_factory.mktemp("tokenizers")
  gpt2 = train_byte_bpe([GPT2_EOS])
  gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
  eos = gpt2.token_to_id(GPT2_EOS)
  vocab = gpt2.get_vocab_size()
  out = {}
  out["gpt2"] = write_folder(root / "gpt2", gpt2, {
      "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_EOS, "eos_token": GPT2_EOS,
                                "unk_token": GPT2_EOS, "add_prefix_space": False, "model_max_length": 64},
      "config.json": {"model_type": "gpt2", "vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}})
  # As the hub's gpt2: the tokenizer files name no special token; config.json does.
  out["gpt2_bare"] = write_folder(root / "gpt2_bare", gpt2, {
      "tokenizer_config.json": {"model_max_length": 64},
      "config.json": {"model_type": "gpt2", "vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}})
  llama = train_byte_bpe([LLAMA_BOS, LLAMA_EOS, LLAMA_EOT])
  bos = llama.token_to_id(LLAMA_BOS)
  llama.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{LLAMA_BOS}:0 $A:0", pair=f"{LLAMA_BOS}:0 $A:0 {LLAMA_BOS}:1 $B:1",
                                    special_tokens=[(LLAMA_BOS, bos)])])
  ids = {t: llama.token_to_id(t) for t in (LLAMA_BOS, LLAMA_EOS, LLAMA_EOT)}
  out["llama"] = write_folder(root / "llama", llama, {
      "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": LLAMA_BOS,
                                "eos_token": LLAMA_EOT, "model_max_length": 131072},
      "config.json": {"model_type": "llama", "vocab_size": llama.get_vocab_size(), "bos_token_id": ids[LLAMA_BOS],
                      "eos_token_id": ids[LLAMA_EOS]},
      "generation_config.json": {"bos_token_id": ids[LLAMA_BOS], "eos_token_id": [ids[LLAMA_EOS], ids[LLAMA_EOT]]}})
  # No post-processor in the file: tokenizer_config.json's add_bos_token / add_eos_token do not apply (transformers
  # v5 drops them when there is a tokenizer.json), so no special token is added.
  plain = train_byte_bpe([LLAMA_BOS, LLAMA_EOS, LLAMA_EOT])
  out["llama_flags"] = write_folder(root / "llama_flags", plain, {
      "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": LLAMA_BOS,
                                "eos_token": LLAMA_EOS, "pad_token": LLAMA_EOT, "add_bos_token": True,
                                "add_eos_token": True},
      "config.json": {"model_type": "llama", "vocab_size": plain.get_vocab_size()}})
  return out


def reference(folder):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(folder)


def real_rows(encoded) -> list[list[int]]:
  return [row[mask == 1].tolist() for row, mask in zip(encoded.input_ids, encoded.attention_mask)]


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "gpt2_bare", "llama", "llama_flags"])
@pytest.mark.parametrize("max_length", [256, 7])
@pytest.mark.parametrize("side", ["right", "left"])
def test_ids_equal_transformers(folders, kind, max_length, side):
  """Same ids as transformers' AutoTokenizer on the same folder, with its truncation (both sides) at max_length."""
  ours = CausalTokenizer.from_folder(folders[kind])
  theirs = reference(folders[kind])
  theirs.truncation_side = side
  expected = [theirs(t, truncation=True, max_length=max_length)["input_ids"] for t in TEXTS]
  encoded = ours.encode(TEXTS, max_length=max_length, truncation_side=side)
  assert real_rows(encoded) == expected
  assert encoded.num_truncated == sum(len(theirs(t)["input_ids"]) > max_length for t in TEXTS)
  if max_length == 7:
    assert encoded.num_truncated >= 3   # the test exercises truncation
  assert encoded.input_ids.dtype == np.int32 and encoded.attention_mask.dtype == np.int32


def test_special_tokens_follow_the_checkpoint_files(folders, capsys):
  llama = CausalTokenizer.from_folder(folders["llama"])
  vocab = tokenizers.Tokenizer.from_file(os.path.join(folders["llama"], "tokenizer.json")).get_vocab()
  assert llama.bos_id == vocab[LLAMA_BOS] and llama.prefix_ids == (vocab[LLAMA_BOS],) and llama.suffix_ids == ()
  assert llama.eos_id == vocab[LLAMA_EOT]                                  # tokenizer_config.json's eos_token
  assert set(llama.stop_ids) == {vocab[LLAMA_EOT], vocab[LLAMA_EOS]}       # ... and generation_config.json's
  assert llama.pad_id == llama.eos_id
  theirs = reference(folders["llama"])
  assert (llama.bos_id, llama.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)

  causal_tokenizer._pad_notes_said.clear()
  bare = CausalTokenizer.from_folder(folders["gpt2_bare"])     # ids from config.json only
  eos = tokenizers.Tokenizer.from_file(os.path.join(folders["gpt2_bare"], "tokenizer.json")).token_to_id(GPT2_EOS)
  assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.prefix_ids) == (eos, eos, eos, ())
  note = capsys.readouterr().out
  assert "no pad token; padding with the EOS token '<|endoftext|>'" in note
  CausalTokenizer.from_folder(folders["gpt2_bare"])
  assert capsys.readouterr().out == ""                         # said once

  flags = CausalTokenizer.from_folder(folders["llama_flags"])
  assert flags.pad_id == vocab[LLAMA_EOT] and flags.prefix_ids == flags.suffix_ids == ()


def test_padding_sides_and_eos(folders):
  tok = CausalTokenizer.from_folder(folders["llama"])
  texts = ["Hello world", "x", "The quick brown fox jumps over the lazy dog."]
  plain = [list(tok.prefix_ids) + ids for ids in tok.tokens(texts)]
  lengths = [len(p) for p in plain]
  assert lengths[0] < 10 < lengths[2]
  right = tok.encode(texts, max_length=10, add_eos=True, pad_to=12)
  left = tok.encode(texts, max_length=10, add_eos=True, padding_side="left")
  assert right.input_ids.shape == (3, 12) and left.input_ids.shape == (3, 10)
  # Rows 0 and 1 end where their text ends: + EOS. Row 2 was cut at 10: no EOS (counted as truncated).
  expect = [plain[0] + [tok.eos_id], plain[1] + [tok.eos_id], plain[2][:10]]
  assert real_rows(right) == expect and real_rows(left) == expect and right.num_truncated == 1
  for i, row in enumerate(expect):
    np.testing.assert_array_equal(right.attention_mask[i], [1] * len(row) + [0] * (12 - len(row)))
    np.testing.assert_array_equal(left.attention_mask[i], [0] * (10 - len(row)) + [1] * len(row))
    assert (right.input_ids[i, len(row):] == tok.pad_id).all()
    assert (left.input_ids[i, :10 - len(row)] == tok.pad_id).all()
  # A text that fills max_length exactly has no room for its EOS: it counts as truncated.
  exact = tok.encode([texts[0]], max_length=lengths[0], add_eos=True)
  assert real_rows(exact) == [plain[0]] and exact.num_truncated == 1


def test_decode_matches_transformers_and_round_trips(folders):
  tok = CausalTokenizer.from_folder(folders["gpt2"])
  theirs = reference(folders["gpt2"])
  for text in TEXTS:
    ids = theirs(text)["input_ids"]
    assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=False) == text   # byte-level BPE is lossless
  batch = tok.encode(TEXTS[:3], max_length=256)
  assert tok.decode(batch.input_ids) == TEXTS[:3]   # the padding (EOS) is special, hence left out


def test_vocabulary_mismatch_is_refused(folders, tmp_path):
  tok = CausalTokenizer.from_folder(folders["gpt2"])
  tok.check_vocab(tok.vocab_size, "ckpt")
  tok.check_vocab(tok.vocab_size + 64, "ckpt")   # padded embedding tables are fine
  with pytest.raises(ValueError, match=f"ckpt: the tokenizer has ids up to {tok.vocab_size - 1} .* only "
                                       f"{tok.vocab_size - 1} rows"):
    tok.check_vocab(tok.vocab_size - 1, "ckpt")
  bad = write_folder(tmp_path / "bad", train_byte_bpe([GPT2_EOS]),
                     {"tokenizer_config.json": {"eos_token": "</s>"}})
  with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '</s>' is not in tokenizer.json"):
    CausalTokenizer.from_folder(bad)
  out_of_range = write_folder(tmp_path / "range", train_byte_bpe([GPT2_EOS]),
                              {"config.json": {"eos_token_id": 100000}})
  with pytest.raises(ValueError, match=r"config.json: eos_token_id=100000: expected token ids in \[0, "):
    CausalTokenizer.from_folder(out_of_range)


# ---------------------------------------------------------------------------------------------------------------
# LM data, on a word-level tokenizer whose ids are known: <eos> 0, <bos> 1, then the words.
# ---------------------------------------------------------------------------------------------------------------

WORDS = ["<eos>", "<bos>", "what", "is", "two", "four", "hi", "there", "a", "b", "c", "d", "e", "f", "g"]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(bos: bool) -> CausalTokenizer:
  backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens(["<eos>", "<bos>"])
  if bos:
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
  return CausalTokenizer(backend, eos_id=0, bos_id=1 if bos else None, pad_id=0, source="words")


def ids(text: str) -> list[int]:
  return [ID[w] for w in text.split()]


def test_prompt_response_rows_exact(capsys):
  pairs = [("what is two", "four"), ("", "hi there"), ("hi", "a b c d e f")]
  out = lm_text.prompt_response_rows(word_tokenizer(bos=False), pairs, max_length=6, where="x.jsonl")
  # GPT-2-like: prompt + response + EOS; an empty prompt starts with EOS; row 2 is cut at 6 (its EOS lost).
  np.testing.assert_array_equal(out["input_ids"], [ids("what is two four <eos> <eos>"),
                                                   ids("<eos> hi there <eos> <eos> <eos>"),
                                                   ids("hi a b c d e")])
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1] * 6])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
  assert "x.jsonl: 1 of 3 rows truncated to 6 tokens" in capsys.readouterr().out

  out = lm_text.prompt_response_rows(word_tokenizer(bos=True), pairs + [("a b c d e f", "g")], max_length=6)
  # Llama-like: BOS first (context); the fourth row's prompt fills the row, so it has no target and is dropped.
  np.testing.assert_array_equal(out["input_ids"], [ids("<bos> what is two four <eos>"),
                                                   ids("<bos> hi there <eos> <eos> <eos>"),
                                                   ids("<bos> hi a b c d")])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
  assert "2 of 4 rows truncated to 6 tokens (config.data.max_length); 1 dropped: no response token left" in \
      capsys.readouterr().out


def test_packed_rows_exact_and_every_token_once():
  docs = ["a b c", "d", "e f g hi there"]
  out = lm_text.packed_rows(word_tokenizer(bos=False), docs, max_length=4)
  # Stream: <eos> a b c <eos> d <eos> e f g hi there <eos> (13 tokens); rows of 4 overlapping by one.
  np.testing.assert_array_equal(out["input_ids"], [ids("<eos> a b c"), ids("c <eos> d <eos>"), ids("<eos> e f g"),
                                                   ids("g hi there <eos>")])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_array_equal(out["attention_mask"], np.ones((4, 4)))

  rng = np.random.default_rng(0)
  words = WORDS[2:]
  docs = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(30)]
  for bos in (False, True):
    tok = word_tokenizer(bos)
    expected_targets = [t for d in docs for t in ids(d) + [0]]        # each document's tokens and its EOS
    for max_length in (2, 3, 5, 16, 64, 1000):
      out = lm_text.packed_rows(tok, docs, max_length)
      got = out["input_ids"][out["loss_mask"] == 1].tolist()           # row-major: stream order
      assert got == expected_targets, (bos, max_length)
      assert ((out["loss_mask"] == 1) <= (out["attention_mask"] == 1)).all()
      # Each row starts with the previous row's last token (its context), so no target is skipped.
      real = out["attention_mask"].sum(1)
      for k in range(1, len(real)):
        assert out["input_ids"][k, 0] == out["input_ids"][k - 1, real[k - 1] - 1]
      assert (real[:-1] == max_length).all() and 2 <= real[-1] <= max_length   # only the last row is padded
      if bos:   # every document is preceded by BOS, which is never a target
        assert (out["input_ids"][out["loss_mask"] == 1] != 1).all()
        assert (out["input_ids"] == 1).sum() >= len(docs)


def test_text_files_split_into_documents(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "b.txt").write_bytes(b"\xef\xbb\xbfg\r\n\r\nhi there\r\n")
  (tmp_path / "corpus" / "a.txt").write_text("a b\nc\n\n  \n\t\nd\n\n\ne f")
  (tmp_path / "corpus" / "notes.md").write_text("ignored")
  assert lm_text.read_documents(str(tmp_path / "corpus")) == ["a b\nc", "d", "e f", "g", "hi there"]
  (tmp_path / "latin.txt").write_bytes(b"ok\n\ncaf\xe9\n")
  with pytest.raises(ValueError, match=r"latin.txt:3: not UTF-8"):
    lm_text.read_documents(str(tmp_path / "latin.txt"))


def test_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text('{"prompt": "hi", "response": "there"}\n\n{"prompt": "what is two"}\n')
  with pytest.raises(ValueError, match=rf"{path}:3: no field\(s\) \['response'\] .*the row has \['prompt'\]"):
    lm_text.read_pairs(str(path), "prompt", "response")
  path.write_text('{"q": "hi", "a": "there"}\n{"q": "hi", "a": null}\n')
  with pytest.raises(ValueError, match=rf"{path}:2: field 'a' is NoneType None, not a string"):
    lm_text.read_pairs(str(path), "q", "a")
  path.write_text('{"prompt": "hi", "response": "there"}\n["x"]\n')
  with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
    lm_text.read_pairs(str(path), "prompt", "response")


def data_config(**fields) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({"name": "lm_text", "train_file": None, "eval_file": None, "max_length": 8,
                                   "prompt_field": "prompt", "response_field": "response", "test_fraction": 0.2,
                                   "split_seed": 0, "train_examples": None, "pad_to_multiple_of": 0})
  cfg.update(fields)
  return cfg


def test_load_splits_and_batches(tmp_path):
  tok = word_tokenizer(bos=False)
  text = tmp_path / "train.txt"
  docs = [" ".join(WORDS[2 + i % 10: 2 + i % 10 + 1 + i % 4]) for i in range(10)]
  text.write_text("\n\n".join(docs) + "\n")
  train, held = lm_text.load(data_config(train_file=str(text), test_fraction=0.3), tok)
  assert train.task == held.task == "causal_lm" and train.labels is None and train.name == "train/train"
  # The held-out documents (3 of 10) and the rest together hold every document's tokens exactly once.
  def documents(ds) -> list[str]:   # the target stream, split at each EOS
    out, words = [], []
    for token in ds.inputs["input_ids"][ds.inputs["loss_mask"] == 1].tolist():
      if token == ID["<eos>"]:
        out, words = out + [" ".join(words)], []
      else:
        words.append(WORDS[token])
    assert not words   # the stream ends with an EOS
    return out
  assert len(documents(held)) == 3 and sorted(documents(train) + documents(held)) == sorted(docs)
  batch = train.train_batch(0, 2, seed=0)
  assert set(batch) == {"input_ids", "attention_mask", "loss_mask"} and batch["input_ids"].shape == (2, 8)
  batches = list(held.eval_batches(4))
  assert all("label" not in b for b in batches) and sum(b["mask"].sum() for b in batches) == len(held)

  pairs = tmp_path / "sft.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": "what is", "response": "two " * i}) + "\n" for i in range(6)))
  train, held = lm_text.load(data_config(train_file=str(pairs), eval_file=str(pairs), max_length=12), tok)
  assert len(train) == len(held) == 6
  train.pad_to_multiple_of = 4
  batch = next(train.eval_batches(6))   # longest row: 2 + 5 + 1 = 8 tokens -> cut to 8 columns, loss_mask too
  assert {k: v.shape for k, v in batch.items() if k != "mask"} == {k: (6, 8) for k in ("input_ids", "attention_mask",
                                                                                        "loss_mask")}
  with pytest.raises(ValueError, match="config.data.eval_file is unset and config.data.test_fraction=0"):
    lm_text.load(data_config(train_file=str(pairs), test_fraction=0.0), tok)


def test_dataset_without_labels_is_only_for_causal_lm():
  inputs = {"input_ids": np.zeros((3, 4), np.int32)}
  assert len(ArrayDataset(inputs, None, [], "lm", task="causal_lm")) == 3
  with pytest.raises(ValueError, match="a classification dataset needs labels"):
    ArrayDataset(inputs, None, ["a"], "lm")
  with pytest.raises(ValueError, match="a causal_lm dataset has no labels"):
    ArrayDataset(inputs, np.zeros(3, np.int32), [], "lm", task="causal_lm")
  with pytest.raises(ValueError, match="2 rows of 'loss_mask' but 3 rows of 'input_ids'"):
    ArrayDataset({**inputs, "loss_mask": np.zeros((2, 4), np.int32)}, None, [], "lm", task="causal_lm")


# ---------------------------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------------------------

def numpy_token_loss(logits, input_ids, attention_mask, loss_mask):
  """(sum of -log p(token t | logits t-1) over target tokens, their count), one token at a time."""
  total, count = 0.0, 0
  for n in range(input_ids.shape[0]):
    for t in range(1, input_ids.shape[1]):
      if loss_mask[n, t] and attention_mask[n, t]:
        row = logits[n, t - 1].astype(np.float64)
        log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
        total -= log_probs[input_ids[n, t]]
        count += 1
  return total, count


def random_batch(rng, n=4, length=9, vocab=13):
  lengths = rng.integers(2, length + 1, n)
  attention_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = (rng.random((n, length)) < 0.6).astype(np.int32)   # some targets fall on padding: must not count
  input_ids = rng.integers(0, vocab, (n, length)).astype(np.int32)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def task_config(**fields):
  return ml_collections.ConfigDict({"label_smoothing": 0.0, "mixup": "auto", **fields})


def test_loss_equals_numpy_cross_entropy():
  rng = np.random.default_rng(0)
  batch = random_batch(rng)
  logits = (rng.standard_normal((4, 9, 13)) * 3).astype(np.float32)
  total, count = numpy_token_loss(logits, **batch)
  assert count >= 5
  got = float(CausalLM(task_config()).loss(logits, batch))
  np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-5)   # float32 vs float64 reference
  # Moving a target onto padding or into column 0 changes nothing; removing a real target changes the loss.
  padded = {**batch, "loss_mask": batch["loss_mask"] | (1 - batch["attention_mask"])}
  padded["loss_mask"][:, 0] = 1
  np.testing.assert_allclose(float(CausalLM(task_config()).loss(logits, padded)), got, rtol=1e-6)


def test_eval_over_padded_batches_equals_unpadded():
  rng = np.random.default_rng(1)
  vocab = 13
  table = (rng.standard_normal((vocab, vocab)) * 2).astype(np.float32)   # logits are a function of the token
  data = random_batch(rng, n=7, length=9, vocab=vocab)
  ds = ArrayDataset(data, None, [], "lm/eval", task="causal_lm", pad_to_multiple_of=4)
  task = CausalLM(task_config())
  sums = {}
  batches = list(ds.eval_batches(3))   # 3 + 3 + 1 real rows; the last batch holds 2 padding rows of row 0
  assert [int(b["mask"].sum()) for b in batches] == [3, 3, 1]
  for batch in batches:
    batch_sums, rows = task.eval_outputs(table[batch["input_ids"]], batch)
    assert rows == {}
    for k, v in batch_sums.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  total, count = numpy_token_loss(table[data["input_ids"]], **data)
  assert sums["tokens"] == count
  metrics = task.metrics(sums, {}, ds)
  np.testing.assert_allclose(metrics["eval/loss"], total / count, rtol=1e-5)
  np.testing.assert_allclose(metrics["eval/perplexity"], np.exp(total / count), rtol=1e-5)
  assert task.describe(ds) == f"next-token prediction, {int(data['loss_mask'].sum())} target tokens"


def test_task_refuses_fields_that_do_not_apply():
  ds = ArrayDataset({"input_ids": np.zeros((2, 3), np.int32), "loss_mask": np.ones((2, 3), np.int32)}, None, [],
                    "lm", task="causal_lm")
  CausalLM(task_config()).check(task_config(mixup=0.0), ds)
  with pytest.raises(ValueError, match=r"config.label_smoothing=0.1 .*set it to 0"):
    CausalLM(task_config()).check(task_config(label_smoothing=0.1), ds)
  with pytest.raises(ValueError, match=r"config.mixup=0.2 .*set it to 0"):
    CausalLM(task_config()).check(task_config(mixup=0.2), ds)
  assert (CausalLM.name, CausalLM.best_metric, CausalLM.best_mode) == ("causal_lm", "eval/loss", "min")


def test_task_trains_a_tiny_gpt2_through_the_trainer_steps():
  """The task inside train.make_steps (jit, grad, eval over padded batches) on a 1-layer GPT-2: the train loss of a
  repeating word pattern falls well below uniform guessing, and the eval metrics equal numpy on the model's logits."""
  import jax
  import optax
  from transfer import train
  from transfer.models import gpt2

  config = gpt2.GPT2Config.from_hf({"model_type": "gpt2", "vocab_size": len(WORDS), "n_embd": 32, "n_layer": 1,
                                    "n_head": 2, "n_positions": 16, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                    "attn_pdrop": 0.0})
  model = gpt2.causal_lm(config)
  docs = ["a b c d e f g"] * 12 + ["what is two four", "hi there"] * 3
  ds = ArrayDataset(lm_text.packed_rows(word_tokenizer(bos=False), docs, max_length=12), None, [], "lm",
                    task="causal_lm")
  task = CausalLM(task_config())
  example = ds.train_batch(0, 1, 0)
  params = jax.jit(lambda rng: model.init(rng, example, train=False))(jax.random.PRNGKey(0))["params"]
  tx = optax.adam(1e-2)
  state = {"step": np.int32(0), "trainable": params, "frozen": {}, "batch_stats": {}, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(1), "nonfinite_step": np.int32(0)}
  train_step, eval_step = train.make_steps(model, tx, optax.constant_schedule(1e-2), task, backbone_train=True)
  train_step, eval_step = jax.jit(train_step), jax.jit(eval_step)
  losses = []
  for step in range(40):
    state, logged = train_step(state, ds.train_batch(step, 4, seed=0))
    losses.append(float(logged["train/loss"]))
  assert losses[0] > 0.8 * np.log(len(WORDS)) and np.mean(losses[-5:]) < 0.5 * losses[0], losses

  sums = {}
  for batch in ds.eval_batches(3):
    for k, v in jax.device_get(eval_step(state, batch)[0]).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  metrics = task.metrics(sums, {}, ds)
  logits = np.asarray(model.apply({"params": state["trainable"]}, ds.inputs, train=False))
  total, count = numpy_token_loss(logits, **ds.inputs)
  assert sums["tokens"] == count == ds.inputs["loss_mask"].sum()
  np.testing.assert_allclose(metrics["eval/loss"], total / count, rtol=1e-5)   # float32 sums vs float64
  np.testing.assert_allclose(metrics["eval/perplexity"], np.exp(total / count), rtol=1e-5)


def test_build_checks_the_tokenizer_against_the_model(folders, tmp_path, monkeypatch):
  """data.build('lm_text'): the checkpoint folder's tokenizer, refused when its ids exceed the model's embedding rows
  or max_length exceeds the model's positions."""
  import types
  from transfer import data, models, pretrained
  model_config = types.SimpleNamespace(vocab_size=10_000, max_position_embeddings=16)
  monkeypatch.setattr(pretrained, "locate", lambda source, model=None: ("gpt2", source))
  monkeypatch.setattr(models, "backbone", lambda cfg: types.SimpleNamespace(config=model_config))
  text = tmp_path / "corpus.txt"
  docs = [c.rstrip("\n") for c in CORPUS[:8]]   # a document's final newline belongs to the separator
  text.write_text("\n\n".join(CORPUS[:8]))
  assert lm_text.read_documents(str(text)) == docs
  model_cfg = ml_collections.ConfigDict({"name": "gpt2", "pretrained": folders["gpt2"], "architecture": None})
  train_ds, eval_ds = data.build(data_config(train_file=str(text), test_fraction=0.25, max_length=16,
                                             pad_to_multiple_of=8), model_cfg)
  theirs = reference(folders["gpt2"])
  eos = theirs.eos_token_id
  targets = sorted(t for doc in docs for t in theirs(doc)["input_ids"] + [eos])   # documents and their EOS
  assert len(targets) > 4 * 16   # several rows
  got = [ds.inputs["input_ids"][ds.inputs["loss_mask"] == 1] for ds in (train_ds, eval_ds)]
  assert sorted(np.concatenate(got).tolist()) == targets
  assert train_ds.pad_to_multiple_of == eval_ds.pad_to_multiple_of == 8
  with pytest.raises(ValueError, match="config.data.max_length=32 is longer than the model's 16 positions"):
    data.build(data_config(train_file=str(text), max_length=32), model_cfg)
  model_config.vocab_size = 100
  with pytest.raises(ValueError, match=f"{folders['gpt2']}: the tokenizer has ids up to .* only 100 rows"):
    data.build(data_config(train_file=str(text), max_length=16), model_cfg)
