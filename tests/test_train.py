"""End-to-end runs of the trainer on a tiny EfficientNet-Lite (7 blocks, 32x32 digits)."""
import glob
import json
import os
import signal

import jax
import numpy as np
import pytest

from conftest import devices_env, evaluate_saved_run, restore_checkpoint, run_cli, tiny_config
from transfer import metrics as metrics_lib
from transfer import data, rules, train
from transfer.data import digits


def _leaves(tree):
  return {k: np.asarray(v) for k, v in rules.flatten(tree).items()}


def test_outputs_and_frozen_backbone_stays_bit_identical(tmp_path):
  # feature_cache off: the frozen backbone runs inside every train step, and must come out unchanged.
  config = tiny_config(param_rules=[("head/.*", {}), ("backbone/.*", dict(freeze=True))], feature_cache="off")
  results = train.train(config, str(tmp_path))
  # results.json, config.json, metrics.jsonl, TensorBoard events
  assert json.load(open(tmp_path / "results.json")) == pytest.approx(results)
  assert results["trainable_params"] == 1280 * 10 + 10 and results["frozen_params"] > 100_000
  saved_config = json.load(open(tmp_path / "config.json"))
  assert saved_config["model"]["depth"] == 0.1
  # No validation split: no checkpoint is chosen by a metric (it would be chosen on the reported split).
  assert saved_config["checkpoint"]["best_metric"] is None and results["selected_step"] == 6
  rows = metrics_lib.read(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {"train/loss", "lr", "grad_norm"} <= set(rows[0]) and "examples_per_sec" in rows[1]
  # Six steps on a random frozen backbone learn nothing yet (measured: accuracy 0.1, one class for all 360 test
  # digits, loss 2.30256 = ln 10 - 2e-5), so the figures are held to the saved model's evaluation redone without
  # the trainer: same accuracy, loss to 1e-6, over exactly the 360 test digits (the last batch's 24 padding rows
  # must not count).
  redone = evaluate_saved_run(tmp_path)
  assert redone["examples"] == 360 and rows[-1]["eval/accuracy"] == results["eval/accuracy"] == \
      redone["eval/accuracy"], (rows[-1], results, redone)
  assert results["eval/loss"] == pytest.approx(redone["eval/loss"], abs=1e-6), (results, redone)
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  # Frozen parameters and BN statistics: bit-identical to their initialisation; the head moved.
  import jax.numpy as jnp
  from transfer import models
  model = models.build(config.model, 10)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  init = jax.jit(lambda r: model.init(r, {"image": jnp.zeros((1, 32, 32, 3), jnp.uint8)}, train=False))(init_rng)
  saved = restore_checkpoint(tmp_path)
  init_bb = _leaves(init["params"]["backbone"])
  saved_bb = _leaves(saved["frozen"]["backbone"])
  assert init_bb.keys() == saved_bb.keys()
  for k in init_bb:
    np.testing.assert_array_equal(saved_bb[k], init_bb[k], err_msg=k)
  for k, v in _leaves(init["batch_stats"]).items():
    np.testing.assert_array_equal(_leaves(saved["batch_stats"])[k], v, err_msg=k)
  assert np.abs(saved["trainable"]["head"]["kernel"]).sum() > 0   # zero-initialised head has learnt
  # No optimizer moments for frozen parameters: every opt-state array has a head shape or is a scalar.
  shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(saved["opt_state"])}
  assert shapes <= {(), (1280, 10), (10,)}, shapes


def test_batchnorm_statistics_follow_their_layers_rule(tmp_path, capsys):
  """Fine-tuning with the stem frozen: the stem's BatchNorm statistics stay as initialised, bit for bit, while
  the trained blocks' statistics move."""
  config = tiny_config(param_rules=[("backbone/stem_.*", dict(freeze=True)), ("head/.*", {}), ("backbone/.*", {})])
  train.train(config, str(tmp_path / "run"))
  assert "2 of " in capsys.readouterr().out   # stem_bn's mean and var
  stats = _leaves(restore_checkpoint(tmp_path / "run")["batch_stats"])
  np.testing.assert_array_equal(stats["backbone/stem_bn/mean"], 0.0)
  np.testing.assert_array_equal(stats["backbone/stem_bn/var"], 1.0)
  assert np.abs(stats["backbone/block_0/dw_bn/mean"]).max() > 1e-3


def test_same_seed_same_metrics_and_grad_accumulation(tmp_path):
  rules_frozen = [("head/.*", {}), ("backbone/.*", dict(freeze=True))]
  a = train.train(tiny_config(param_rules=rules_frozen), str(tmp_path / "a"))
  b = train.train(tiny_config(param_rules=rules_frozen), str(tmp_path / "b"))
  assert metrics_lib.read(str(tmp_path / "a"))[-1]["train/loss"] == metrics_lib.read(str(tmp_path / "b"))[-1][
      "train/loss"]
  assert a["eval/accuracy"] == b["eval/accuracy"]
  # With BatchNorm statistics frozen, 2 micro-batches of 8 give the same update as one batch of 16.
  c = train.train(tiny_config(param_rules=rules_frozen, grad_accum_steps=2), str(tmp_path / "c"))
  head_a = restore_checkpoint(tmp_path / "a")["trainable"]["head"]["kernel"]
  head_c = restore_checkpoint(tmp_path / "c")["trainable"]["head"]["kernel"]
  np.testing.assert_allclose(head_c, head_a, atol=1e-5)
  assert c["eval/accuracy"] == pytest.approx(a["eval/accuracy"], abs=1e-2)


def test_feature_cache_matches_full_forward_and_is_reused(tmp_path, capsys):
  """The head trained on cached features ends where the head trained through the frozen backbone does."""
  frozen = [("head/.*", {}), ("backbone/.*", dict(freeze=True))]
  direct = train.train(tiny_config(param_rules=frozen, feature_cache="off"), str(tmp_path / "direct"))
  cached = train.train(tiny_config(param_rules=frozen), str(tmp_path / "cached"))   # 'auto' -> cached
  assert not direct["feature_cache"] and cached["feature_cache"]
  assert cached["frozen_params"] == direct["frozen_params"] and cached["trainable_params"] == 12_810
  head_d = restore_checkpoint(tmp_path / "direct")["trainable"]["head"]
  head_c = restore_checkpoint(tmp_path / "cached")["trainable"]["head"]
  for k in head_d:
    np.testing.assert_allclose(head_c[k], head_d[k], atol=1e-5, err_msg=k)
  assert cached["eval/accuracy"] == pytest.approx(direct["eval/accuracy"], abs=1 / 360 + 1e-9)
  assert len(glob.glob(str(tmp_path / "cached" / "features" / "*.npy"))) == 2
  capsys.readouterr()
  config = tiny_config(param_rules=frozen, feature_cache_dir=str(tmp_path / "cached" / "features"))
  again = train.train(config, str(tmp_path / "again"))      # another workdir, the same shared cache
  assert capsys.readouterr().out.count("reused from") == 2
  assert again["eval/accuracy"] == cached["eval/accuracy"]
  with pytest.raises(ValueError, match="feature_cache='on' needs a fixed backbone"):
    train.train(tiny_config(feature_cache="on"), str(tmp_path / "bad"))


def test_feature_cache_key_follows_pixels_labels_and_batchnorm_statistics(tmp_path):
  """The same config over changed files must not reuse stale features: an edited image, a photo moved to another
  class (same count, other labels) and other BatchNorm statistics each give a new key; the unchanged run reuses."""
  from transfer import features
  from transfer.data import ArrayDataset
  config = tiny_config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(12, dtype=np.int32) % 3

  def reused(images, labels, batch_stats):
    ds = ArrayDataset({"image": images}, labels, ["a", "b", "c"], "toy")
    out = features.extract_or_reuse(config, str(tmp_path), params, batch_stats, {"train": ds}, None, batch_size=8)
    return out["train"][1]

  _, params, batch_stats, _ = train.init_variables(config, 3, {"image": images[:1]})
  assert not reused(images, labels, batch_stats) and reused(images, labels, batch_stats)
  moved = labels.copy()
  moved[0] = 1
  edited = images.copy()
  edited[5, 0, 0, 0] ^= 1
  shifted = jax.tree_util.tree_map(lambda v: v + 1.0, batch_stats)
  assert not reused(images, moved, batch_stats)
  assert not reused(edited, labels, batch_stats)
  assert not reused(images, labels, shifted)
  assert len(glob.glob(str(tmp_path / "features" / "*.npy"))) == 4


def test_model_selection_on_validation_and_eval_measured_once(tmp_path):
  """config.data.val_fraction: evaluations during training measure the validation split (val/* rows, never
  eval/*), the best checkpoint by val/accuracy is kept beside the last, and the eval split is measured once, at the
  chosen checkpoint: results.json's eval/* equal that checkpoint's evaluation redone without the trainer. A
  relaunch after completion reports the same; a checkpoint of another structure is refused."""
  config = tiny_config(total_steps=8, eval_every=2, **{
      "model.name": "vit-test8", "model.depth": None, "data.train_per_class": 20, "data.val_fraction": 0.2,
      "schedule.lr": 3e-3, "checkpoint.keep_last": 1})
  results = train.train(config, str(tmp_path))
  rows = metrics_lib.read(str(tmp_path))
  assert not [k for r in rows for k in r if k.startswith("eval/")], rows   # the eval split: not during training
  accs = {r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}
  assert sorted(accs) == [2, 4, 6, 8]
  chosen = max(s for s, a in accs.items() if a == max(accs.values()))   # a tie goes to the later step
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*")))
  assert results["selected_step"] == chosen and results["val/accuracy"] == accs[chosen], (results, accs)
  assert steps == sorted({chosen, 8}), (steps, accs)   # the last, plus the best
  redone = evaluate_saved_run(tmp_path, chosen)
  assert redone["examples"] == 360 and results["eval/accuracy"] == redone["eval/accuracy"], (results, redone)
  assert results["eval/loss"] == pytest.approx(redone["eval/loss"], abs=1e-6)
  assert json.load(open(tmp_path / "config.json"))["checkpoint"]["best_metric"] == "val/accuracy"
  again = train.train(config, str(tmp_path))   # relaunch: nothing to train, the same selection and measurement
  assert (again["selected_step"], again["eval/accuracy"]) == (chosen, results["eval/accuracy"])
  other = tiny_config(total_steps=8, param_rules=[(".*", {})])   # another model: another state structure
  with pytest.raises(ValueError, match="holds a checkpoint \\(step 8\\) that does not fit this config"):
    train.train(other, str(tmp_path))
  assert 8 in [int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))]


def test_validation_split_is_stratified_disjoint_and_fixed():
  train_ds, _ = digits.load(resolution=8)
  fit, val = data.split_validation(train_ds, 0.1, seed=0)
  assert len(fit) + len(val) == len(train_ds) and len(val) == round(0.1 * len(train_ds))
  rows = lambda ds: {r.tobytes() for r in ds.inputs["image"]}
  assert not rows(fit) & rows(val) and rows(fit) | rows(val) == rows(train_ds)
  counts, total = np.bincount(val.labels, minlength=10), np.bincount(train_ds.labels, minlength=10)
  assert np.all(np.abs(counts - 0.1 * total) <= 1), (counts, total)   # every class its share, to within one
  again, _ = data.split_validation(train_ds, 0.1, seed=0)
  np.testing.assert_array_equal(again.labels, fit.labels)
  other, _ = data.split_validation(train_ds, 0.1, seed=1)
  assert rows(other) != rows(fit)
  scores = data.ArrayDataset({"x": np.arange(50)[:, None]}, np.linspace(0, 1, 50, dtype=np.float32), [], "s",
                             task="regression")
  fit, val = data.split_validation(scores, 0.2, seed=0)   # scores: a plain random pick
  assert len(val) == 10 and not set(fit.inputs["x"][:, 0]) & set(val.inputs["x"][:, 0])
  with pytest.raises(ValueError, match=r"config.data.val_fraction=0.5 holds out every example of class id\(s\)"):
    data.split_validation(data.ArrayDataset({"x": np.zeros((3, 1))}, np.array([0, 0, 1]), ["a", "b"], "tiny"),
                          0.5, seed=0)


def test_eval_covers_every_example_once():
  _, test = digits.load(resolution=8)
  batches = list(test.eval_batches(64))
  assert sum(b["mask"].sum() for b in batches) == len(test) == 360
  assert all(len(b["label"]) == 64 for b in batches)
  assert batches[-1]["mask"][-1] == 0
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, test.labels)


def test_train_batches_depend_only_on_seed_and_step():
  train_ds, _ = digits.load(resolution=8, per_class=10)
  b1, b2 = train_ds.train_batch(7, 16, seed=3), train_ds.train_batch(7, 16, seed=3)
  np.testing.assert_array_equal(b1["label"], b2["label"])
  # Each epoch is a permutation: the first 100 examples (one epoch of 100) have no repeats.
  rows = np.concatenate([train_ds.train_batch(s, 20, seed=0)["image"].reshape(20, -1) for s in range(5)])
  assert len({r.tobytes() for r in rows}) == len({r.tobytes() for r in train_ds.inputs['image'].reshape(100, -1)})


def test_few_shot_subsets_are_nested_and_stratified():
  ten, test10 = digits.load(resolution=8, per_class=10)
  fifty, test50 = digits.load(resolution=8, per_class=50)
  assert np.bincount(ten.labels).tolist() == [10] * 10 and np.bincount(fifty.labels).tolist() == [50] * 10
  np.testing.assert_array_equal(test10.labels, test50.labels)
  fifty_rows = {r.tobytes() for r in fifty.inputs['image']}
  assert all(r.tobytes() in fifty_rows for r in ten.inputs['image'])


# ------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written.
# ------------------------------------------------------------------------------------------------------------------
def test_misspelt_override_fails_before_work_naming_closest_field(tmp_path):
  out = run_cli(["--config", "configs/digits_efficientnet.py", "--workdir", str(tmp_path / "w"),
                 "--config.schedule.lrr=0.1"])
  assert out.returncode == 2, out.stderr[-2000:]
  assert "lrr" in out.stderr and 'Did you mean "lr"' in out.stderr
  assert not (tmp_path / "w").exists()


def test_dataset_smaller_than_batch(tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size=128 is larger than the training set"):
    train.train(tiny_config(batch_size=128), str(tmp_path))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="--workdir .*file/run.* cannot be written"):
    train.train(tiny_config(), str(blocker / "run"))


def test_uncovered_parameter_and_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match=r"(?s)no rule covers .*backbone/"):
    train.train(tiny_config(param_rules=[("head/.*", {})]), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"config.data.name: unknown dataset 'cifar'"):
    train.train(tiny_config(**{"data.name": "cifar"}), str(tmp_path / "b"))


# ------------------------------------------------------------------------------------------------------------------
# Processes: SIGKILL and resume; 1 vs 8 devices.
# ------------------------------------------------------------------------------------------------------------------
TINY_ARGS = ["--config", "tests/tiny_config.py"]
# Dropout before the head and stochastic depth: the runs below draw random bits every step (config.dropout_rng_impl).
DROPOUT = ["--config.model.dropout=0.3", "--config.model.drop_path=0.2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The dropout run on one device, uninterrupted: the reference of the resume test and of the 8-device run."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  full = run_cli(TINY_ARGS + DROPOUT + ["--workdir", str(workdir)])
  assert full.returncode == 0, full.stderr[-3000:]
  # No terminal here, so the progress bar is off and progress comes as lines, one per metrics row.
  assert "step 1/8: train/loss" in full.stdout and "step 8/8: train/loss" in full.stdout, full.stdout[-3000:]
  return workdir


def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
  # Killed right after the step-6 checkpoint was started (asynchronously): it may be half-written on disk.
  killed = run_cli(TINY_ARGS + DROPOUT + ["--workdir", str(tmp_path / "resumed"), "--config.fault.kill_at_step=6"])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (tmp_path / "resumed" / "results.json").exists()
  resumed = run_cli(TINY_ARGS + DROPOUT + ["--workdir", str(tmp_path / "resumed")])
  assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
  a, b = restore_checkpoint(uninterrupted), restore_checkpoint(tmp_path / "resumed")
  assert int(a["step"]) == int(b["step"]) == 8
  for k, v in _leaves({"trainable": a["trainable"], "batch_stats": a["batch_stats"]}).items():
    np.testing.assert_array_equal(_leaves({"trainable": b["trainable"], "batch_stats": b["batch_stats"]})[k], v,
                                  err_msg=k)
  assert [r["step"] for r in metrics_lib.read(str(tmp_path / "resumed"))] == list(range(1, 9))
  # Another dropout generator would draw other masks from here on: refused, naming the field and the recorded one.
  other = run_cli(TINY_ARGS + DROPOUT + ["--workdir", str(tmp_path / "resumed"), "--config.dropout_rng_impl=threefry"])
  assert other.returncode == 1 and "config.dropout_rng_impl='threefry'" in other.stderr, other.stderr[-3000:]
  assert "started with 'rbg'" in other.stderr, other.stderr[-3000:]


@pytest.mark.long
def test_one_and_eight_devices_give_the_same_metrics(tmp_path, uninterrupted):
  """With dropout and stochastic depth on: the rbg masks are the same on 1 and 8 devices (batch-sharded)."""
  out = run_cli(TINY_ARGS + DROPOUT + ["--workdir", str(tmp_path / "d8")], env_extra=devices_env(8))
  assert out.returncode == 0, out.stderr[-3000:]
  runs = {n: json.load(open(os.path.join(workdir, "results.json"))) for n, workdir in ((1, uninterrupted),
                                                                                      (8, tmp_path / "d8"))}
  assert (runs[1]["devices"], runs[8]["devices"]) == (1, 8)
  rows1, rows8 = metrics_lib.read(str(uninterrupted)), metrics_lib.read(str(tmp_path / "d8"))
  for r1, r8 in zip(rows1, rows8):
    assert r1["train/loss"] == pytest.approx(r8["train/loss"], rel=1e-4, abs=1e-5)
    assert r1["grad_norm"] == pytest.approx(r8["grad_norm"], rel=1e-3, abs=1e-5)
  assert runs[1]["eval/accuracy"] == pytest.approx(runs[8]["eval/accuracy"], abs=1 / 360 + 1e-9)
