"""python -m transfer.sweep: points checked before any run, runs in subprocesses, summary and plots, resume.

The sweeps' runs are the tiny EfficientNet-Lite (32x32 digits) at width 0.25 with its backbone frozen, so each run
trains a head on cached features for 4 steps (a fifth of the training digits held out for validation): a few
seconds, most of it the subprocess's start."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from transfer import metrics as metrics_lib
from transfer import sweep

TESTS = os.path.dirname(os.path.abspath(__file__))

# ARGS: mode picks the batch size from BATCH (mode=b is the point the resume test breaks and fixes), steps the
# length. sweep() returns the expression POINTS.
CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from transfer import config_base
from transfer.sweep import product, seeds

BATCH = {{"a": 16, "b": {b_batch}}}


def get_config(arg=""):
  args = config_base.config_args(arg, mode="a", steps=4)
  return tiny_config(total_steps=args["steps"], batch_size=BATCH[args["mode"]],
                     param_rules=[("head/.*", {{}}), ("backbone/.*", dict(freeze=True))],
                     **{{"model.width": 0.25, "schedule.warmup_steps": 1, "checkpoint.every_steps": 0,
                        "data.val_fraction": 0.2}})


def sweep(arg=""):
  return {points}
'''
LR_SEEDS = 'seeds(product(**{"schedule.lr": [0.01, 0.1]}), 2)'


def write_config(folder, points=LR_SEEDS, b_batch=16):
  path = os.path.join(folder, "sweep_config.py")
  with open(path, "w") as f:
    f.write(CONFIG.format(tests=TESTS, points=points, b_batch=b_batch))
  return path


def run_sweep(*args):
  """``python -m transfer.sweep ARGS`` in a fresh process, as a user launches it."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "transfer.sweep", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def read_csv(workdir):
  with open(os.path.join(workdir, "summary.csv")) as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# (d) The helpers config files use, names, --only.
# ----------------------------------------------------------------------------------------------------------------
def test_product_zipped_seeds_and_names():
  assert sweep.product(**{"arg:mode": ["a", "b"], "schedule.lr": [0.1, 0.01]}) == [
      {"arg:mode": "a", "schedule.lr": 0.1}, {"arg:mode": "a", "schedule.lr": 0.01},
      {"arg:mode": "b", "schedule.lr": 0.1}, {"arg:mode": "b", "schedule.lr": 0.01}]
  assert sweep.zipped(**{"schedule.lr": [0.1, 0.01], "batch_size": [256, 32]}) == [
      {"schedule.lr": 0.1, "batch_size": 256}, {"schedule.lr": 0.01, "batch_size": 32}]
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zipped(a=[1, 2], b=[1])
  with pytest.raises(ValueError, match="non-empty list"):
    sweep.product(a="xy")
  points = sweep.seeds(sweep.product(a=[1]) + [{"b": 2}], 3)
  assert points == [{"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 1, "seed": 2},
                    {"b": 2, "seed": 0}, {"b": 2, "seed": 1}, {"b": 2, "seed": 2}]
  with pytest.raises(ValueError, match="already sets 'seed'"):
    sweep.seeds(points, 2)

  assert sweep.point_name({"arg:mode": "frozen", "arg:per_class": 10, "seed": 1}) == "mode=frozen,per_class=10,seed=1"
  assert sweep.point_name({"schedule.lr": 0.001, "total_epochs": 30.0}) == "schedule.lr=0.001,total_epochs=30"
  assert sweep.point_name({"schedule.lr": 3e-5}) == "schedule.lr=3e-05"
  assert sweep.point_name({"model.pretrained": "a/b c.pth"}) == "model.pretrained=a_b_c.pth"
  assert sweep.point_name({}) == "base"
  long = sweep.point_name({"param_rules": [("backbone/.*" + "x" * 200, {})]})
  assert len(long) <= 120 and "/" not in long

  points = [sweep.Point(sweep.point_name(p), p) for p in sweep.seeds(sweep.product(**{"arg:mode": ["a", "b"]}), 2)]
  picked = sweep.select(points, "mode=b,seed=1,mode=a,seed=0")   # names hold commas: matched whole
  assert [p.name for p in picked] == ["mode=a,seed=0", "mode=b,seed=1"]
  with pytest.raises(ValueError, match="does not start with a point's name"):
    sweep.select(points, "mode=c,seed=0")
  assert sweep.log_scale([0.01, 0.1]) and not sweep.log_scale([10, 50]) and not sweep.log_scale([0, 1])
  assert sweep.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and sweep.mean_std([1.0]) == (1.0, None)


# ----------------------------------------------------------------------------------------------------------------
# (a) Every point built and checked before any run.
# ----------------------------------------------------------------------------------------------------------------
def test_dry_run_lists_points_and_runs_nothing(tmp_path, capsys):
  config, workdir = write_config(str(tmp_path)), str(tmp_path / "sweep")
  assert sweep.main(["--config", config, "--workdir", workdir, "--dry-run"]) == 0
  out = capsys.readouterr().out
  names = ["schedule.lr=0.01,seed=0", "schedule.lr=0.01,seed=1", "schedule.lr=0.1,seed=0", "schedule.lr=0.1,seed=1"]
  for i, name in enumerate(names):
    assert re.search(rf"^\| {i} +\| {re.escape(name)} +\| {re.escape(os.path.join(workdir, name))} +\| to run +\|$",
                     out, re.M), out
  assert "4 of 4 points checked" in out and "nothing run" in out
  assert not os.path.exists(workdir)   # no run started, nothing written

  # ARGS: the launch's (steps=3) merged under each point's arg: keys; field overrides on top.
  write_config(str(tmp_path), points='product(**{"arg:mode": ["a", "b"], "schedule.lr": [0.05]})', b_batch=8)
  _, base_arg, points = sweep.plan(f"{config}:steps=3")
  assert base_arg == "steps=3" and [p.name for p in points] == ["mode=a,schedule.lr=0.05", "mode=b,schedule.lr=0.05"]
  assert [(p.config.batch_size, p.config.total_steps, p.config.schedule.lr) for p in points] == [
      (16, 3, 0.05), (8, 3, 0.05)]
  assert points[1].fields == {"mode": "b", "schedule.lr": 0.05}


def test_bad_points_fail_before_any_run_naming_point_and_field(tmp_path, capsys):
  workdir = str(tmp_path / "sweep")
  config = write_config(str(tmp_path), points='[{"seed": 0}, {"schedule.lrr": 0.1}, {"batch_size": 0}]')
  for extra in (["--dry-run"], []):   # a real launch checks the same way first
    assert sweep.main(["--config", config, "--workdir", workdir, *extra]) == 1
    err = capsys.readouterr().err
    assert "point 'schedule.lrr=0.1': no config field 'schedule.lrr'" in err and "did you mean 'lr'" in err, err
    assert "point 'batch_size=0': config.batch_size=0: expected an integer >= 1" in err, err   # config_check
    assert "nothing run" in err and not os.path.exists(workdir)

  write_config(str(tmp_path), points='[{"seed": 0}, {"seed": 1}, {"seed": 0}]')
  assert sweep.main(["--config", config, "--workdir", workdir, "--dry-run"]) == 1
  assert "points 0 and 2 both resolve to the directory 'seed=0'" in capsys.readouterr().err

  write_config(str(tmp_path), points='[{"arg:mode": "c"}]')   # the config file's own ARGS check
  assert sweep.main(["--config", config, "--workdir", workdir, "--dry-run"]) == 1
  assert "point 'mode=c': get_config('mode=c') failed: KeyError" in capsys.readouterr().err

  no_sweep = os.path.join(TESTS, "tiny_config.py")
  assert sweep.main(["--config", no_sweep, "--workdir", workdir, "--dry-run"]) == 1
  assert "defines no sweep(arg) function" in capsys.readouterr().err
  assert sweep.main(["--config", str(tmp_path / "missing.py"), "--workdir", workdir, "--dry-run"]) == 2
  assert "not a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# (b) A whole sweep: 2 lrs x 2 seeds, two at once.
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sweep"))
  workdir = os.path.join(folder, "runs")
  proc = run_sweep("--config", write_config(folder), "--workdir", workdir, "--processes", "2")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc.stdout


def test_sweep_runs_every_point_and_summarises(finished_sweep):
  workdir, out = finished_sweep
  assert len(re.findall(r"\] start ", out)) == 4 and len(re.findall(r"\] done  .*: eval/accuracy [0-9.]+, \d+ s",
                                                                      out)) == 4, out
  rows = read_csv(workdir)
  assert [r["point"] for r in rows] == ["schedule.lr=0.01,seed=0", "schedule.lr=0.01,seed=1",
                                        "schedule.lr=0.1,seed=0", "schedule.lr=0.1,seed=1"]
  for r in rows:
    run_dir = os.path.join(workdir, r["point"])
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert r["status"] == "ok" and os.path.getsize(os.path.join(run_dir, "sweep.log")) > 0
    assert float(r["schedule.lr"]) == json.load(open(os.path.join(run_dir, "config.json")))["schedule"]["lr"]
    assert int(r["seed"]) == json.load(open(os.path.join(run_dir, "config.json")))["seed"]
    for key in ("eval/accuracy", "eval/loss", "val/accuracy", "wall_seconds", "trainable_params", "selected_step"):
      assert float(r[key]) == pytest.approx(results[key]), key
    # Validation during training (the selected step's row), the eval split only in results.json.
    history = metrics_lib.read(run_dir)
    assert [row["val/accuracy"] for row in history if row["step"] == int(r["selected_step"])] == [
        pytest.approx(float(r["val/accuracy"]))]
    assert not any(k.startswith("eval/") for row in history for k in row)

  md = open(os.path.join(workdir, "summary.md")).read()
  assert all(f"| {r['point']} " in md for r in rows)
  seed_table = md.split("## Over seeds")[1]
  groups = re.findall(r"^\| (0\.01|0\.1) +\| 2 +\| ([0-9.]+) ± ([0-9.]+) +\|", seed_table, re.M)
  assert [g[0] for g in groups] == ["0.01", "0.1"], seed_table
  for lr, mean, _ in groups:   # the mean of the two seeds' accuracies
    accs = [float(r["eval/accuracy"]) for r in rows if r["schedule.lr"] == lr]
    assert float(mean) == pytest.approx(sum(accs) / 2, abs=1e-4)


def test_sweep_plots_are_png_files(finished_sweep):
  workdir, _ = finished_sweep
  plots = os.path.join(workdir, "plots")
  assert sorted(os.listdir(plots)) == ["eval_accuracy_vs_schedule_lr.png", "eval_loss_vs_schedule_lr.png",
                                       "learning_curves.png"]
  import matplotlib.image
  for name in os.listdir(plots):
    path = os.path.join(plots, name)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 500, (name, image.shape)
    assert image[..., :3].std() > 0.05, name   # not a blank canvas


# ----------------------------------------------------------------------------------------------------------------
# (c) A failing point is recorded and the others go on; rerunning skips finished points and retries it.
# ----------------------------------------------------------------------------------------------------------------
def test_failed_point_recorded_then_resumed(tmp_path):
  workdir, points = str(tmp_path / "runs"), 'product(**{"arg:mode": ["a", "b"]})'
  config = write_config(str(tmp_path), points=points, b_batch=1000)   # mode=b: a batch of 1000, 100 examples
  assert sweep.main(["--config", config, "--workdir", workdir, "--dry-run"]) == 0   # config_check cannot know
  proc = run_sweep("--config", config, "--workdir", workdir, "--processes", "2")
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  ok, bad = os.path.join(workdir, "mode=a"), os.path.join(workdir, "mode=b")
  assert os.path.exists(os.path.join(ok, "results.json")) and not os.path.exists(os.path.join(bad, "results.json"))
  error = open(os.path.join(bad, "sweep_error.txt")).read()
  assert "error: config.batch_size=1000 is larger than the training set" in error, error
  assert "FAILED mode=b" in proc.stdout and "FAILED: mode=b" in proc.stdout
  assert [(r["point"], r["status"]) for r in read_csv(workdir)] == [("mode=a", "ok"), ("mode=b", "failed")]
  assert "`mode=b`" in open(os.path.join(workdir, "summary.md")).read()
  finished = os.path.getmtime(os.path.join(ok, "results.json"))

  write_config(str(tmp_path), points=points, b_batch=16)   # the fix
  proc = run_sweep("--config", config, "--workdir", workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "skip  mode=a: finished earlier" in proc.stdout and "start mode=a" not in proc.stdout
  assert os.path.getmtime(os.path.join(ok, "results.json")) == finished
  assert os.path.exists(os.path.join(bad, "results.json")) and not os.path.exists(os.path.join(bad,
                                                                                              "sweep_error.txt"))
  assert [(r["point"], r["status"]) for r in read_csv(workdir)] == [("mode=a", "ok"), ("mode=b", "ok")]
