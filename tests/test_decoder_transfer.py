"""Decoders through the trainer: classification from the last token, causal-LM fine-tuning, the family registry.

The checkpoints are Hugging Face folders written here: a byte-level BPE tokenizer trained on the test's own text
and a random-weight ``transformers`` model (GPT-2 or Llama) of that vocabulary, saved with ``save_pretrained``.
"""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import decoders, models as tok_models, pre_tokenizers, processors, trainers  # noqa: E402

from conftest import restore_checkpoint, shared_data  # noqa: E402
from transfer import config_base, load_pretrained, models, pretrained, rules, train  # noqa: E402

EOS = "<|endoftext|>"


def decoder_folder(folder, corpus, *, family="gpt2", vocab=400, layers=2, width=64, heads=4, positions=128,
                   seed=0) -> str:
  """A Hugging Face folder: a byte-level BPE trained on ``corpus`` and a random ``transformers`` model of it."""
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  eos, size = tok.token_to_id(EOS), tok.get_vocab_size()
  torch.manual_seed(seed)
  if family == "gpt2":
    config = transformers.GPT2Config(vocab_size=size, n_positions=positions, n_embd=width, n_layer=layers,
                                     n_head=heads, bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads // 2, max_position_embeddings=positions,
                                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(folder)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": EOS, "bos_token": EOS, "model_max_length": positions}, f)
  return str(folder)


def sentiment_rows(rng, n, subjects):
  words = {"wonderful": "pos", "great": "pos", "lovely": "pos", "awful": "neg", "dull": "neg", "terrible": "neg"}
  out = []
  for _ in range(n):
    word = rng.choice(list(words))
    out.append((f"{rng.choice(subjects)} was {word} indeed", words[word]))
  return out


def write_tsv(path, rows):
  with open(path, "w") as f:
    f.write("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows))
  return str(path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_classifies_held_out_text_from_its_last_token(tmp_path, family):
  """A decoder under a new head, pooled at the last non-padding token, on the same text_files data as BERT: the
  held-out sentences (other subjects than training's) are classified, the checkpoint's LM head is not part of the
  classifier, and the family comes from config.json's model_type."""
  rng = np.random.default_rng(0)
  train_rows = sentiment_rows(rng, 192, ["the film", "this book", "our dinner", "the show"])
  eval_rows = sentiment_rows(rng, 96, ["that song", "the trip", "my week"])
  folder = decoder_folder(tmp_path / "ckpt", [s for s, _ in train_rows + eval_rows], family=family)
  assert pretrained.locate(folder)[0] == family
  c = config_base.base()
  c.model.name, c.model.pretrained, c.model.pooling, c.model.dropout = family, folder, "last", 0.0
  c.data.name, c.data.max_length = "text_files", 16
  c.data.train_file, c.data.eval_file = write_tsv(tmp_path / "train.tsv", train_rows), write_tsv(
      tmp_path / "dev.tsv", eval_rows)
  c.batch_size, c.eval_batch_size, c.total_steps, c.log_every = 16, 32, 60, 20
  c.schedule.lr, c.schedule.warmup_steps = 3e-3, 5
  c.param_rules = [("head/.*", dict(load=False)), (".*", {})]
  c.checkpoint.every_steps = 0
  results = train.train(c, str(tmp_path / "run"))
  # Chance is 0.5; the words that decide the label are shared, the subjects are not.
  assert results["eval/accuracy"] >= 0.9, results
  saved = rules.flatten(restore_checkpoint(tmp_path / "run")["trainable"])
  assert "head/kernel" in saved and not any(k.startswith("lm_head") for k in saved)
  assert saved["head/kernel"].shape == (64, 2)


def test_load_pretrained_gives_a_language_model(tmp_path):
  """``load_pretrained(folder)`` of a decoder: ``apply(variables, {input_ids, attention_mask})`` -> next-token
  logits (N, L, vocab), equal to the transformers model's (float32, 1e-4 max-abs relative to scale)."""
  folder = decoder_folder(tmp_path / "ckpt", ["a small corpus of words", "more words here"], vocab=300)
  module, variables = load_pretrained(folder)
  ids = np.array([[5, 9, 17, 33, 2]], np.int32)
  logits = np.asarray(module.apply(variables, {"input_ids": ids, "attention_mask": np.ones_like(ids)}))
  ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
  with torch.no_grad():
    expected = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert logits.shape == (1, 5, ref.config.vocab_size)
  assert np.abs(logits - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
  with pytest.raises(ValueError, match=r"config.task='causal_lm'\) needs a decoder; config.model.name='bert'"):
    models.build_lm(_named("bert"))


def _named(name):
  cfg = config_base.base().model
  cfg.name = name
  return cfg


def _sentences(path, limit=None):
  with open(path) as f:
    next(f)
    rows = [line.split("\t")[0].strip() for line in f if line.strip()]
  return rows[:limit] if limit else rows


SST2 = shared_data("sst2")


@pytest.mark.skipif(SST2 is None, reason="needs ../shared/data/sst2 (real text)")
def test_causal_lm_fine_tuning_lowers_held_out_perplexity_on_real_text(tmp_path):
  """Next-token training on SST-2's training sentences (labels dropped), evaluated on the dev sentences, which are
  never trained on: the held-out perplexity falls well below the untrained model's."""
  train_text = _sentences(os.path.join(SST2, "train.tsv"), 3000)
  dev_text = _sentences(os.path.join(SST2, "dev.tsv"))
  (tmp_path / "train.txt").write_text("\n\n".join(train_text) + "\n")
  (tmp_path / "dev.txt").write_text("\n\n".join(dev_text) + "\n")
  folder = decoder_folder(tmp_path / "ckpt", train_text, vocab=600)

  def run(name, steps, lr):
    c = config_base.base()
    c.model.name, c.model.pretrained, c.model.dropout = "gpt2", folder, 0.0
    c.data.name, c.data.max_length = "lm_text", 64
    c.data.train_file, c.data.eval_file = str(tmp_path / "train.txt"), str(tmp_path / "dev.txt")
    c.batch_size, c.eval_batch_size, c.total_steps, c.log_every = 16, 64, steps, 20
    c.schedule.lr, c.schedule.warmup_steps = lr, 0
    c.checkpoint.every_steps = 0
    return train.train(c, str(tmp_path / name))

  before = run("untrained", 1, 0.0)
  after = run("trained", 80, 3e-3)
  assert before["eval/perplexity"] == pytest.approx(np.exp(before["eval/loss"]), rel=1e-5)
  # A random 600-token model starts near uniform (perplexity ~600); 80 steps on real text must halve it at least.
  assert before["eval/perplexity"] > 300, before
  assert after["eval/perplexity"] < 0.5 * before["eval/perplexity"], (before, after)
