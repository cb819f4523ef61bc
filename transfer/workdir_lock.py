"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/.lock``, held for the run's life.

The lock file holds its holder (pid, host, start time, argv) as one JSON line, so a second launch can name it.
The kernel releases a flock when its process dies, however it dies; a run that ends normally also empties the file.
So a free lock over a non-empty file is a stale one (its run was killed): it is taken over with a message. The file
is never deleted (deleting a locked path would let two runs lock two different files of the same name).

Within one process, a workdir whose lock this process already holds (a ``train()`` call that ended in an exception
before releasing it) is simply reused.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable

LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}   # realpath of the workdir -> file descriptor of its held lock


class WorkdirBusy(OSError):
  """Another live run holds the workdir (message: who)."""


def _describe(info: dict) -> str:
  if not info:
    return "a run that has not written its details yet"
  argv = " ".join(info.get("argv") or [])
  return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
          + (f" ({argv})" if argv else "") + (f"; {info['note']}" if info.get("note") else ""))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's live process
    return True
  return True


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
  try:
    info = json.loads(text) if text else {}
  except ValueError:
    info = {"pid": "?", "note": text[:200]}
  return info if isinstance(info, dict) else {}


def acquire(workdir: str, log: Callable[[str], None] = print) -> None:
  """Takes ``WORKDIR/.lock`` for this process, or raises ``WorkdirBusy`` naming the run that holds it."""
  key = os.path.realpath(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  if key in _HELD:
    _write_holder(_HELD[key])
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      os.close(fd)
      raise
    info = _read(fd)
    for _ in range(10):   # the holder may be between taking the lock and writing its details
      if info:
        break
      time.sleep(0.1)
      info = _read(fd)
    os.close(fd)
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
      info["note"] = f"pid {info['pid']} has exited, but a process it started still holds the lock (fuser {path})"
    raise WorkdirBusy(f"--workdir {workdir!r} is in use by another run: {_describe(info)}. Two runs in one workdir "
                      f"would overwrite each other's checkpoints and metrics: wait for it to end, stop it, or use "
                      f"another --workdir (lock file: {path})") from None
  previous = _read(fd)
  if previous:
    log(f"workdir lock: taking over {path} from a run that ended without releasing it (killed?): "
        f"{_describe(previous)}")
  try:
    _write_holder(fd)
  except OSError as e:   # e.g. a full disk: no half-taken lock left behind
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    raise OSError(e.errno, f"cannot write the workdir lock {path}: {e.strerror}") from None
  _HELD[key] = fd


def _write_holder(fd: int) -> None:
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": list(sys.argv)}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(info) + "\n").encode())
  os.fsync(fd)


def release(workdir: str) -> None:
  """Empties and unlocks ``WORKDIR/.lock`` if this process holds it (an empty file: the last run ended normally)."""
  fd = _HELD.pop(os.path.realpath(workdir), None)
  if fd is None:
    return
  try:
    os.ftruncate(fd, 0)
  except OSError:   # a full disk cannot stop the unlock
    pass
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def release_all() -> None:
  for key in list(_HELD):
    release(key)
