"""``python -m transfer.generate``: prompts continued by a decoder folder or by a causal-LM training run.

The folder is a byte-level BPE trained on the test's text and a random-weight ``transformers`` GPT-2 (norm scales
and biases randomised, initializer_range 0.2: tests/decoder_refs.py), so logits are spread. Greedy continuations
are compared with transformers' ``generate(do_sample=False)`` on the same folder as decoded text; that comparison
is only meaningful without near-ties, so every compared step's top-2 logit gap in transformers must exceed 1e-3
(the two implementations agree to about 1e-5). One trainer run (2 steps of next-token training on a small .txt)
gives the workdir; its checkpoints also test ``transfer.runs``' reading and ``transfer.export`` of a run.
"""
import ast
import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from conftest import ROOT, restore_checkpoint  # noqa: E402
from decoder_refs import randomize  # noqa: E402
from test_decoder_transfer import decoder_folder  # noqa: E402
from transfer import config_base, export, hf_export, rules, runs, train  # noqa: E402
from transfer import generate as generate_cli  # noqa: E402
from transfer.text.causal_tokenizer import CausalTokenizer  # noqa: E402

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song at dawn",
          "my friend read a book by the sea"] * 4
PROMPTS = ["the cat sat", "a dog ran in the park by the sea"]   # different lengths: a left-padded batch
# For the trained run: prompts whose greedy steps have no near-tie (see the module docstring).
RUN_PROMPTS = ["the bird", "my friend read", "a dog"]
POSITIONS = 48
NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A GPT-2 folder: tokenizer from ``decoder_folder``, weights replaced by a randomised model of its vocabulary."""
  path = decoder_folder(tmp_path_factory.mktemp("gpt2"), CORPUS, vocab=320, positions=POSITIONS)
  config = transformers.AutoConfig.from_pretrained(path)
  config.initializer_range, config.resid_pdrop, config.embd_pdrop, config.attn_pdrop = 0.2, 0.0, 0.0, 0.0
  torch.manual_seed(0)
  randomize(transformers.GPT2LMHeadModel(config), seed=0).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def workdir(folder, tmp_path_factory):
  """A causal-LM run of 2 steps from ``folder`` on the corpus as plain text: checkpoints and validation at both
  steps."""
  base = tmp_path_factory.mktemp("run")
  (base / "train.txt").write_text("\n\n".join(CORPUS) + "\n")
  c = config_base.base()
  c.model.name, c.model.pretrained, c.model.dropout = "gpt2", folder, 0.0
  c.data.name, c.data.max_length, c.data.test_fraction, c.data.val_fraction = "lm_text", 16, 0.25, 0.25
  c.data.train_file = str(base / "train.txt")
  c.batch_size, c.eval_batch_size, c.total_steps, c.log_every, c.eval_every = 4, 8, 2, 1, 1
  c.schedule.lr, c.schedule.warmup_steps = 1e-2, 0
  c.checkpoint.every_steps = 1
  train.train(c, str(base / "wd"))
  return str(base / "wd")


def _run(capsys, *args):
  """``main(args)`` -> (exit code, stdout, stderr)."""
  code = generate_cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def _continuations(out, n):
  lines = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines() if "] " in line}
  return [ast.literal_eval(lines[f"[{i}] continuation"]) for i in range(1, n + 1)]   # printed as Python string literals


def _hf_greedy_texts(model_folder, prompts, new_tokens):
  """transformers' greedy continuation of each prompt alone (no padding), decoded up to EOS; and the smallest top-2
  logit gap over the steps it generated."""
  model = transformers.AutoModelForCausalLM.from_pretrained(model_folder).eval()
  tok = transformers.AutoTokenizer.from_pretrained(model_folder)
  eos = model.config.eos_token_id
  texts, gap = [], np.inf
  for prompt in prompts:
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
      result = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                              eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    new = result.sequences[0, ids.shape[1]:].tolist()
    end = new.index(eos) if eos in new else len(new)
    for scores in result.scores[:end + 1]:
      top2 = torch.topk(scores[0], 2).values
      gap = min(gap, float(top2[0] - top2[1]))
    texts.append(tok.decode(new[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False))
  return texts, gap


def test_greedy_continuations_equal_transformers(folder, capsys):
  """``--model FOLDER`` with two prompts of different lengths (one left-padded batch): each printed continuation is
  transformers' greedy continuation of that prompt alone, as text."""
  code, out, err = _run(capsys, "--model", folder, *[x for p in PROMPTS for x in ("--prompt", p)],
                        "--max_new_tokens", NEW)
  assert code == 0, err
  expected, gap = _hf_greedy_texts(folder, PROMPTS, NEW)
  assert gap > 1e-3, f"near-tie in the reference (top-2 gap {gap:.2e}): the comparison would be meaningless"
  assert _continuations(out, 2) == expected
  assert all(expected), expected   # something was generated for each prompt
  assert f"[1] prompt: {PROMPTS[0]!r}" in out and "greedy" in out


def test_workdir_generation_and_export_use_the_trained_weights(folder, workdir, tmp_path, capsys):
  """``--workdir`` generates with the run's last checkpoint (trained weights, not the pretrained folder's), and
  ``python -m transfer.export --format hf`` writes those weights: transformers' greedy text on the export equals the CLI's."""
  trained = restore_checkpoint(workdir)["trainable"]["backbone"]["wte"]["embedding"]
  pretrained = load_file(os.path.join(folder, "model.safetensors"))["transformer.wte.weight"]
  assert np.abs(trained - pretrained).max() > 1e-3   # two steps at lr 1e-2 moved them

  code, out, err = _run(capsys, "--workdir", workdir, *[x for p in RUN_PROMPTS for x in ("--prompt", p)],
                        "--max_new_tokens", NEW)
  assert code == 0, err
  assert f"{workdir} step 2 (gpt2)" in out

  exported = str(tmp_path / "export")
  assert export.main(["--workdir", workdir, "--out", exported, "--format", "hf"]) == 0
  np.testing.assert_array_equal(load_file(os.path.join(exported, "model.safetensors"))["transformer.wte.weight"],
                                trained)
  expected, gap = _hf_greedy_texts(exported, RUN_PROMPTS, NEW)
  assert gap > 1e-3, f"near-tie in the reference (top-2 gap {gap:.2e})"
  assert _continuations(out, 3) == expected
  assert export.main(["--workdir", workdir, "--out", exported, "--format", "hf"]) == 1   # not empty: refused
  assert "is not empty" in capsys.readouterr().err


def test_predict_continues_prompt_files_as_transformers_does_on_the_export(workdir, tmp_path):
  """``python -m transfer.predict`` on a causal-LM run: prompts from a .txt (one per line) and a .jsonl (the run's
  prompt field) give one row each, whose continuation is transformers' greedy text on the run's export."""
  from transfer import predict
  (tmp_path / "prompts.txt").write_text("\n".join(RUN_PROMPTS[:2]) + "\n\n")
  (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": RUN_PROMPTS[2], "response": "unused"}) + "\n")
  out = tmp_path / "continuations.jsonl"
  assert predict.main(["--workdir", workdir, "--data", str(tmp_path / "prompts.txt"), str(tmp_path / "prompts.jsonl"),
                       "--max_new_tokens", str(NEW), "--batch_size", "2", "--out", str(out)]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["input"] for r in rows] == RUN_PROMPTS
  exported = str(tmp_path / "export")
  hf_export.export_workdir(workdir, exported)
  expected, gap = _hf_greedy_texts(exported, RUN_PROMPTS, NEW)
  assert gap > 1e-3, f"near-tie in the reference (top-2 gap {gap:.2e})"
  assert [r["continuation"] for r in rows] == expected


def _rewrite_metrics(path, losses):
  rows = [json.loads(line) for line in open(path) if line.strip()]
  with open(path, "w") as f:
    for row in rows:
      if row["step"] in losses:
        row["val/loss"] = losses[row["step"]]
      f.write(json.dumps(row) + "\n")


def test_checkpoint_choice(workdir, tmp_path):
  """'last' is the newest step, 'best' the saved step with the lowest val/loss in metrics.jsonl (the causal-LM
  task's best metric, on the validation split), a number that step; the params are that checkpoint's, trainable
  and frozen merged, and a checkpoint whose arrays do not match the trainer's digests is refused."""
  rows = map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
  losses = {row["step"]: row["val/loss"] for row in rows}
  assert runs.checkpoint_step(workdir, "last") == 2
  assert runs.checkpoint_step(workdir, "best") == min(losses, key=losses.get)

  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  _rewrite_metrics(os.path.join(copy, "metrics.jsonl"), {1: 1.0, 2: 3.0})
  assert runs.checkpoint_step(copy, "best") == 1
  _rewrite_metrics(os.path.join(copy, "metrics.jsonl"), {1: 3.0, 2: 1.0})
  assert runs.checkpoint_step(copy, "best") == 2
  config, flat, _, _ = runs.variables_from_workdir(copy, 1)
  assert config.model.name == "gpt2"
  step1, step2 = (rules.flatten(restore_checkpoint(copy, step)["trainable"]) for step in (1, 2))
  assert flat.keys() == step1.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], step1[key], err_msg=key)
  assert any(not np.array_equal(step1[k], step2[k]) for k in step1)   # step 1 is not step 2

  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7; saved steps: \[1, 2\]"):
    runs.checkpoint_step(copy, 7)
  with pytest.raises(ValueError, match=r"--checkpoint 'newest': use 'last', 'best' or a step number"):
    runs.checkpoint_step(copy, "newest")
  meta_path = os.path.join(copy, "checkpoints", "2", "_CHECKPOINT_METADATA")
  meta = json.load(open(meta_path))
  meta["custom_metadata"]["array_sha256"]["trainable/backbone/ln_f/scale"] = "0" * 64
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match=r"step 2 is damaged: 1 arrays read back different .*ln_f/scale"):
    runs.variables_from_workdir(copy, "last")


def test_prompt_encoding(folder):
  """Prompts are left-padded with the tokenizer's pad id; a prompt over the limit is refused with its count, or
  with ``truncate`` keeps its last tokens (and the count is printed); an empty prompt starts from EOS."""
  tok = CausalTokenizer.from_folder(folder)
  long_text, short_text = "the bird sang a song at dawn by the sea", "the cat"
  full_long, full_short = tok.tokens([long_text, short_text])
  limit = len(full_long) - 3
  with pytest.raises(ValueError, match=rf"1 of 3 prompts do not fit: at most {limit} tokens .*\(prompt 1: "
                                       rf"{len(full_long)} tokens\).*--truncate"):
    generate_cli.encode_prompts(tok, [long_text, short_text, ""], limit=limit, truncate=False)
  notes = []
  ids, mask = generate_cli.encode_prompts(tok, [long_text, short_text, ""], limit=limit, truncate=True,
                                          log=notes.append)
  assert notes == [f"note: 1 of 3 prompts cut to their last {limit} tokens to fit the context (prompt 1: "
                   f"{len(full_long)} tokens)"]
  assert ids.shape == mask.shape == (3, limit)
  assert ids[0].tolist() == full_long[-limit:] and mask[0].all()
  assert ids[1, -len(full_short):].tolist() == full_short
  assert mask[1].tolist() == [0] * (limit - len(full_short)) + [1] * len(full_short)
  assert (ids[1, :limit - len(full_short)] == tok.pad_id).all()
  assert mask[2].tolist() == [0] * (limit - 1) + [1] and ids[2, -1] == tok.eos_id


def test_command_line_errors(folder, workdir, tmp_path, capsys):
  """Each refusal names what is wrong: a classification run, an encoder checkpoint, --checkpoint with --model (a
  command-line error, exit 2), a prompt too long for the context (with --truncate it runs), no room for a prompt,
  a workdir without checkpoints."""
  classifier = tmp_path / "classifier"
  classifier.mkdir()
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["data"]["name"], config["task"] = "text_files", "classification"   # the trainer records the task it ran
  (classifier / "config.json").write_text(json.dumps(config))
  code, _, err = _run(capsys, "--workdir", classifier, "--prompt", "the")
  assert code == 1 and "is a classification run (config.json: task='classification', data.name='text_files'" in err, err

  encoder = tmp_path / "bert"
  encoder.mkdir()
  (encoder / "config.json").write_text(json.dumps({"model_type": "bert"}))
  code, _, err = _run(capsys, "--model", encoder, "--prompt", "the")
  assert code == 1 and "holds a bert model, an encoder: generation needs a decoder (gpt2, llama)" in err, err

  code, _, err = _run(capsys, "--model", folder, "--checkpoint", "best", "--prompt", "the")
  assert code == 2 and "--checkpoint picks a checkpoint of --workdir" in err, err

  long_prompt = " ".join(CORPUS)
  code, _, err = _run(capsys, "--model", folder, "--prompt", long_prompt, "--max_new_tokens", 24)
  assert code == 1 and f"at most {POSITIONS - 24} tokens fit" in err, err
  code, out, err = _run(capsys, "--model", folder, "--prompt", long_prompt, "--max_new_tokens", 24, "--truncate")
  assert code == 0 and f"cut to their last {POSITIONS - 24} tokens" in out, err
  code, _, err = _run(capsys, "--model", folder, "--prompt", "the", "--max_new_tokens", POSITIONS)
  assert code == 1 and f"leave room for a prompt in the model's context of {POSITIONS} positions" in err, err

  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  code, _, err = _run(capsys, "--workdir", empty, "--prompt", "the")
  assert code == 1 and "no checkpoint in" in err, err


def test_module_entry_point(tmp_path):
  """``python -m transfer.generate`` in a fresh process: a refusal is one line on stderr and exit code 1."""
  encoder = tmp_path / "bert"
  encoder.mkdir()
  (encoder / "config.json").write_text(json.dumps({"model_type": "bert"}))
  result = subprocess.run([sys.executable, "-m", "transfer.generate", "--model", str(encoder), "--prompt", "x"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: --model ")
