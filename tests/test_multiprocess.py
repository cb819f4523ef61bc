"""Several processes on JAX's multi-controller runtime (transfer/distributed.py): the launch flags and the
environments that imply them, and the same run on 2 local CPU processes (JAX's gloo collectives) and on 1."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, devices_env, restore_checkpoint, run_cli
from transfer import distributed, metrics as metrics_lib, rules


# ----------------------------------------------------------------------------------------------------------------
# The launch.

def test_flags_and_cluster_environments_decide_the_launch():
  assert distributed.launch_kwargs(None, None, None, {}) == (None, "one process")
  assert distributed.launch_kwargs(None, 1, None, {})[0] is None
  kwargs, how = distributed.launch_kwargs("10.0.0.2:8476", 4, 3, {})
  assert kwargs == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
  assert how == "process 3 of 4, coordinator 10.0.0.2:8476"
  # Environments that start one process per host: JAX reads the rest from them.
  assert distributed.launch_kwargs(None, None, None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == (
      {}, "a SLURM job (from the environment)")
  assert distributed.launch_kwargs(None, None, None, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})[0] == {}
  assert distributed.launch_kwargs(None, None, None, {"OMPI_COMM_WORLD_SIZE": "2"})[0] == {}
  # ... but not one task of SLURM, or a single-host TPU.
  assert distributed.launch_kwargs(None, None, None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})[0] is None
  assert distributed.launch_kwargs(None, None, None, {"TPU_WORKER_HOSTNAMES": "localhost"})[0] is None


@pytest.mark.parametrize("flags, message", [
    (("localhost:1234", 2, None), "--process_id missing"),
    ((None, 2, 0), "--coordinator missing"),
    (("localhost", 2, 0), "--coordinator 'localhost' is not HOST:PORT"),
    (("localhost:99999", 2, 0), "is not HOST:PORT"),
    (("localhost:1234", 2, 2), "--process_id 2 must be in 0..1"),
    (("localhost:1234", 0, 0), "--num_processes 0 must be at least 1"),
])
def test_bad_launch_flags_name_the_flag(flags, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    distributed.launch_kwargs(*flags, {})


def test_a_bad_launch_is_an_error_before_any_work(tmp_path):
  out = run_cli(["--config", "tests/tiny_config.py", "--workdir", str(tmp_path / "w"), "--coordinator",
                 "localhost:1234", "--num_processes", "2", "--process_id", "2"])
  assert out.returncode == 1, out.stderr[-2000:]
  assert "error: --process_id 2 must be in 0..1 (--num_processes 2)" in out.stderr
  assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------------------------------
# Two processes.

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(args, n, devices_each, timeout=600, per_process=None):
  """``python -m transfer.train ARGS`` as ``n`` processes of one job (``devices_each`` simulated CPU devices each),
  on this machine; returns their CompletedProcess-like results, by process index. ``per_process(i)``: more
  arguments for process ``i`` only (or arguments that replace the launch flags: a launch gone wrong)."""
  coordinator = f"localhost:{_free_port()}"
  env = {**os.environ, "PYTHONPATH": ROOT, **devices_env(devices_each)}
  launch = lambda i: ["--coordinator", coordinator, "--num_processes", str(n), "--process_id", str(i)]
  procs = [subprocess.Popen([sys.executable, "-m", "transfer.train", *args, *launch(i),
                             *(per_process(i) if per_process else [])], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return outs


@pytest.mark.long
def test_processes_launched_with_different_counts_or_configs_all_stop_with_the_reason(tmp_path):
  args = ["--config", "tests/tiny_config.py:vit", "--workdir", str(tmp_path / "w")]
  counts = run_processes(args, n=2, devices_each=1, timeout=120,
                         per_process=lambda i: ["--num_processes", "3"] if i == 1 else [])
  for out in counts:
    assert out.returncode == 1, out.stderr[-2000:]
    assert "error: --num_processes differs between the processes: [2, 3] (by --process_id)" in out.stderr
  configs = run_processes(args, n=2, devices_each=1, timeout=120,
                          per_process=lambda i: ["--config.seed=7"] if i == 1 else [])
  for out in configs:
    assert out.returncode == 1, out.stderr[-2000:]
    assert "error: the config differs between the processes: process 1 has another than process 0's" in out.stderr
  assert not os.path.exists(tmp_path / "w" / "config.json")   # stopped before anything was written
  # A check only process 0 makes (the workdir lock, here held by this test) stops both at once.
  from transfer import workdir_lock
  workdir_lock.acquire(str(tmp_path / "w"), print)
  try:
    busy = run_processes(args, n=2, devices_each=1, timeout=120)
  finally:
    workdir_lock.release(str(tmp_path / "w"))
  assert busy[0].returncode == 1 and "is in use by" in busy[0].stderr, busy[0].stderr[-2000:]
  assert busy[1].returncode == 1, busy[1].stderr[-2000:]
  assert "error: process 0 stopped at start (its error is in its own output); stopping too" in busy[1].stderr


@pytest.mark.long
def test_two_processes_reach_the_one_process_result_and_resume_on_one(lm_folder, tmp_path):
  """FSDP over 4 devices: 2 processes x 2 devices, against 1 process x 4 devices (the same mesh, so the same
  program; only the collectives differ: gloo between processes). Then a 2-process run killed after its step-4
  save started resumes on 1 process and reaches the same parameters."""
  folder, text = lm_folder
  args = ["--config", f"tests/tiny_lm_config.py:model={folder},text={text},sharding=fsdp",
          "--config.mesh.data=1", "--config.mesh.fsdp=4"]
  one = run_cli(args + ["--workdir", str(tmp_path / "one")], env_extra=devices_env(4))
  assert one.returncode == 0, one.stderr[-3000:]
  two = run_processes(args + ["--workdir", str(tmp_path / "two")], n=2, devices_each=2)
  for i, out in enumerate(two):
    assert out.returncode == 0, (i, out.stderr[-3000:])
  assert "launch: process 0 of 2, coordinator localhost:" in two[0].stdout
  assert "results:" in two[0].stdout and "results:" not in two[1].stdout   # process 0 reports
  results = {name: json.load(open(tmp_path / name / "results.json")) for name in ("one", "two")}
  assert (results["two"]["devices"], results["two"]["processes"]) == (4, 2)
  assert (results["one"]["devices"], results["one"]["processes"]) == (4, 1)
  # Process 0 alone wrote the run's files: one metrics row per step, one TensorBoard file.
  rows = {name: metrics_lib.read(str(tmp_path / name)) for name in ("one", "two")}
  assert [r["step"] for r in rows["two"]] == [1, 2, 3, 4, 5, 6]
  assert len([n for n in os.listdir(tmp_path / "two") if n.startswith("events.out.tfevents")]) == 1
  # Float32, the same program with another all-reduce: losses within 1e-5 relative, gradient norms 1e-4, the
  # final perplexity 1e-4, every parameter within 1e-6 absolute (measured: 6e-8).
  for r1, r2 in zip(rows["one"], rows["two"]):
    assert r2["train/loss"] == pytest.approx(r1["train/loss"], rel=1e-5)
    assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
  assert results["two"]["eval/perplexity"] == pytest.approx(results["one"]["eval/perplexity"], rel=1e-4)
  assert rows["one"][-1]["train/loss"] < rows["one"][0]["train/loss"] - 0.05   # it learnt: the loss fell
  final_one, final_two = (rules.flatten(restore_checkpoint(tmp_path / n)["trainable"]) for n in ("one", "two"))
  assert final_one.keys() == final_two.keys()
  for k, v in final_one.items():
    np.testing.assert_allclose(final_two[k], v, rtol=0, atol=1e-6, err_msg=k)

  # Killed (both processes, like a preempted job) after the step-4 save started; resumed on one process.
  killed = run_processes(args + ["--workdir", str(tmp_path / "killed"), "--config.fault.kill_at_step=4"], n=2,
                         devices_each=2)
  assert [out.returncode for out in killed] == [-signal.SIGKILL] * 2, killed[0].stderr[-3000:]
  resumed = run_cli(args + ["--workdir", str(tmp_path / "killed")], env_extra=devices_env(4))
  assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
  final_resumed = rules.flatten(restore_checkpoint(tmp_path / "killed")["trainable"])
  for k, v in final_one.items():
    np.testing.assert_allclose(final_resumed[k], v, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.long
def test_feature_cache_is_extracted_over_both_processes_devices_and_written_once(tmp_path):
  """A frozen backbone's features (the two-block test ViT, digits) extracted with the batch split over 2 processes x
  2 devices equal the 1-process extraction, are written once (by process 0), and the head trains alike."""
  args = ["--config", "tests/tiny_config.py:vit", "--config.mesh.data=-1",
          "--config.param_rules=[('head/.*', {}), ('.*', {'freeze': True})]"]
  one = run_cli(args + ["--workdir", str(tmp_path / "one")], env_extra=devices_env(4))
  assert one.returncode == 0, one.stderr[-3000:]
  two = run_processes(args + ["--workdir", str(tmp_path / "two")], n=2, devices_each=2)
  for i, out in enumerate(two):
    assert out.returncode == 0, (i, out.stderr[-3000:])
  assert two[0].stdout.count("extracted to") == 2 and "extracted to" not in two[1].stdout
  files = sorted(os.listdir(tmp_path / "one" / "features"))
  assert len(files) == 2 and sorted(os.listdir(tmp_path / "two" / "features")) == files   # same keys, no temp files
  for name in files:
    a, b = np.load(tmp_path / "one" / "features" / name), np.load(tmp_path / "two" / "features" / name)
    assert a.shape[0] in (100, 360) and np.abs(a).max() > 0
    # Each example's forward runs on one device. Bit for bit while YNNPACK ran the ViT's matmuls; with XLA's own
    # (the family's compiler options since 2026-12-07) 5% of the values differ in the last bits: 9.5e-7 at most.
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))
  results = [json.load(open(tmp_path / n / "results.json")) for n in ("one", "two")]
  assert results[0]["feature_cache"] and results[1]["feature_cache"] and results[1]["processes"] == 2
  assert results[1]["eval/loss"] == pytest.approx(results[0]["eval/loss"], rel=1e-6)
