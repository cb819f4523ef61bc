"""transfer.tb_events writes TensorBoard files that tensorboardX's own Event protocol buffer reads back."""
import glob
import struct

import numpy as np
import pytest

from transfer import tb_events


def test_crc32c_matches_the_standard_check_value():
  # The CRC-32C (Castagnoli) check value of b"123456789" (RFC 3720, appendix B.4); the empty string gives 0.
  assert tb_events.crc32c(b"123456789") == 0xE3069283
  assert tb_events.crc32c(b"") == 0


def _records(path):
  """The payloads of a TFRecord file, each checked against its masked CRCs."""
  data, out, i = open(path, "rb").read(), [], 0
  while i < len(data):
    length_bytes = data[i:i + 8]
    (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack("<I", data[i + 8:i + 12])
    assert length_crc == tb_events._masked_crc(length_bytes)
    payload = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == tb_events._masked_crc(payload)
    out.append(payload)
    i += 16 + length
  assert i == len(data)
  return out


def test_scalars_read_back_through_tensorboardx_protobuf(tmp_path):
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  writer = tb_events.EventWriter(str(tmp_path))
  writer.scalars(1, {"train/loss": 2.5, "lr": 1e-3})
  writer.scalars(2**40, {"eval/accuracy": 0.875})   # a step past 32 bits: a multi-byte varint
  writer.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  events = [event_pb2.Event.FromString(p) for p in _records(path)]
  assert events[0].file_version == "brain.Event:2"
  got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
  assert got == [(1, "train/loss", 2.5), (1, "lr", np.float32(1e-3)), (2**40, "eval/accuracy", 0.875)]
  assert all(e.wall_time > 1.6e9 for e in events)
