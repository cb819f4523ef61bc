"""Orbax checkpoints under ``WORKDIR/checkpoints``: the last K, plus the best by an eval metric; verified on restore.

- Atomic: Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
  leaves the previous checkpoints intact and the partial one is ignored.
- Verified: each save records a SHA-256 digest of every array in the step's ``_CHECKPOINT_METADATA`` (written
  inside the temporary directory, so committed with the arrays). ``restore_latest`` compares the saved layout with
  the config's first (a different one is "does not fit this config", an error), then restores and recomputes the
  digests. A newest checkpoint that cannot be read, fails its digests or holds non-finite values is damage: it is
  moved (never deleted) to ``WORKDIR/checkpoints_damaged/<step>-<reason>`` and the next newest is tried.
- Finite: a save first reads the step's non-finite flag (``state['nonfinite_step']``) and checks every float array
  it is about to write; either stops the run (``NonFiniteError``) before anything is written.
- One clear error: a failed write (a full disk, a quota) surfaces at the next save or at ``close`` as one
  ``CheckpointWriteError`` naming the step, the cause and the newest intact checkpoint; Orbax's own error logs
  and the asyncio noise of its aborted writes are kept off the console.
- Several processes: every process saves and restores together (each writes its own shards, on a filesystem all
  of them see), computes the same digests of the whole arrays and so reaches the same verdict on damage; process
  0 alone moves files. A checkpoint restores on any process count whose mesh fits the saved shapes.
"""
from __future__ import annotations

import errno as errno_lib
import gc
import glob
import hashlib
import logging
import math
import os
import re
import shutil
import sys
import weakref
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from transfer import distributed

DAMAGED_DIR = "checkpoints_damaged"   # beside WORKDIR/checkpoints


class NonFiniteError(FloatingPointError):
  """The loss, gradient norm or train state stopped being finite; raised before any save (message: the report)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (message: the step, the cause and the newest intact checkpoint)."""


# ----------------------------------------------------------------------------------------------------------------
# Digests, finiteness and the saved layout, keyed by "/"-joined tree paths ("opt_state/1/inner_states/...").
# ----------------------------------------------------------------------------------------------------------------
def _key(entry) -> str:
  for attr in ("key", "name", "idx"):   # DictKey, GetAttrKey (namedtuple fields), SequenceKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat(tree) -> dict[str, Any]:
  return {"/".join(_key(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def array_digests(host_tree) -> dict[str, str]:
  """SHA-256 of each array's bytes (host numpy arrays; dtype and shape are checked separately, from metadata)."""
  out = {}
  for path, leaf in _flat(host_tree).items():
    a = np.ascontiguousarray(leaf)
    out[path] = hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()
  return out


def nonfinite_paths(host_tree) -> list[str]:
  """Paths of float arrays holding a NaN or an infinity, and of a set non-finite flag (``nonfinite_step`` != 0)."""
  bad = []
  for path, leaf in _flat(host_tree).items():
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact):
      if not np.isfinite(a).all():
        bad.append(path)
    elif path == "nonfinite_step" and a.any():
      bad.append(path)
  return bad


def _layout(tree) -> dict[str, tuple]:
  return {p: (tuple(v.shape), str(np.dtype(v.dtype))) for p, v in _flat(tree).items()
          if hasattr(v, "shape") and hasattr(v, "dtype")}


def _layout_difference(saved: dict, expected: dict, limit: int = 4) -> str:
  """'' when equal, else a short list of the differences."""
  def some(paths):
    paths = sorted(paths)
    return ", ".join(paths[:limit]) + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")
  parts = []
  if missing := set(expected) - set(saved):
    parts.append(f"not in the checkpoint: {some(missing)}")
  if extra := set(saved) - set(expected):
    parts.append(f"not in this config: {some(extra)}")
  if changed := [p for p in set(saved) & set(expected) if saved[p] != expected[p]]:
    p = sorted(changed)[0]
    parts.append(f"{len(changed)} with another shape or dtype, e.g. {p}: checkpoint {saved[p][0]} {saved[p][1]}, "
                 f"config {expected[p][0]} {expected[p][1]}")
  return "; ".join(parts)


def _first_line(e: BaseException, limit: int = 300) -> str:
  """The error's first line, without TensorStore's spec dumps."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = re.split(r" \[tensorstore_spec=| See full TensorStore details", text)[0].rstrip(". ")
  return text if len(text) <= limit else text[:limit] + "..."


def _write_failure_cause(e: BaseException) -> str:
  """The cause of a failed write in words: Orbax reports TensorStore's OS errors inside a ValueError's text."""
  chain, seen = [], e
  while seen is not None and len(chain) < 8:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  codes = [x.errno for x in chain if isinstance(x, OSError) and x.errno]
  text = " ".join(str(x) for x in chain)
  codes += [int(c) for c in re.findall(r"os_error_code='?(\d+)", text)]
  if errno_lib.ENOSPC in codes or "No space left on device" in text:
    return "the disk is full (No space left on device)"
  if errno_lib.EDQUOT in codes or "Disk quota exceeded" in text:
    return "the disk quota is exhausted (Disk quota exceeded)"
  if errno_lib.EFBIG in codes or "File too large" in text:
    return "a file exceeds the size limit (File too large)"
  return _first_line(e)


# ----------------------------------------------------------------------------------------------------------------
# Orbax's console noise after a failed write or read: its error logs (the failure is raised to us and reported
# once), asyncio's "Task/Future exception was never retrieved" for Orbax's own writes (the same failure, seen
# again when the task or future is collected), and "Event loop is closed" from TensorStore callbacks that outlive an aborted loop.
# ----------------------------------------------------------------------------------------------------------------
class _OrbaxErrorLogs(logging.Filter):
  """Holds back Orbax's ERROR records; ``Checkpointer.close`` prints any that no raised error accounted for."""

  def __init__(self):
    super().__init__()
    self.held: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage() if record.name == "asyncio" else ""
    orbax_task = "never retrieved" in message and ("orbax" in message or "OCDBT" in message)
    if record.levelno >= logging.ERROR and (orbax_task or f"{os.sep}orbax{os.sep}" in record.pathname):
      self.hold(record.getMessage())
      return False
    return True

  def hold(self, message: str) -> None:
    if len(self.held) < 20:
      self.held.append(message)

  def take(self) -> list[str]:
    held, self.held = self.held, []
    return held


_ORBAX_ERRORS = _OrbaxErrorLogs()
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _raised_in_orbax(tb) -> bool:
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _quiet_orbax_noise() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _ORBAX_ERRORS not in logger.filters:
      logger.addFilter(_ORBAX_ERRORS)
  previous = sys.unraisablehook
  if getattr(previous, "_transfer_quiet", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    if _raised_in_orbax(unraisable.exc_traceback):   # e.g. a read coroutine of a restore that already failed
      _ORBAX_ERRORS.hold(_first_line(unraisable.exc_value, 200))
      return
    previous(unraisable)

  hook._transfer_quiet = True
  sys.unraisablehook = hook


def close_all() -> None:
  """Closes every open Checkpointer (waiting for its save), quietly: for a run that stops on an error."""
  for ckpt in list(_OPEN):
    try:
      ckpt.close()
    except Exception:   # noqa: BLE001 - already stopping on an error, which the caller reports
      pass


class Checkpointer:

  def __init__(self, directory: str, *, keep_last: int, best_metric: str | None, best_mode: str = "max",
               log: Callable[[str], None] = print):
    if best_mode not in ("max", "min"):
      raise ValueError(f"config.checkpoint.best_mode: {best_mode!r} is not 'max' or 'min'")
    keep = [policies.LatestN(n=keep_last)]
    if best_metric:
      keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                 keep_checkpoints_without_metrics=False))
    _quiet_orbax_noise()
    self.best_metric, self.log = best_metric, log
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                             create=True))
    self._in_flight: int | None = None   # the step of the save that may still be writing
    self._closed = False
    _OPEN.add(self)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # --------------------------------------------------------------------------------------------------------------
  # Saving.
  # --------------------------------------------------------------------------------------------------------------
  def check_finite(self, step: int, state: Any, row: dict | None = None) -> None:
    """Stops the run (``NonFiniteError``, after the pending save completes) if the train step flagged a non-finite
    loss or gradient norm (``state['nonfinite_step']``: one scalar read) or ``row`` (a metrics row) holds one."""
    flag = state.get("nonfinite_step") if isinstance(state, dict) else None
    first = int(jax.device_get(flag)) if flag is not None else 0
    bad = {k: row[k] for k in ("train/loss", "grad_norm") if k in (row or {}) and not math.isfinite(row[k])}
    if not first and not bad:
      return
    first = first or step
    if first == step and bad:
      what = ", ".join(f"{k} is {v}" for k, v in bad.items())
    elif first == step:
      what = "the loss or the gradient norm is not finite (not a logged step)"
    else:
      what = (f"the loss or the gradient norm is not finite (not a logged step); the steps since left the "
              f"parameters unchanged, stopped at step {step}")
    self._stop_nonfinite(f"step {first}: {what}")

  def _stop_nonfinite(self, what: str) -> None:
    try:
      self.close()   # the save in flight (of finite values) completes
      also = ""
    except CheckpointWriteError as e:
      also = f" (Also: {e})"
    last = self.latest_step()
    where = (f"the last good checkpoint is step {last} in {self.directory}: relaunching with the same --workdir "
             f"resumes from it" if last else "no checkpoint was saved before it: relaunching starts from step 0")
    raise NonFiniteError(f"training stopped, non-finite at {what}. Nothing non-finite was saved; {where}. If it "
                         f"recurs: a lower config.schedule.lr, config.optimizer.grad_clip_norm, or check the data."
                         f"{also}")

  def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
    """Starts an (asynchronous) save of finite values with their digests; ``metrics`` rank it for the best-checkpoint
    policy. Raises ``NonFiniteError`` (nothing written) or ``CheckpointWriteError`` (the previous save failed)."""
    self.check_finite(step, state)
    host = distributed.to_host(state)   # every process: the digests are of the whole arrays
    if bad := nonfinite_paths(host):
      self._stop_nonfinite(f"step {step}: non-finite values in the train state at "
                           f"{', '.join(bad[:4])}{f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''}")
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    self._wait_for_previous()
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True,
                        custom_metadata={"array_sha256": array_digests(host)})
    except Exception as e:   # noqa: BLE001 - Orbax and TensorStore raise OS failures as many types
      raise self._write_failed(e, step) from None
    self._in_flight = step

  def _wait_for_previous(self) -> None:
    """Waits for the save in flight (as Orbax would before the next one) and raises its failure as ours."""
    if self._in_flight is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:   # noqa: BLE001 - as in save
      raise self._write_failed(e, self._in_flight) from None
    self._in_flight = None

  def _write_failed(self, e: BaseException, step: int) -> CheckpointWriteError:
    """The one error for a failed save; the partial step is removed and the manager closed."""
    _ORBAX_ERRORS.take()
    for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    self._closed = True
    try:
      self.manager.close()
    except Exception:   # noqa: BLE001 - the failure is what we report
      pass
    _OPEN.discard(self)
    intact = sorted(s for s in self._steps_on_disk() if s != step)
    kept = (f"the checkpoints saved before it are intact (newest: step {intact[-1]}); relaunching with the same "
            f"--workdir resumes from it" if intact else "no earlier checkpoint exists")
    return CheckpointWriteError(f"checkpoint step {step} could not be written to {self.directory}: "
                                f"{_write_failure_cause(e)}. Stopped; {kept}.")

  def wait(self) -> None:
    """Waits for the save in flight; raises ``CheckpointWriteError`` if it failed."""
    self._wait_for_previous()

  def _steps_on_disk(self) -> list[int]:
    return [int(n) for n in os.listdir(self.directory) if n.isdigit()] if os.path.isdir(self.directory) else []

  def close(self) -> None:
    """Waits for the save in flight; raises ``CheckpointWriteError`` if it failed. Idempotent."""
    if self._closed:
      return
    self._wait_for_previous()
    self._closed = True
    self.manager.close()
    _OPEN.discard(self)
    for message in _ORBAX_ERRORS.take():   # errors Orbax logged without raising them: shown, not lost
      self.log(f"orbax: {message}")

  # --------------------------------------------------------------------------------------------------------------
  # Restoring.
  # --------------------------------------------------------------------------------------------------------------
  def restore(self, step: int, like: Any) -> Any:
    """Restores ``step`` into the structure, dtypes and shardings of ``like`` (unverified: see restore_latest)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_verified(self, step: int, like: Any) -> Any:
    """Checkpoint ``step`` into ``like``'s structure, checked as ``restore_latest`` checks (digests, finite); a
    ValueError naming the step if it is not intact."""
    self._wait_for_previous()
    reason, detail, restored = self._verified(step, like)
    if reason is not None:
      raise ValueError(f"checkpoint step {step} in {self.directory} {detail}")
    return restored

  def restore_latest(self, like: Any) -> tuple[int, Any]:
    """(step, state) of the newest good checkpoint, or (0, ``like``) when there is none.

    Damaged checkpoints met on the way are set aside with a message; one whose saved layout differs from ``like``'s
    is a ValueError ("does not fit this config"), since an older one would not fit either."""
    workdir = os.path.dirname(self.directory)
    expected = _layout(like)
    set_aside = 0
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.manager.item_metadata(step)
        saved = _layout(getattr(meta, "tree", meta)) if meta is not None else None
      except Exception as e:   # noqa: BLE001 - TensorStore and Orbax raise many types for unreadable files
        saved, unreadable = None, _first_line(e, 200)
      else:
        unreadable = "its array metadata (default/_METADATA) is missing or unreadable"
      if not saved:
        self._set_aside(step, "unreadable", f"cannot be read: {unreadable}")
        set_aside += 1
        continue
      if difference := _layout_difference(saved, expected):
        raise ValueError(f"--workdir {workdir!r} holds a checkpoint (step {step}) that does not fit this config "
                         f"(another model, rules or optimizer?); use a new workdir. Differences: {difference}")
      reason, detail, restored = self._verified(step, like)
      if reason is None:
        _ORBAX_ERRORS.take()
        return step, restored
      self._set_aside(step, reason, detail)
      set_aside += 1
    _ORBAX_ERRORS.take()
    if set_aside:
      self.log(f"no usable checkpoint left in {self.directory} ({set_aside} set aside in "
               f"{os.path.join(workdir, DAMAGED_DIR)}): starting from step 0")
    return 0, like

  def _verified(self, step: int, like: Any) -> tuple[str | None, str, Any]:
    """(None, '', state) for a good checkpoint, else (reason, detail, None)."""
    try:
      restored = self.restore(step, like)
      host = distributed.to_host(restored)
    except Exception as e:   # noqa: BLE001 - as in restore_latest
      gc.collect()   # the other arrays' failed reads surface now, as held Orbax noise, not later on stderr
      return "unreadable", f"cannot be read: {_first_line(e, 200)}", None
    try:
      saved_digests = self.manager.metadata(step).custom_metadata.get("array_sha256")
    except Exception:   # noqa: BLE001 - a missing or garbled _CHECKPOINT_METADATA
      saved_digests = None
    if not saved_digests:
      return "no-digest", "its array digests (_CHECKPOINT_METADATA) are missing", None
    digests = array_digests(host)
    if differ := sorted(p for p in digests if saved_digests.get(p) != digests[p]):
      return ("digest-mismatch", f"{len(differ)} of {len(digests)} arrays read back different from what was saved, "
                                 f"e.g. {', '.join(differ[:3])}", None)
    if bad := nonfinite_paths(host):
      return "nonfinite", f"non-finite values in {', '.join(bad[:3])}", None
    return None, "", restored

  def _set_aside(self, step: int, reason: str, detail: str) -> None:
    """Moves the step's directory to WORKDIR/checkpoints_damaged/<step>-<reason> (kept for inspection). With several
    processes, all came to the same verdict (each read and digested the whole state); process 0 moves it."""
    damaged = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    dest, n = os.path.join(damaged, f"{step}-{reason}"), 1
    if distributed.is_main():
      os.makedirs(damaged, exist_ok=True)
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(damaged, f"{step}-{reason}-{n}")
      shutil.move(os.path.join(self.directory, str(step)), dest)
    distributed.barrier(f"transfer.checkpoint: step {step} set aside")
    self.manager.reload()
    self.log(f"checkpoint step {step} is damaged ({detail}); moved to {dest}; trying the next newest")
