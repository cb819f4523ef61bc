"""``python -m transfer.predict``: a finished run's predictions on new inputs.

The check that predictions are the run's own model, prepared as the run's evaluation prepared its inputs: predicting
every evaluation example gives back the trainer's eval accuracy exactly and its eval loss (the mean negative log
probability of the true class) to 1e-5, for a full fine-tune, a LoRA run (adapters merged, base rebuilt) and a run
on cached features (the head re-attached to the rebuilt backbone). Runs are trained for 24 steps, after which each
row's probabilities differ from the others' by far more than the tolerance, so a wrong backbone or a missing
adapter would show.
"""
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from test_text_transfer import _sentiment_files, _text_config
from transfer import predict, runs, train
from transfer.data import digits

LOSS_TOL = 1e-5   # float32 logits, summed over 360 rows in another order than the trainer's
# Learning rates: 5e-3 for full fine-tuning (at 0.05 a BatchNorm network's statistics diverge); the LoRA and cached
# runs' backbone stays in inference mode.
LR = {"full": 5e-3, "lora": 0.05, "cached": 0.05}
RULES = {
    "full": [("head/.*", {}), ("backbone/.*", dict(lr_mult=0.5))],
    "lora": [("head/.*", {}), ("backbone/.*(query|value)/kernel", dict(lora=dict(rank=4, alpha=8))),
             (".*", dict(freeze=True))],
    "cached": [("head/.*", {}), (".*", dict(freeze=True))],
}


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory):
  """The tiny runs' evaluation images (digits at 32 px, the held-out 20%) and labels, as an .npz file."""
  c = tiny_config()
  _, evaluation = digits.load(resolution=32, per_class=c.data.train_per_class, test_fraction=c.data.test_fraction,
                              split_seed=c.data.split_seed)
  path = str(tmp_path_factory.mktemp("inputs") / "eval.npz")
  np.savez(path, image=evaluation.inputs["image"], label=evaluation.labels)
  return path


# The full and LoRA runs on the test ViT (its train step compiles in a quarter of the time); the cached run on the
# tiny EfficientNet, whose rebuilt base includes BatchNorm statistics.
MODEL = {"full": {"model.name": "vit-test8", "model.depth": None}, "lora": {"model.name": "vit-test8",
                                                                         "model.depth": None}, "cached": {}}


@pytest.fixture(scope="module", params=list(RULES))
def image_run(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(request.param) / "run")
  results = train.train(tiny_config(total_steps=24, param_rules=RULES[request.param],
                                    **{"schedule.lr": LR[request.param], **MODEL[request.param]}), workdir)
  return request.param, workdir, results


def _accuracy_and_loss(rows, labels):
  correct = np.mean([row["label"] == str(label) for row, label in zip(rows, labels)])
  loss = -np.mean([np.log(row["probabilities"][str(label)]) for row, label in zip(rows, labels)])
  return correct, loss


def test_predictions_on_the_eval_images_give_the_runs_eval_metrics(image_run, eval_npz, tmp_path):
  kind, workdir, results = image_run
  assert os.path.isfile(os.path.join(workdir, runs.BASE_FILE)) == (kind != "full")   # base not in the checkpoint
  assert results["feature_cache"] == (kind == "cached")
  out = str(tmp_path / "predictions.jsonl")
  assert predict.main(["--workdir", workdir, "--data", eval_npz, "--out", out]) == 0
  rows = [json.loads(line) for line in open(out)]
  labels = np.load(eval_npz)["label"]
  assert len(rows) == len(labels) == 360
  assert rows[7]["input"] == f"{eval_npz}:image[7]" and sorted(rows[7]["probabilities"]) == list("0123456789")
  correct, loss = _accuracy_and_loss(rows, labels)
  assert correct == results["eval/accuracy"]
  assert abs(loss - results["eval/loss"]) < LOSS_TOL, (loss, results["eval/loss"])
  # The outputs depend on the input by far more than the tolerance, so a wrong backbone, base or missing adapters
  # would change the loss: the spread (std) over rows of log p(true class) measured 0.81 full, 0.099 lora, 0.021
  # cached.
  spread = np.std([np.log(row["probabilities"][str(label)]) for row, label in zip(rows, labels)])
  assert spread > 100 * LOSS_TOL, spread


@pytest.mark.parametrize("image_run", ["full"], indirect=True)   # input reading is the same for every run kind
def test_image_files_and_folders_are_read_and_bad_ones_named(image_run, eval_npz, tmp_path, capsys):
  """Single images and a folder (searched recursively) give the rows the .npz gives for the same pixels; an
  unreadable image and an array of the wrong type are errors naming the file."""
  _, workdir, _ = image_run
  from PIL import Image
  pixels = np.load(eval_npz)["image"][:3]
  (tmp_path / "folder" / "sub").mkdir(parents=True)
  paths = [str(tmp_path / "folder" / name) for name in ("a.png", "sub/b.png", "c.png")]
  for p, image in zip(paths, pixels):
    Image.fromarray(image).save(p)
  np.savez(tmp_path / "three.npz", image=pixels)
  by_array = predict.predict(workdir, [str(tmp_path / "three.npz")])
  by_folder = predict.predict(workdir, [str(tmp_path / "folder")])
  assert [r["input"] for r in by_folder] == sorted(paths)
  by_file = {r["input"]: r for r in by_folder}
  for p, expected in zip(paths, by_array):
    np.testing.assert_allclose(list(by_file[p]["probabilities"].values()), list(expected["probabilities"].values()),
                               rtol=0, atol=1e-6)
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  assert predict.main(["--workdir", workdir, "--data", str(tmp_path / "broken.jpg")]) == 1
  assert f"--data {tmp_path / 'broken.jpg'}: not a readable image" in capsys.readouterr().err
  np.savez(tmp_path / "floats.npz", image=pixels.astype(np.float32))
  assert predict.main(["--workdir", workdir, "--data", str(tmp_path / "floats.npz")]) == 1
  assert f"--data {tmp_path / 'floats.npz'}: array 'image' is float32" in capsys.readouterr().err


def test_text_run_predicts_tsv_jsonl_and_txt_inputs(tmp_path, capsys):
  """MiniLM fine-tuned on synthetic sentiment: predictions on its held-out file give its eval metrics; the same
  sentences as .jsonl and .txt give the same rows; a file without the run's text column is named."""
  train_file, held_out_file = _sentiment_files(tmp_path)
  config = _text_config(train_file, held_out_file, max_length=16)
  config.total_steps = 12
  workdir = str(tmp_path / "run")
  results = train.train(config, workdir)
  rows = predict.predict(workdir, [held_out_file])
  lines = open(held_out_file).read().splitlines()[1:]
  texts, labels = [line.split("\t")[0] for line in lines], [line.split("\t")[1] for line in lines]
  correct, loss = _accuracy_and_loss(rows, labels)
  assert correct == results["eval/accuracy"] >= 0.9   # measured 1.0 (see test_text_transfer)
  assert abs(loss - results["eval/loss"]) < LOSS_TOL, (loss, results["eval/loss"])
  assert [r["input"] for r in rows] == texts

  (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts[:5]))
  (tmp_path / "inputs.txt").write_text("\n".join(texts[:5]) + "\n")
  for name in ("inputs.jsonl", "inputs.txt"):
    again = predict.predict(workdir, [str(tmp_path / name)])
    assert [r["label"] for r in again] == [r["label"] for r in rows[:5]]
    np.testing.assert_allclose([r["probabilities"]["1"] for r in again], [r["probabilities"]["1"] for r in rows[:5]],
                               rtol=0, atol=1e-6)
  (tmp_path / "wrong.tsv").write_text("text\tlabel\nhello\t1\n")
  assert predict.main(["--workdir", workdir, "--data", str(tmp_path / "wrong.tsv")]) == 1
  assert f"{tmp_path / 'wrong.tsv'}: no column(s) ['sentence']" in capsys.readouterr().err


def test_bad_workdir_and_checkpoint_are_named(tmp_path, capsys):
  assert predict.main(["--workdir", str(tmp_path), "--data", "x.txt"]) == 1
  assert f"--workdir {tmp_path}: no config.json" in capsys.readouterr().err
  assert predict.main(["--workdir", str(tmp_path)]) == 2   # --data is required
