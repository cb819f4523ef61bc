"""Multi-process runs on JAX's multi-controller runtime: one process per host (a TPU pod slice's workers, the
tasks of a SLURM job, or local CPU processes for tests), every process running the same program.

How the trainer uses it:

- ``initialize`` is called once, before JAX touches a device, when the launch asks for more than one process:
  ``--coordinator HOST:PORT --num_processes N --process_id I`` on the command line, or an environment that says
  so (``launch_kwargs``: a TPU pod slice, a SLURM job with several tasks, Open MPI, ``JAX_COORDINATOR_ADDRESS``).
- Each process builds the same global batch (a pure function of seed and step, so resume stays exact) and puts
  only its own devices' rows on them (``jax.device_put`` with the mesh's sharding does exactly that).
- Process 0 alone writes the run's files (``is_main``); checkpoints are written by every process together
  (Orbax), on a filesystem all processes see.
- ``to_host`` reads arrays that are split across processes (gathered, every process gets the whole value);
  ``agree`` checks that every process holds the same value (the config) and ``broadcast`` takes process 0's.
On one process all of these are plain local operations: no collective runs.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

# Environments that start one process per host and that ``jax.distributed.initialize()`` reads by itself.
CLUSTER_ENVIRONMENTS = (
    ("a TPU pod slice", lambda env: "," in env.get("TPU_WORKER_HOSTNAMES", "")),
    ("a SLURM job", lambda env: int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env),
    ("Open MPI", lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1),
    ("JAX_COORDINATOR_ADDRESS", lambda env: bool(env.get("JAX_COORDINATOR_ADDRESS"))),
)
INIT_TIMEOUT_SECONDS = 300


class LaunchError(RuntimeError):
  """The processes of a launch could not find each other (a wrong address, a process that never started)."""


def launch_kwargs(coordinator: str | None, num_processes: int | None, process_id: int | None,
                  environ: Mapping[str, str] = os.environ) -> tuple[dict | None, str]:
  """(the arguments for ``jax.distributed.initialize``, or None for a single process; how it was decided).

  The flags win; without them, an environment from ``CLUSTER_ENVIRONMENTS`` gives ``{}`` (JAX reads the
  coordinator, the process count and this process's index from it). Bad flags are a ValueError naming them."""
  given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
  if all(v is None for v in given.values()):
    for name, present in CLUSTER_ENVIRONMENTS:
      if present(environ):
        return {}, f"{name} (from the environment)"
    return None, "one process"
  if num_processes == 1 and coordinator is None and process_id in (None, 0):
    return None, "one process (--num_processes 1)"
  if missing := [flag for flag, v in given.items() if v is None]:
    raise ValueError(f"{', '.join(missing)} missing: a multi-process launch gives --coordinator HOST:PORT, "
                     "--num_processes N and --process_id I (0..N-1) to every process")
  if not re.fullmatch(r"[^\s:]+:\d{1,5}", coordinator) or not 0 < int(coordinator.rsplit(":", 1)[1]) < 65536:
    raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT (the address of process 0, e.g. "
                     "10.0.0.2:8476)")
  if num_processes < 1:
    raise ValueError(f"--num_processes {num_processes} must be at least 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id {process_id} must be in 0..{num_processes - 1} (--num_processes "
                     f"{num_processes})")
  return ({"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id},
          f"process {process_id} of {num_processes}, coordinator {coordinator}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, environ: Mapping[str, str] = os.environ, timeout: int = INIT_TIMEOUT_SECONDS) -> str:
  """Starts JAX's distributed runtime when the launch asks for several processes (see ``launch_kwargs``);
  returns how the run was launched, in words. Must run before anything uses a device.

  Every process checks that the others were given the same process count: a launch whose processes disagree
  is an error on all of them, not a hang."""
  kwargs, how = launch_kwargs(coordinator, num_processes, process_id, environ)
  if kwargs is None:
    return how
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
  except Exception as e:   # noqa: BLE001 - the runtime raises its own types for a coordinator that never answered
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise LaunchError(f"jax.distributed.initialize ({how}) failed: {first}. Every process must be started with "
                       f"the same --coordinator and --num_processes, and process 0 must be reachable there "
                       f"(waited up to {timeout} s)") from None
  if num_processes is not None:
    counts = all_values(np.int64(num_processes))
    if len(set(counts.tolist())) > 1:
      raise ValueError(f"--num_processes differs between the processes: {counts.tolist()} (by --process_id); give "
                       f"every process the same count")
  return (f"{how}: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
          f"{jax.device_count()} devices here")


def process_count() -> int:
  """The number of processes (1 unless the distributed runtime was started); touches no device."""
  return jax.process_count() if jax.distributed.is_initialized() else 1


def is_main() -> bool:
  """Process 0: the one that writes the run's files and prints its progress. Touches no device, so it can be
  asked before ``initialize``."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def progress_disabled() -> bool | None:
  """tqdm's ``disable``: None (shown on a terminal) on process 0, off elsewhere."""
  return None if is_main() else True


def all_values(value: np.ndarray) -> np.ndarray:
  """Every process's ``value`` (same shape and dtype everywhere), stacked by process index."""
  value = np.asarray(value)
  if process_count() == 1:
    return value[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def broadcast(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (a decision made where the files are written: a best step)."""
  if process_count() == 1:
    return np.asarray(value)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def agree(what: str, text: str) -> None:
  """A ValueError on every process unless every process holds the same ``text`` (``what`` names it)."""
  if process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  every = all_values(digest)
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    raise ValueError(f"{what} differs between the processes: process {', '.join(map(str, differ))} "
                     f"{'has' if len(differ) == 1 else 'have'} another than process 0's; launch every process "
                     f"with the same command line")


def fail_together(error: BaseException | None) -> None:
  """Raises ``error`` here and, on every other process, a ValueError naming the process that failed: a check
  only one process makes (process 0's workdir lock) stops them all at once, rather than leaving the others to
  wait in the next collective until JAX's heartbeat gives up."""
  if process_count() > 1:
    failed = np.flatnonzero(all_values(np.bool_(error is not None)))
    if error is None and len(failed):
      raise ValueError(f"process {', '.join(map(str, failed))} stopped at start (its error is in its own output); "
                       "stopping too")
  if error is not None:
    raise error


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (after process 0 wrote or moved files the others read)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """``tree`` as numpy arrays, whole: arrays split across processes are gathered (every process gets the whole
  value), the others read from a local copy as ``jax.device_get`` does."""
  if process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree.map(one, tree)
