"""Export of decoders to Hugging Face folders (``transfer.hf_export.save_decoder``).

References are random-weight ``transformers`` models (norm scales and biases randomised too: tests/decoder_refs.py)
of three layouts: GPT-2 (LM head tied to the token embedding), Llama with every bias and an untied head, Qwen2
(q/k/v biases, tied head). Each is saved with ``save_pretrained``, read with ``load_pretrained`` and written back
with ``save_decoder``. Tolerances: the round trip is lossless (float32 copies and transposes), so arrays must be
equal and transformers' logits on the export equal the original's to 1e-5 max-abs; logits of our Flax module
against transformers on changed weights: 1e-4 times the logits' scale when above 1 (``decoder_refs.TOL``).
"""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from decoder_refs import TOL, randomize  # noqa: E402
from test_decoder_transfer import decoder_folder  # noqa: E402
from transfer import hf_export, load_pretrained, rules  # noqa: E402

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song at dawn"] * 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A folder with a byte-level BPE tokenizer (and a GPT-2 whose weights are not used here)."""
  return decoder_folder(tmp_path_factory.mktemp("tok"), CORPUS, vocab=120)


def _vocab(tokenizer_dir):
  with open(os.path.join(tokenizer_dir, "config.json")) as f:
    return json.load(f)["vocab_size"]


def _reference(kind, vocab):
  torch.manual_seed(0)
  if kind == "gpt2":
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2, bos_token_id=0,
                  eos_token_id=0)
    if kind == "llama":
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          **common, tie_word_embeddings=False, attention_bias=True, mlp_bias=True))
    else:
      model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
  model.config._attn_implementation = "eager"
  return randomize(model)


def _save_reference(ref, folder, tokenizer_dir):
  ref.save_pretrained(folder)
  for name in TOKENIZER_FILES:
    with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
      dst.write(src.read())
  return str(folder)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _read_config(folder):
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


IDS = np.array([[3, 17, 42, 8, 99, 5, 61], [7, 7, 30, 2, 11, 90, 1]])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_export_round_trips_through_transformers(tmp_path, tokenizer_dir, kind):
  """save_pretrained -> load_pretrained -> save_decoder: transformers reads the export as the original model (same
  class, same tensors under the same keys, a tied head not stored, logits to 1e-5), load_pretrained reads it back
  identically, and the tokenizer files come along. Then changed weights (a stand-in for fine-tuning) are what the
  export holds: transformers' logits on it match our module's on the changed variables."""
  ref = _reference(kind, _vocab(tokenizer_dir))
  src = _save_reference(ref, tmp_path / "src", tokenizer_dir)
  module, variables = load_pretrained(src)
  flat = rules.flatten(variables["params"])
  out = hf_export.save_decoder(tmp_path / "out", flat, _read_config(src), tokenizer_folder=src)

  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back) is type(ref)
  diff = np.abs(_hf_logits(back, IDS) - _hf_logits(ref, IDS)).max()
  assert diff <= 1e-5, diff
  written = load_file(os.path.join(out, "model.safetensors"))
  original = load_file(os.path.join(src, "model.safetensors"))
  assert sorted(written) == sorted(original)   # tied: no lm_head.weight in either
  assert ("lm_head.weight" in written) == (kind == "llama")
  for key in original:
    np.testing.assert_array_equal(written[key], original[key], err_msg=key)
  config = _read_config(out)
  assert config["architectures"] == _read_config(src)["architectures"] and config["dtype"] == "float32"
  for name in (*TOKENIZER_FILES, "generation_config.json"):
    with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name
  _, again = load_pretrained(out)
  assert rules.flatten(again).keys() == rules.flatten(variables).keys()
  for key, value in rules.flatten(variables).items():
    np.testing.assert_array_equal(np.asarray(rules.flatten(again)[key]), np.asarray(value), err_msg=key)

  rng = np.random.default_rng(1)
  changed = {k: np.asarray(v) * rng.uniform(0.5, 1.5, np.shape(v)).astype(np.float32) for k, v in flat.items()}
  out2 = hf_export.save_decoder(tmp_path / "changed", changed, _read_config(src), tokenizer_folder=src)
  _, reread = load_pretrained(out2)
  for key, value in changed.items():
    np.testing.assert_array_equal(np.asarray(rules.flatten(reread["params"])[key]), value, err_msg=key)
  expected = np.asarray(module.apply({"params": rules.unflatten(changed)},
                                     {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}))
  got = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out2).eval(), IDS)
  assert np.abs(got - expected).max() < TOL * max(1.0, np.abs(expected).max())
  assert np.abs(got - _hf_logits(ref, IDS)).max() > 0.1   # the change is visible: not the source's weights


def test_export_refusals(tmp_path, tokenizer_dir):
  """A non-empty folder without overwrite, parameters that do not fit config.json (each listed by path, nothing
  written), an encoder's config and a tokenizer larger than the vocabulary are refused; overwrite replaces the files
  and removes older weight files that a loader could read instead."""
  src = _save_reference(_reference("gpt2", _vocab(tokenizer_dir)), tmp_path / "src", tokenizer_dir)
  _, variables = load_pretrained(src)
  flat, config = rules.flatten(variables["params"]), _read_config(src)

  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "pytorch_model.bin").write_bytes(b"stale")
  with pytest.raises(FileExistsError, match=r"busy is not empty \(pytorch_model.bin\).*overwrite"):
    hf_export.save_decoder(busy, flat, config)
  hf_export.save_decoder(busy, flat, config, overwrite=True)
  assert sorted(os.listdir(busy)) == ["config.json", "model.safetensors"]

  bad = {k: v for k, v in flat.items() if k != "backbone/h_1/c_fc/kernel"}
  bad["head/kernel"] = np.zeros((32, 2), np.float32)
  bad["backbone/wpe/embedding"] = np.zeros((16, 32), np.float32)
  with pytest.raises(ValueError, match=r"missing backbone/h_1/c_fc/kernel; unexpected head/kernel; mis-shaped "
                                       r"backbone/wpe/embedding \(16, 32\) \(model: \(32, 32\)\)"):
    hf_export.save_decoder(tmp_path / "bad", bad, config)
  with pytest.raises(ValueError, match=r"unexpected lm_head/kernel"):   # the config ties the head
    hf_export.save_decoder(tmp_path / "bad", {**flat, "lm_head/kernel": np.zeros((32, config["vocab_size"]))},
                           config)
  assert not os.path.exists(tmp_path / "bad")
  assert not [n for n in os.listdir(tmp_path) if ".export-" in n]   # no staging directory left behind

  with pytest.raises(ValueError, match=r"model_type 'bert' is the bert family, not a decoder; export writes"):
    hf_export.save_decoder(tmp_path / "enc", flat, {"model_type": "bert"})
  small = {**config, "vocab_size": config["vocab_size"] - 10}
  trimmed = {**flat, "backbone/wte/embedding": flat["backbone/wte/embedding"][:-10]}
  with pytest.raises(ValueError, match=r"the tokenizer has ids up to \d+ but the model's embedding table has only"):
    hf_export.save_decoder(tmp_path / "small", trimmed, small, tokenizer_folder=src)
  hf_export.save_decoder(tmp_path / "small", trimmed, small)   # without a tokenizer the same weights are fine
