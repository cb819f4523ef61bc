"""``transfer.probe``: each method against scikit-learn or designed data, then the CLI end to end on a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier

from conftest import ROOT, tiny_config
from transfer import config_base, data, probe, train

# The tests' tiny run (conftest.tiny_config: EfficientNet-Lite0 at depth 0.1, 32x32 digits, 10 training images per
# class, random init) as probe flags.
TINY = ["--scratch", "efficientnet-lite0", "--data", "digits", "--resolution", "32", "--config.model.depth=0.1",
        "--config.model.dropout=0.0", "--config.data.train_per_class=10"]


def _blobs(seed: int, n: int, d: int, classes: int, spread: float):
  """Gaussian classes around centres fixed by (classes, d), drawn from ``seed``; large ``spread`` = overlapping."""
  centres = np.random.default_rng([classes, d]).normal(size=(classes, d)) * 3
  labels = np.arange(n) % classes
  return centres[labels] + spread * np.random.default_rng(seed).normal(size=(n, d)), labels


# ------------------------------------------------------------------------------------------------------------------
# Ridge and the choice of L2.
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(200, 20), (30, 80)])   # the D x D and the N x N system
def test_ridge_equals_scikit_learn(n, d):
  x, labels = _blobs(0, n, d, classes=4, spread=3.0)
  x = x * np.linspace(0.1, 10, d)   # unequal scales: the solver must not assume standardised inputs
  l2s = [0.1, 10.0]
  weights, biases = probe.fit_ridge(x, labels, 4, l2s)
  targets = np.where(np.arange(4) == labels[:, None], 1.0, -1.0)
  for w, b, l2 in zip(weights, biases, l2s):
    ref = Ridge(alpha=l2, solver="svd").fit(x, targets)
    np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6, atol=1e-9)
    clf = RidgeClassifier(alpha=l2, solver="svd").fit(x, labels)
    np.testing.assert_allclose(x @ w + b, clf.decision_function(x), rtol=1e-6, atol=1e-8)
  rows = np.arange(0, n, 2)   # rows= fits on a subset
  w_sub, b_sub = probe.fit_ridge(x, labels, 4, [1.0], rows=rows)
  ref = Ridge(alpha=1.0, solver="svd").fit(x[rows], targets[rows])
  np.testing.assert_allclose(w_sub[0], ref.coef_.T, rtol=1e-6, atol=1e-9)


def test_l2_choice_picks_the_right_end_of_the_grid():
  rng = np.random.default_rng(0)
  # Weak L2 needed: the label is the sign of a small signal riding on a large nuisance that a second feature
  # measures exactly; only a nearly unregularised fit can subtract it.
  signal, nuisance = rng.normal(size=1000), rng.normal(size=1000)
  x, = probe.standardise(np.stack([signal + 100 * nuisance, 100 * nuisance], 1))
  _, _, l2, val_acc = probe.fit_validated(probe.fit_ridge, x, (signal > 0).astype(int), 2, probe.RIDGE_L2S, seed=0)
  assert l2 == probe.RIDGE_L2S[0] and val_acc[0] > 0.95 and val_acc[-1] < 0.6, val_acc
  # Strong L2 needed: one strong feature among 199 pure-noise ones, 10% of labels flipped, about as many fitting
  # examples as features (the least-squares fit interpolates noise).
  z = rng.normal(size=250)
  labels = np.where(rng.random(250) < 0.1, z < 0, z > 0).astype(int)
  x = np.concatenate([100 * z[:, None], rng.normal(size=(250, 199))], 1)
  _, _, l2, val_acc = probe.fit_validated(probe.fit_ridge, x, labels, 2, probe.RIDGE_L2S, seed=0)
  assert l2 >= probe.RIDGE_L2S[-2] and val_acc[0] + 0.25 < max(val_acc), val_acc
  # Equal validation accuracy: the stronger L2 (the simpler model) wins.
  same = lambda x, y, c, l2s, rows=None: (np.zeros((len(l2s), 2, 2)), np.zeros((len(l2s), 2)))
  assert probe.fit_validated(same, x[:, :2], labels, 2, [1.0, 3.0, 2.0], seed=0)[2] == 3.0


def test_validation_split_is_stratified_and_fixed():
  labels = np.repeat(np.arange(3), [10, 20, 5])
  fit, val = probe.stratified_split(labels, 0.2, seed=1)
  assert np.bincount(labels[val]).tolist() == [2, 4, 1]
  assert sorted(np.concatenate([fit, val]).tolist()) == list(range(35))
  np.testing.assert_array_equal(val, probe.stratified_split(labels, 0.2, seed=1)[1])
  with pytest.raises(ValueError, match="too small to hold out a validation split"):
    probe.stratified_split(np.arange(4), 0.2, seed=0)   # one example per class


# ------------------------------------------------------------------------------------------------------------------
# Logistic head.
# ------------------------------------------------------------------------------------------------------------------
def test_logistic_head_separates_and_matches_scikit_learn():
  x, labels = _blobs(1, 400, 16, classes=3, spread=0.5)   # well separated
  x_test, y_test = _blobs(2, 1000, 16, classes=3, spread=0.5)
  w, b, l2, _ = probe.fit_validated(probe.fit_logistic, x, labels, 3, probe.LOGISTIC_L2S, seed=0)
  assert probe.accuracy(x_test @ w + b, y_test) >= 0.99
  # Overlapping classes, a subset of rows: the same minimiser as scikit-learn's (sum loss * C + |W|^2 / 2).
  x, labels = _blobs(3, 300, 8, classes=3, spread=4.0)
  rows, l2 = np.arange(0, 300, 2), 1e-2
  w, b = probe.fit_logistic(x, labels, 3, [l2], rows=rows)
  ref = LogisticRegression(C=1.0 / (l2 * len(rows)), tol=1e-10, max_iter=10_000).fit(x[rows], labels[rows])
  logits = x @ w[0] + b[0]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), ref.predict_proba(x), atol=1e-4)
  again = probe.fit_logistic(x, labels, 3, [l2], rows=rows)   # deterministic
  np.testing.assert_array_equal(again[0], w)


# ------------------------------------------------------------------------------------------------------------------
# k-shot sampling and kNN.
# ------------------------------------------------------------------------------------------------------------------
def test_kshot_samples_exactly_k_per_class_deterministically():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [30, 12, 40, 25]))
  for k in (1, 5, 10):
    rows = probe.sample_per_class(labels, k, seed=0, num_classes=4)
    assert np.bincount(labels[rows], minlength=4).tolist() == [k] * 4 and len(set(rows)) == 4 * k
    np.testing.assert_array_equal(rows, probe.sample_per_class(labels, k, seed=0, num_classes=4))
  assert not np.array_equal(probe.sample_per_class(labels, 5, 0, 4), probe.sample_per_class(labels, 5, 1, 4))
  assert set(probe.sample_per_class(labels, 1, 2, 4)) <= set(probe.sample_per_class(labels, 10, 2, 4))  # nested
  with pytest.raises(ValueError, match=r"25 examples per class: classes \[1\] have fewer"):
    probe.sample_per_class(labels, 25, seed=0, num_classes=4)


def test_knn_equals_scikit_learn_cosine():
  x, labels = _blobs(4, 300, 12, classes=5, spread=4.0)
  x_eval, _ = _blobs(5, 90, 12, classes=5, spread=4.0)
  ours = probe.knn_predict(x, labels, x_eval, (1, 5, 20), 5, chunk=32)   # chunks of the eval rows
  for k in (1, 5, 20):
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x, labels).predict(x_eval)
    np.testing.assert_array_equal(ours[k], ref, err_msg=f"k={k}")


def test_data_argument_maps_to_the_dataset_config(tmp_path):
  assert probe.data_config("tfds:glue/sst2").name == "tfds_text"
  assert (probe.data_config("tfds:cifar10").name, probe.data_config("tfds:cifar10").tfds_name) == ("tfds_image",
                                                                                                    "cifar10")
  folder = probe.data_config(str(tmp_path))
  assert (folder.name, folder.data_dir) == ("image_folder", str(tmp_path))
  # A .npz maps to a config that transfer.data.build loads (test_fraction of it held out for evaluation).
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "tiny.npz", image=rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8),
           label=np.arange(20) % 2)
  cfg = probe.data_config(str(tmp_path / "tiny.npz"))
  cfg.resolution = 8
  train_ds, eval_ds = data.build(cfg, config_base.base().model)
  assert (len(train_ds), len(eval_ds), train_ds.num_outputs) == (16, 4, 2)


def _config(argv):
  args, overrides = probe.build_parser().parse_known_args(argv)
  return probe.config_from_args(args, overrides)


def _photo_folder(root):
  """ROOT/{train,val}/{red,blue}/i.jpg: 100x120 photos, so the auto rule picks 224 px."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("val", 2)):
    for label, name in enumerate(("red", "blue")):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip([[200, 60, 60], [60, 60, 200]][label] + rng.integers(-40, 40, (100, 120, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")
  return root


def test_image_data_gets_the_auto_resolution_unless_one_is_set(tmp_path, capsys):
  """A folder of photos, an .npz or a TFDS image dataset is probed at the trainer's auto resolution (224 px for
  photos), not at the base config's small default; --resolution still decides; digits keep the digits config's
  32 px (so a probe shares that config's frozen runs' features). The resolution used is printed either way."""
  np.savez(tmp_path / "tiny.npz", image=np.zeros((4, 12, 12, 3), np.uint8), label=np.arange(4) % 2)
  scratch = ["--scratch", "efficientnet-lite0", "--data"]
  for spec in (str(tmp_path), str(tmp_path / "tiny.npz"), "tfds:cifar10"):
    assert _config(scratch + [spec]).data.resolution == "auto", spec
    assert _config(scratch + [spec, "--resolution", "96"]).data.resolution == 96, spec
  assert _config(scratch + ["digits"]).data.resolution == probe.DIGITS_RESOLUTION == 32
  photos = str(_photo_folder(tmp_path / "photos"))
  config = _config(scratch + [photos])
  probe.settle_resolution(config)
  assert config.data.resolution == 224
  assert "auto: data.resolution = 224 (training images' median shorter side 100 px >= 96)" in capsys.readouterr().out
  config = _config(scratch + [photos, "--resolution", "40"])
  probe.settle_resolution(config)
  assert config.data.resolution == 40 and "data.resolution = 40 px (set" in capsys.readouterr().out


def test_flags_and_a_frozen_training_config_give_the_same_cache_key():
  """--model/--data build the config a frozen training run of configs/digits_efficientnet.py has, so either one's
  cached features serve the other."""
  flags = _config(["--model", "efficientnet-lite0", "--data", "digits"])
  from_file = _config(["--config", os.path.join(ROOT, "configs/digits_efficientnet.py:mode=frozen,per_class=0")])
  assert flags.model.to_dict() == from_file.model.to_dict() and flags.data.to_dict() == from_file.data.to_dict()
  tiny = _config(TINY)
  assert tiny.model.to_dict() == tiny_config().model.to_dict() and tiny.data.to_dict() == tiny_config().data.to_dict()


# ------------------------------------------------------------------------------------------------------------------
# The command line, end to end.
# ------------------------------------------------------------------------------------------------------------------
def test_cli_table_json_and_feature_cache_shared_with_the_trainer(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  assert probe.main(TINY + ["--workdir", workdir, "--out", str(tmp_path / "a.json")]) == 0
  out = capsys.readouterr().out
  assert out.count("extracted to") == 2 and "features: train (100, 1280) extracted, eval (360, 1280) extracted" in out
  assert "data.resolution = 32 px (set" in out and "on digits at 32 px, accuracy on the eval split" in out
  for method in ("ridge ", "logistic ", "1-shot ", "5-shot ", "10-shot ", "kNN "):
    assert f"\n{method}" in out, method
  assert "note: 25-shot skipped: the rarest class has 10 training examples" in out
  first = json.load(open(tmp_path / "a.json"))
  assert first["features"]["train"] == {"shape": [100, 1280], "reused": False}
  assert [r["shots"] for r in first["kshot"]] == [1, 5, 10] and list(first["knn"]["accuracy"]) == ["1", "5", "20"]
  assert all(len(r["accuracies"]) == 3 and r["seeds"] == [0, 1, 2] for r in first["kshot"])
  assert len(set(first["kshot"][-1]["accuracies"])) == 1   # 10-shot of 10 per class: every seed the same set
  assert first["ridge"]["l2"] in probe.RIDGE_L2S and len(first["ridge"]["val_accuracy"]) == len(probe.RIDGE_L2S)
  assert len(first["rows"]) == 8
  for r in first["rows"]:   # random-init features still beat chance (0.1) on digits
    assert 0.15 < r["accuracy"] <= 1.0, r
    assert f"{r['accuracy']:.3f}" in out

  # A second probe reuses the features, and gives the same numbers.
  assert probe.main(TINY + ["--workdir", workdir, "--out", str(tmp_path / "b.json")]) == 0
  out = capsys.readouterr().out
  assert out.count("reused from") == 2 and "features: train (100, 1280) reused, eval (360, 1280) reused" in out
  second = json.load(open(tmp_path / "b.json"))
  assert [r["accuracy"] for r in second["rows"]] == [r["accuracy"] for r in first["rows"]]

  # The trainer, on the equivalent config with a frozen backbone, reuses the probe's features (same cache key).
  frozen = tiny_config(param_rules=[("head/.*", {}), ("backbone/.*", dict(freeze=True))])
  results = train.train(frozen, workdir)
  assert capsys.readouterr().out.count("reused from") == 2 and results["feature_cache"]


def test_cli_bad_input_names_the_flag(tmp_path, capsys):
  cases = [
      (["--model", "no-such-model", "--data", "digits"], "--model: pretrained 'no-such-model' is neither"),
      (["--scratch", "resnet-9000", "--data", "digits"], "--scratch 'resnet-9000': unknown architecture"),
      (["--scratch", "efficientnet-lite0", "--data", "x.npz"], "--data 'x.npz': no such .npz file"),
      (["--scratch", "efficientnet-lite0", "--data", "tfds:nope"], "--data 'tfds:nope': unknown TFDS dataset"),
      (["--scratch", "efficientnet-lite0", "--data", "nope"], "--data 'nope': not 'digits', 'tfds:NAME', a .npz"),
      (["--scratch", "efficientnet-lite0", "--data", "digits", "--resolution", "0"], "--resolution '0': expected"),
      (["--scratch", "efficientnet-lite0"], "pass --model SOURCE (or --scratch NAME) and --data DATA"),
      (["--scratch", "efficientnet-lite0", "--data", "digits", "--config.data.resolutoin=8"],
       'Did you mean "resolution" instead of "resolutoin"?'),
      (["--config", "configs/no_such.py"], "--config configs/no_such.py: configs/no_such.py is not a file"),
  ]
  for argv, message in cases:
    assert probe.main(argv + ["--workdir", str(tmp_path)]) == 1, argv
    err = capsys.readouterr().err
    assert message in err, (argv, message, err)
  # The module runs as a program too.
  out = subprocess.run([sys.executable, "-m", "transfer.probe", "--data", "digits", "--scratch", "nope"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "--scratch 'nope': unknown architecture" in out.stderr, out.stderr[-2000:]
