"""TensorBoard event files of scalars, written directly: no TensorFlow, tensorboardX or torch import.

tensorboardX imports torch when it is installed, 2-4 s at every launch for files that only hold scalars. The
format is small: a TFRecord stream (length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload) of ``Event`` protocol buffers, here encoded by hand for the three fields a scalar needs:

  Event     {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
  Summary   {1: value repeated Value}
  Value     {1: tag string, 2: simple_value float}
"""
from __future__ import annotations

import os
import socket
import struct
import time

_CRC32C_TABLE = []
for _byte in range(256):
  _crc = _byte
  for _ in range(8):
    _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1   # Castagnoli polynomial, reflected
  _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1   # negative int64 as protobuf does: ten bytes of two's complement
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
  out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + bytes([2 << 3 | 5])
                                        + struct.pack("<f", value)) for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


def _record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class EventWriter:
  """Appends scalars to ``DIR/events.out.tfevents.<time>.<host>.<pid>`` (a new file per process, as TensorBoard
  expects: a resumed run's file continues the curves), flushed at every write."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                                        f"{os.getpid()}")
    self._file = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, payload: bytes) -> None:
    self._file.write(_record(payload))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(_event(time.time(), int(step), scalars={k: float(v) for k, v in values.items()}))

  def close(self) -> None:
    self._file.close()
