"""``python -m transfer.export``: each format loaded by the real library predicts what ``transfer.predict`` predicts.

Runs: all-MiniLM-L6-v2 with LoRA (rank 4 on query and value) and a new head on synthetic sentiment, pooled by
BERT's pooler ('cls', the pooling transformers' classifier has); EfficientNet-Lite0 (pretrained) with LoRA on its
1x1 convolutions on 32 px digits. Tolerance: probabilities within 1e-4 max-abs (float32 in two implementations).
The causal-LM formats (hf, peft with GPT-2's fan_in_fan_out) are tested in test_lora.py's LoRA language-model run.
"""
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from test_text_transfer import _sentiment_files, _text_config
from transfer import export, predict, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PROB_TOL = 1e-4


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("text")
  train_file, held_out_file = _sentiment_files(base)
  config = _text_config(train_file, held_out_file, max_length=16)
  config.model.pooling, config.total_steps, config.schedule.lr = "cls", 12, 5e-3
  config.param_rules = [("head/.*", dict(load=False)),
                        ("backbone/.*/(query|value)/kernel", dict(lora=dict(rank=4, alpha=8))),
                        (".*", dict(freeze=True))]
  workdir = str(base / "run")
  results = train.train(config, workdir)
  return workdir, held_out_file, results


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("image") / "run")
  rules = [("head/.*", dict(load=False)), ("backbone/.*(expand|project)_conv/kernel", dict(lora=dict(rank=4, alpha=8))),
           (".*", dict(freeze=True))]
  train.train(tiny_config(total_steps=6, param_rules=rules, **{"model.depth": None,
                                                                 "model.pretrained": "efficientnet-lite0"}), workdir)
  return workdir


def _texts(held_out_file, n=24):
  return [line.split("\t")[0] for line in open(held_out_file).read().splitlines()[1:n + 1]]


def _ours(workdir, inputs):
  rows = predict.predict(workdir, inputs)
  names = list(rows[0]["probabilities"])
  return np.array([[row["probabilities"][n] for n in names] for row in rows]), names


def _their_text_probs(model, tokenizer_folder, texts):
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
  enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
  with torch.no_grad():
    return torch.softmax(model.eval()(**enc).logits, -1).numpy()


def test_hf_export_of_a_lora_text_classifier_loads_in_transformers(text_run, tmp_path):
  workdir, held_out_file, results = text_run
  assert results["eval/accuracy"] >= 0.8, results   # the adapters and head learnt the task
  texts = _texts(held_out_file)
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  ours, names = _ours(workdir, [str(tmp_path / "in.txt")])
  out = str(tmp_path / "hf")
  assert export.main(["--workdir", workdir, "--out", out, "--format", "hf"]) == 0
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert [model.config.id2label[i] for i in range(2)] == names == ["0", "1"]
  theirs = _their_text_probs(model, out, texts)   # the tokenizer files travel with the export
  assert np.abs(theirs - ours).max() < PROB_TOL
  assert np.abs(ours[:, 1] - 0.5).max() > 0.1   # confident rows: the comparison is not between uniform outputs


def test_peft_export_puts_the_adapters_and_head_on_the_transformers_base(text_run, tmp_path):
  peft = pytest.importorskip("peft")
  from transfer import pretrained
  workdir, held_out_file, _ = text_run
  texts = _texts(held_out_file)
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  ours, _ = _ours(workdir, [str(tmp_path / "in.txt")])
  out = str(tmp_path / "peft")
  assert export.main(["--workdir", workdir, "--out", out, "--format", "peft"]) == 0
  adapter_config = json.load(open(os.path.join(out, "adapter_config.json")))
  assert len(adapter_config["target_modules"]) == 12 and adapter_config["modules_to_save"] == ["classifier"]
  assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["fan_in_fan_out"]) == (4, 8, False)
  source = pretrained.locate("all-minilm-l6-v2")[1]
  base = transformers.AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
  model = peft.PeftModel.from_pretrained(base, out)
  theirs = _their_text_probs(model, source, texts)
  assert np.abs(theirs - ours).max() < PROB_TOL
  plain = _their_text_probs(transformers.AutoModelForSequenceClassification.from_pretrained(source, num_labels=2),
                            source, texts)
  assert np.abs(plain - ours).max() > 0.05   # without the adapter file the base alone predicts otherwise


@pytest.mark.long   # its training-run fixture takes a minute
def test_timm_export_of_a_lora_efficientnet_loads_strictly(image_run, tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.torch import load_file
  from transfer import runs
  workdir = image_run
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "in.npz", image=rng.integers(0, 256, (6, 40, 36, 3), dtype=np.uint8))
  ours, names = _ours(workdir, [str(tmp_path / "in.npz")])
  out = str(tmp_path / "timm")
  assert export.main(["--workdir", workdir, "--out", out, "--format", "timm"]) == 0
  meta = json.load(open(os.path.join(out, "config.json")))
  assert meta["architecture"] == "tf_efficientnet_lite0" and meta["label_names"] == names
  strict = timm.create_model(meta["architecture"], pretrained=False, num_classes=10, **meta["model_args"])
  strict.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
  by_folder = timm.create_model(f"local-dir:{out}", pretrained=True)
  config = runs.read_config(workdir)
  crops = np.stack([pixels for _, pixels in predict.read_images([str(tmp_path / "in.npz")], config.data)])
  mean, std = (np.array(meta["pretrained_cfg"][k], np.float32) * 255 for k in ("mean", "std"))
  x = torch.tensor(((crops - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
  for model in (strict, by_folder):
    with torch.no_grad():
      theirs = torch.softmax(model.eval()(x), -1).numpy()
    assert np.abs(theirs - ours).max() < PROB_TOL


@pytest.mark.long   # needs the image run too, whose fixture takes a minute
def test_formats_a_run_does_not_have_are_refused_with_the_ones_it_has(text_run, image_run, tmp_path, capsys):
  text_workdir, _, _ = text_run
  assert export.main(["--workdir", text_workdir, "--out", str(tmp_path / "a"), "--format", "timm"]) == 1
  assert "--format timm: the bert family is not a timm model" in capsys.readouterr().err
  assert export.main(["--workdir", image_run, "--out", str(tmp_path / "b"), "--format", "hf"]) == 1
  err = capsys.readouterr().err
  assert "no transformers sequence-classification export" in err
  assert "formats for this run: timm\n" in err   # peft too needs a transformers model to put the adapters on
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "notes.txt").write_text("mine")
  assert export.main(["--workdir", image_run, "--out", str(tmp_path / "full"), "--format", "timm"]) == 1
  assert "is not empty (notes.txt)" in capsys.readouterr().err
  assert export.main(["--workdir", image_run, "--out", str(tmp_path / "full"), "--format", "timm",
                      "--overwrite"]) == 0
  assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "model.safetensors", "notes.txt"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no staging folder left behind
