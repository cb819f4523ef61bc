"""Faults a long run meets, and what the trainer promises about each (README: reliability).

Damaged checkpoints are set aside and the run resumes from the newest good one; non-finite values never reach a
checkpoint; a cut-off metrics.jsonl is repaired; one run per workdir; a full disk is one clear error. Runs in
subprocesses cost a compile each (20-40 s here), so one saved run is shared by the checkpoint tests, which call
``Checkpointer.restore_latest`` directly on damaged copies of it; one end-to-end relaunch proves the CLI path.
"""
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, restore_checkpoint, run_cli
from transfer import checkpoint as checkpoint_lib
from transfer import metrics as metrics_lib

# The test ViT: these tests are about checkpoints, locks and faults, not the network (tests/tiny_config.py).
TINY = ["--config", "tests/tiny_config.py:vit", "--config.checkpoint.every_steps=3"]


def _leaves(tree):
  """Every array of a (nested dict and list) tree by its path, as numpy."""
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _error_lines(stderr):
  """stderr's lines without absl/orbax/jax WARNING and INFO lines (which are not errors)."""
  return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "I0", "W0"))]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """One finished 20-step run keeping checkpoints 15, 18 and 20."""
  workdir = str(tmp_path_factory.mktemp("saved") / "run")
  out = run_cli(TINY + ["--workdir", workdir, "--config.total_steps=20", "--config.checkpoint.keep_last=3"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps(workdir) == [15, 18, 20]
  return workdir


def _copy(saved_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run, workdir)
  return workdir


def _like(saved_run):
  """A state of the saved run's layout (zeros), as the trainer's restore target."""
  manager = ocp.CheckpointManager(os.path.join(saved_run, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler())
  meta = manager.item_metadata(20)
  manager.close()
  return jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), getattr(meta, "tree", meta))


def _restore_latest(workdir, like):
  messages = []
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=3, best_metric=None,
                                     log=messages.append)
  step, state = ckpt.restore_latest(like)
  ckpt.close()
  return step, state, messages


# ------------------------------------------------------------------------------------------------------------------
# a) Damaged checkpoints: set aside (moved, not deleted), the newest good one restored.
# ------------------------------------------------------------------------------------------------------------------
def _data_files(step_dir):
  return sorted(glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def _random_bytes(step_dir, every_file=False):
  # OCDBT packs several arrays in a data file and splits them differently per save; damage to every file makes
  # many array reads fail at once (their failed coroutines once printed tracebacks after the restore moved on).
  for path in _data_files(step_dir)[slice(None) if every_file else slice(-1, None)]:
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 10)
      f.write(np.random.default_rng(0).bytes(4096))


def _edit_digest(step_dir):
  meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  meta = json.load(open(meta_path))
  digests = meta["custom_metadata"]["array_sha256"]
  digests["trainable/head/kernel"] = "0" * 64
  json.dump(meta, open(meta_path, "w"))


DAMAGE = {   # how -> (damage to the step's directory, the reasons it may be set aside for)
    "array file deleted": (lambda d: os.remove(_data_files(d)[-1]), ("unreadable", "digest-mismatch")),
    "array file zeroed": (lambda d: open(_data_files(d)[-1], "r+b").write(bytes(os.path.getsize(_data_files(d)[-1]))),
                          ("unreadable", "digest-mismatch")),
    "4 KB of random bytes": (_random_bytes, ("unreadable", "digest-mismatch")),
    "4 KB of random bytes in every array file": (lambda d: _random_bytes(d, every_file=True),
                                                 ("unreadable", "digest-mismatch")),
    "_METADATA deleted": (lambda d: os.remove(os.path.join(d, "default", "_METADATA")), ("unreadable",)),
    "manifests deleted": (lambda d: [os.remove(p) for p in glob.glob(os.path.join(d, "**", "manifest.ocdbt"),
                                                                     recursive=True)], ("unreadable",)),
    "_CHECKPOINT_METADATA deleted": (lambda d: os.remove(os.path.join(d, "_CHECKPOINT_METADATA")), ("no-digest",)),
    "a recorded digest changed": (_edit_digest, ("digest-mismatch",)),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_restored(saved_run, tmp_path, capfd, how):
  workdir = _copy(saved_run, tmp_path)
  damage, reasons = DAMAGE[how]
  damage(os.path.join(workdir, "checkpoints", "20"))
  step, state, messages = _restore_latest(workdir, _like(saved_run))
  assert step == 18, messages
  damaged = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  assert len(damaged) == 1 and damaged[0].split("-", 1)[0] == "20" and damaged[0].split("-", 1)[1] in reasons, damaged
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged", damaged[0], "default"))   # moved, not deleted
  assert _steps(workdir) == [15, 18]
  assert any(m.startswith("checkpoint step 20 is damaged") and damaged[0] in m for m in messages), messages
  assert not any("does not fit" in m for m in messages)
  expected = restore_checkpoint(saved_run, 18)
  got = _leaves(jax.device_get(state))
  for k, v in _leaves(expected).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)   # bit-identical to step 18 as saved
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def test_nonfinite_values_in_a_checkpoint_are_damage(saved_run, tmp_path):
  # A checkpoint written by other code (or before this check existed): NaN in a leaf, digests that match it.
  workdir = _copy(saved_run, tmp_path)
  state = restore_checkpoint(saved_run, 20)
  state["trainable"]["head"]["bias"] = np.full_like(state["trainable"]["head"]["bias"], np.nan)
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  manager.save(21, args=ocp.args.StandardSave(state),
               custom_metadata={"array_sha256": checkpoint_lib.array_digests(state)})
  manager.wait_until_finished()
  manager.close()
  step, _, messages = _restore_latest(workdir, _like(saved_run))
  assert step == 20
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["21-nonfinite"]
  assert any("non-finite values in trainable/head/bias" in m for m in messages), messages


def test_no_good_checkpoint_starts_fresh_with_a_message(saved_run, tmp_path):
  workdir = _copy(saved_run, tmp_path)
  for step in (15, 18, 20):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "default", "_METADATA"))
  like = _like(saved_run)
  step, state, messages = _restore_latest(workdir, like)
  assert step == 0 and state is like
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == [
      "15-unreadable", "18-unreadable", "20-unreadable"]
  assert messages[-1].startswith("no usable checkpoint left") and "starting from step 0" in messages[-1], messages


def test_a_checkpoint_of_another_layout_does_not_fit_and_is_not_moved(saved_run, tmp_path):
  workdir = _copy(saved_run, tmp_path)
  like = _like(saved_run)
  like["trainable"]["extra"] = {"kernel": jnp.zeros((3, 3))}   # e.g. unfrozen layers, another head
  with pytest.raises(ValueError, match=r"holds a checkpoint \(step 20\) that does not fit this config.*"
                                       r"not in the checkpoint: trainable/extra/kernel"):
    _restore_latest(workdir, like)
  like = _like(saved_run)
  like["trainable"]["head"]["bias"] = jnp.zeros((11,))   # another number of classes
  with pytest.raises(ValueError, match=r"does not fit this config.*trainable/head/bias: checkpoint \(10,\) float32, "
                                       r"config \(11,\) float32"):
    _restore_latest(workdir, like)
  assert _steps(workdir) == [15, 18, 20] and not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


def test_relaunch_over_a_silently_corrupted_checkpoint_resumes_from_the_previous(saved_run, tmp_path):
  # 4 KB of random bytes in each data file of step 20: before digests this restored without a word.
  workdir = _copy(saved_run, tmp_path)
  os.remove(os.path.join(workdir, "results.json"))
  _random_bytes(os.path.join(workdir, "checkpoints", "20"), every_file=True)
  out = run_cli(TINY + ["--workdir", workdir, "--config.total_steps=20", "--config.checkpoint.keep_last=3"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "checkpoint step 20 is damaged" in out.stdout and f"resumed from {workdir}/checkpoints step 18" in out.stdout
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_damaged"))] == ["20"]
  assert [r["step"] for r in metrics_lib.read(workdir)] == list(range(1, 21))
  a, b = restore_checkpoint(saved_run, 20), restore_checkpoint(workdir, 20)   # steps 19-20 again: same result
  for k, v in _leaves({"trainable": a["trainable"], "batch_stats": a["batch_stats"]}).items():
    np.testing.assert_array_equal(_leaves({"trainable": b["trainable"], "batch_stats": b["batch_stats"]})[k], v,
                                  err_msg=k)


# ------------------------------------------------------------------------------------------------------------------
# b) Non-finite values never reach a checkpoint.
# ------------------------------------------------------------------------------------------------------------------
def _small_state(nonfinite_step=0):
  return {"step": jnp.int32(5), "trainable": {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))},
          "nonfinite_step": jnp.int32(nonfinite_step)}


def test_nonfinite_at_the_first_step_reports_that_no_checkpoint_exists(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, best_metric=None)
  with pytest.raises(checkpoint_lib.NonFiniteError, match=r"non-finite at step 1: train/loss is nan, grad_norm is "
                                                          r"inf\..*no checkpoint was saved before it"):
    ckpt.check_finite(1, _small_state(nonfinite_step=1), {"train/loss": float("nan"), "grad_norm": float("inf"),
                                                           "lr": 0.1})
  ckpt.close()   # already closed by the stop: a no-op
  assert os.listdir(tmp_path / "checkpoints") == []


def test_save_refuses_nonfinite_state_and_a_flagged_step(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, best_metric=None)
  ckpt.save(3, _small_state())
  ckpt.check_finite(4, _small_state(), {"train/loss": 0.5, "grad_norm": 1.0})   # finite: nothing happens
  # The step flagged step 4 (not a logged step); the save at 6 stops, naming step 4 and the good checkpoint 3.
  with pytest.raises(checkpoint_lib.NonFiniteError, match=r"non-finite at step 4: the loss or the gradient norm is "
                                                          r"not finite \(not a logged step\).*last good checkpoint "
                                                          r"is step 3"):
    ckpt.save(6, _small_state(nonfinite_step=4))
  assert _steps(str(tmp_path)) == [3]
  # Without the flag (a state from elsewhere), the arrays themselves are checked before writing.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, best_metric=None)
  bad = _small_state()
  bad["trainable"]["w"] = bad["trainable"]["w"].at[0, 0].set(jnp.inf)
  with pytest.raises(checkpoint_lib.NonFiniteError, match="non-finite values in the train state at trainable/w"):
    ckpt.save(6, bad)
  assert _steps(str(tmp_path)) == [3]


def test_nonfinite_step_stops_the_run_before_saving_and_relaunch_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = TINY + ["--workdir", workdir, "--config.total_steps=12"]
  out = run_cli(args + ["--config.fault.nan_at_step=8"])
  assert out.returncode == 1, out.stderr[-3000:]
  errors = _error_lines(out.stderr)
  assert len(errors) == 1, out.stderr[-3000:]   # one clear error: no traceback, no Orbax shutdown noise
  assert errors[0].startswith("error: training stopped, non-finite at step 8: train/loss is nan"), errors
  assert f"the last good checkpoint is step 6 in {workdir}/checkpoints" in errors[0], errors
  assert _steps(workdir) == [3, 6] and not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
  for step in (3, 6):
    assert all(np.isfinite(v).all() for v in _leaves(restore_checkpoint(workdir, step)).values()
               if np.issubdtype(v.dtype, np.floating))
  assert [r["step"] for r in metrics_lib.read(workdir)] == list(range(1, 8))   # the NaN row is not logged
  assert open(os.path.join(workdir, ".lock")).read() == ""   # released
  out = run_cli(args)
  assert out.returncode == 0 and f"resumed from {workdir}/checkpoints step 6" in out.stdout, out.stderr[-3000:]
  assert _steps(workdir)[-1] == 12
  assert [r["step"] for r in metrics_lib.read(workdir)] == list(range(1, 13))


# ------------------------------------------------------------------------------------------------------------------
# c) metrics.jsonl: a cut-off last line is repaired; a corrupt line before it is an error naming file and line.
# ------------------------------------------------------------------------------------------------------------------
def test_cut_off_last_metrics_line_is_dropped_with_a_message(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 2.3}\n{"step": 2, "train/loss": 2.2}\n{"step": 3, "train/lo')
  messages = []
  writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=2, log=messages.append)
  writer.write(3, {"train/loss": 2.1})
  writer.close()
  assert [r["step"] for r in metrics_lib.read(str(tmp_path))] == [1, 2, 3]
  assert len(messages) == 1 and "dropped its last line, cut off" in messages[0] and str(path) in messages[0]
  # A whole last row that only lacks its newline is kept (and the next row does not run into it).
  path.write_text('{"step": 1, "train/loss": 2.3}')
  metrics_lib.MetricWriter(str(tmp_path), resume_step=1, log=messages.append).write(2, {"train/loss": 2.2})
  assert [r["step"] for r in metrics_lib.read(str(tmp_path))] == [1, 2] and len(messages) == 1


def test_corrupt_metrics_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  text = '{"step": 1, "train/loss": 2.3}\n{"step": 2, "train/lo\n{"step": 3, "train/loss": 2.1}\n'
  path.write_text(text)
  with pytest.raises(ValueError, match=f"{path} line 2 is not a metrics row"):
    metrics_lib.MetricWriter(str(tmp_path), resume_step=3)
  with pytest.raises(ValueError, match=f"{path} line 2 is not a metrics row"):
    metrics_lib.read(str(tmp_path))
  assert path.read_text() == text   # left as it was


def test_metrics_write_on_a_full_disk_is_one_clear_error(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.path = "/dev/full"   # every write: ENOSPC
  with pytest.raises(OSError, match=r"cannot append step 5 to /dev/full: No space left on device \(the disk is full\)"):
    writer.write(5, {"train/loss": 1.0})
  writer.close()


# ------------------------------------------------------------------------------------------------------------------
# d) One run per workdir.
# ------------------------------------------------------------------------------------------------------------------
def test_second_launch_on_a_busy_workdir_fails_and_a_stale_lock_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  args = TINY + ["--workdir", workdir]
  env = {**os.environ, "PYTHONPATH": ROOT}
  log = open(tmp_path / "first.log", "w")
  first = subprocess.Popen([sys.executable, "-m", "transfer.train", *args, "--config.total_steps=100000"], cwd=ROOT,
                           env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 600
    # The first run is in its loop once a checkpoint exists (which one: older ones are pruned as it goes).
    while not (os.path.isdir(os.path.join(workdir, "checkpoints")) and _steps(workdir)):
      assert first.poll() is None and time.time() < deadline, open(tmp_path / "first.log").read()[-3000:]
      time.sleep(0.5)
    second = run_cli(args + ["--config.total_steps=100000"])
    assert second.returncode == 1, second.stderr[-3000:]
    errors = _error_lines(second.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: --workdir {workdir!r} is in use by another run: "
                                                     f"pid {first.pid} on {socket.gethostname()}, started "), errors
    assert "data:" not in second.stdout   # refused before any work
    assert first.poll() is None   # the first run is unharmed
  finally:
    first.send_signal(signal.SIGKILL)   # killed: the kernel drops its flock, its details stay in the file
    first.wait()
    log.close()
  assert json.loads(open(os.path.join(workdir, ".lock")).read())["pid"] == first.pid
  # The kill may also cut metrics.jsonl's last line: cut it here for certain.
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "rb+") as f:
    f.truncate(f.seek(0, os.SEEK_END) - 10)
  last = _steps(workdir)[-1]
  third = run_cli(args + [f"--config.total_steps={last + 2}"])
  assert third.returncode == 0, third.stderr[-3000:]
  assert "taking over" in third.stdout and f"pid {first.pid}" in third.stdout, third.stdout[-3000:]
  assert "dropped its last line, cut off" in third.stdout, third.stdout[-3000:]
  assert f"resumed from {workdir}/checkpoints step {last}" in third.stdout
  assert [r["step"] for r in metrics_lib.read(workdir)] == list(range(1, last + 3))
  assert open(os.path.join(workdir, ".lock")).read() == ""   # released at the end


# ------------------------------------------------------------------------------------------------------------------
# e) A full disk: one clear error, the previous checkpoints intact, and a relaunch resumes.
# ------------------------------------------------------------------------------------------------------------------
def test_failed_checkpoint_write_is_one_clear_error_and_earlier_ones_stay(tmp_path, monkeypatch, capfd):
  # Simulated, so it runs anywhere: the array write inside Orbax's background save fails as on a full disk.
  from orbax.checkpoint._src.serialization import serialization
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, best_metric=None)
  ckpt.save(3, _small_state())
  ckpt.save(6, _small_state())

  async def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  ckpt.manager.wait_until_finished()
  monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk)
  ckpt.save(9, _small_state())   # starts; fails in the background
  with pytest.raises(checkpoint_lib.CheckpointWriteError,
                     match=r"checkpoint step 9 could not be written to .*: the disk is full \(No space left on device\)"
                           r"\. Stopped; the checkpoints saved before it are intact \(newest: step 6\)"):
    ckpt.save(12, _small_state())   # ...and surfaces here (or at close)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]   # no partial step 9 left
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  messages = []
  again = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, best_metric=None,
                                      log=messages.append)
  step, state = again.restore_latest(_small_state())
  again.close()
  assert step == 6 and not messages   # verified intact


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
  return out.returncode == 0, out.stderr.strip()


def test_full_disk_is_one_clear_error_and_resume_works_on_a_real_tmpfs(saved_run, tmp_path):
  size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(saved_run, "checkpoints", "20", "**"),
                                                   recursive=True) if os.path.isfile(p))
  mount = tmp_path / "fs"
  ok, why = _mount_tmpfs(mount, f"{int(2.5 * size) // 1024}k")   # room for two checkpoints, not a third
  if not ok:
    pytest.skip(f"cannot mount a tmpfs here ({why}); "
                "test_failed_checkpoint_write_is_one_clear_error_and_earlier_ones_stay covers the same path")
  try:
    workdir = str(mount / "run")
    args = TINY + ["--workdir", workdir, "--config.total_steps=12"]
    out = run_cli(args)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _error_lines(out.stderr)
    assert len(errors) == 1, out.stderr[-5000:]
    assert errors[0].startswith(f"error: checkpoint step 9 could not be written to {workdir}/checkpoints: the disk "
                                f"is full (No space left on device). Stopped; the checkpoints saved before it are "
                                f"intact (newest: step 6)"), errors
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]   # no partial step left
    subprocess.run(["mount", "-o", f"remount,size={4 * size // 1024}k", str(mount)], check=True)
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints step 6" in out.stdout and "damaged" not in out.stdout
    assert [r["step"] for r in metrics_lib.read(workdir)] == list(range(1, 13))
  finally:
    subprocess.run(["umount", str(mount)], capture_output=True)
