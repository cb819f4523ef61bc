"""Checkpoint readers refuse hostile or malformed files before allocating what they declare.

Each hostile file here is a few bytes to a few hundred KB, but declares (or makes the reader build) at least 128 MiB.
``refused`` runs the read under tracemalloc (which also sees numpy's buffers) and asserts that the refusal allocated
less than PEAK_CAP; the readers before these checks allocated the declared 128 MiB-4 TiB first (or, for the malformed
safetensors files, raised the library's own SafetensorError, which names neither the file nor a ValueError).
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import tracemalloc
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest

from transfer import hf, pretrained, torch_pickle

torch = pytest.importorskip("torch")

MIB = 1 << 20
PEAK_CAP = 32 * MIB  # what a refusal may allocate; the hostile files below ask for >= 128 MiB
BOMB_MIB = 128


def refused(read, *args, **kwargs) -> str:
  """The message of the ValueError ``read(*args)`` raises, after checking it allocated less than PEAK_CAP."""
  tracemalloc.start()
  try:
    with pytest.raises(ValueError) as e:
      read(*args, **kwargs)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert type(e.value) in (ValueError, torch_pickle.UnsafePickleError), repr(e.value)
  assert peak < PEAK_CAP, f"allocated {peak} bytes before refusing: {e.value}"
  return str(e.value)


# --- writing torch checkpoints by hand -------------------------------------------------------------------------------

class Storage:
  """A float32 storage record as torch.save writes it (the persistent id the unpickler sees)."""

  def __init__(self, key: str, numel: int, legacy: bool):
    self.pid = ("storage", torch.FloatStorage, key, "cpu", numel) + ((None,) if legacy else ())


class Tensor:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), any geometry we like."""

  def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


class StoragePickler(pickle.Pickler):
  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, Storage) else None


def pickled(obj) -> bytes:
  buf = io.BytesIO()
  StoragePickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def write_zip(path, entries):
  """A zip archive written field by field, so that an entry can carry a ready deflate stream: ``entries`` are
  (name, bytes) stored as is, or (name, (deflate stream, inflated size, crc32)) deflated."""
  out, central = bytearray(), bytearray()
  for name, data in entries:
    method, (body, size, crc) = (8, data) if isinstance(data, tuple) else (0, (data, len(data), zlib.crc32(data)))
    fname, offset = name.encode(), len(out)
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(body), size, len(fname), 0)
    out += fname + body
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(body), size,
                           len(fname), 0, 0, 0, 0, 0, offset) + fname
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
  path.write_bytes(bytes(out + central + end))
  return path


def deflated_zeros(prefix: bytes, mib: int, suffix: bytes):
  """(deflate stream, size, crc32) of prefix + ``mib`` MiB of zeros + suffix, about 1 KB per MiB and built in
  milliseconds: after a full flush deflate starts afresh, so each MiB of zeros compresses to the same bytes."""
  zeros, c = bytes(MIB), zlib.compressobj(9, zlib.DEFLATED, -15)
  head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
  piece = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
  tail = c.compress(suffix) + c.flush()
  crc = zlib.crc32(prefix)
  for _ in range(mib):
    crc = zlib.crc32(zeros, crc)
  return head + piece * mib + tail, len(prefix) + mib * MIB + len(suffix), zlib.crc32(suffix, crc)


def test_deflated_zeros_inflates_to_what_it_declares():
  stream, size, crc = deflated_zeros(b"head", 3, b"tail")  # guard for the bombs below, at 3 MiB
  data = zlib.decompress(stream, -15)
  assert len(data) == size == 8 + 3 * MIB and data == b"head" + bytes(3 * MIB) + b"tail"
  assert zlib.crc32(data) == crc and len(stream) < 4096


def write_checkpoint(path, obj, storages, fmt):
  """``obj`` (with Tensor/Storage placeholders) as a zip or legacy torch checkpoint; ``storages`` are
  (key, element count written, bytes) in file order (a zip entry's bytes may be a deflated_zeros tuple)."""
  if fmt == "zip":
    return write_zip(path, [("archive/data.pkl", pickled(obj)), ("archive/version", b"3\n")]
                     + [(f"archive/data/{key}", raw) for key, _, raw in storages])
  with open(path, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    f.write(pickled(obj))
    pickle.dump([key for key, _, _ in storages], f, protocol=2)
    for _, count, raw in storages:
      f.write(count.to_bytes(8, "little") + raw)
  return path


FORMATS = pytest.mark.parametrize("fmt", ["zip", "legacy"])


def test_hand_written_checkpoints_match_torch(tmp_path):
  """Guard: the writers above produce files torch itself reads as intended."""
  values = np.arange(16, dtype="<f4")
  for fmt in ("zip", "legacy"):
    storage = Storage("0", 16, legacy=fmt == "legacy")
    obj = {"w": Tensor(storage, 2, (3, 2), (4, 1))}
    path = write_checkpoint(tmp_path / f"{fmt}.pt", obj, [("0", 16, values.tobytes())], fmt)
    expected = values[2:14].reshape(3, 4)[:, :2]  # element [i, j] is values[2 + 4 i + j]
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["w"].numpy(), expected)
    np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["w"], expected)


# --- torch_pickle: views larger than their storage ------------------------------------------------------------------

@FORMATS
@pytest.mark.parametrize("size,stride", [((32 * MIB,), (0,)), ((2 * MIB, 16), (0, 1))], ids=["zero-stride",
                                                                                          "repeated-rows"])
def test_view_larger_than_its_storage_is_refused(tmp_path, fmt, size, stride):
  """A 16-element storage viewed as 32 Mi elements: in bounds for as_strided, but the copy would be 128 MiB."""
  storage = Storage("0", 16, legacy=fmt == "legacy")
  path = write_checkpoint(tmp_path / "expand.pt", {"w": Tensor(storage, 0, size, stride)},
                          [("0", 16, bytes(64))], fmt)
  message = refused(torch_pickle.load_state_dict, path)
  assert str(path) in message and "tensor 'w' has 33554432 elements" in message
  assert "storage '0' holds 16 float32" in message


def test_tensor_name_is_its_key_path(tmp_path):
  storage = Storage("0", 4, legacy=False)
  obj = {"state_dict": {"layer.weight": Tensor(storage, 0, (64,), (0,))}, "extra": [1]}
  path = write_checkpoint(tmp_path / "nested.pt", obj, [("0", 4, bytes(16))], "zip")
  assert "tensor 'state_dict/layer.weight' has 64 elements" in refused(torch_pickle.load, path)


def test_tensor_referenced_many_times_is_materialised_once(tmp_path):
  """torch.save pickles a tensor saved under 32 names once plus 32 memo references (a few bytes each)."""
  t = torch.arange(MIB, dtype=torch.float32)  # 4 MiB; 32 copies would be 128 MiB
  path = tmp_path / "shared.pt"
  torch.save({f"t{i}": t for i in range(32)}, path)
  ref = torch.load(path, weights_only=True)
  assert ref["t0"] is ref["t31"]  # guard: torch returns one tensor object for all of them
  tracemalloc.start()
  try:
    out = torch_pickle.load_state_dict(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 3 * 4 * MIB, peak  # the storage bytes, the one copy, and slack
  assert len(out) == 32 and all(out[f"t{i}"] is out["t0"] for i in range(32))
  np.testing.assert_array_equal(out["t5"], t.numpy())


# --- torch_pickle: zip entries checked before they are inflated ----------------------------------------------------

def test_zip_storage_entry_declaring_more_than_its_record_is_refused(tmp_path):
  """A 4-float storage whose zip entry inflates to 128 MiB of zeros (a 130 KB file)."""
  obj = {"w": Tensor(Storage("0", 4, legacy=False), 0, (4,), (1,))}
  path = write_checkpoint(tmp_path / "bomb.pt", obj, [("0", 4, deflated_zeros(b"", BOMB_MIB, b""))], "zip")
  assert path.stat().st_size < 256 * 1024
  message = refused(torch_pickle.load_state_dict, path)
  assert str(path) in message
  assert f"archive/data/0 declares {BOMB_MIB * MIB} bytes but its storage record expects 4 x float32 = 16" in message


def test_zip_storage_entry_shorter_than_its_record_is_refused(tmp_path):
  obj = {"w": Tensor(Storage("0", 4, legacy=False), 0, (4,), (1,))}
  path = write_checkpoint(tmp_path / "short.pt", obj, [("0", 4, bytes(8))], "zip")
  assert "archive/data/0 declares 8 bytes but its storage record expects" in refused(torch_pickle.load, path)


def test_zip_pickle_bomb_is_refused(tmp_path):
  """data.pkl deflated: a BINBYTES8 opcode followed by 128 MiB of zeros, all of which zipfile would inflate."""
  pkl = deflated_zeros(b"\x80\x04\x8e" + (BOMB_MIB * MIB).to_bytes(8, "little"), BOMB_MIB, b".")
  path = write_zip(tmp_path / "pkl_bomb.pt", [("archive/data.pkl", pkl), ("archive/version", b"3\n")])
  message = refused(torch_pickle.load, path)
  assert str(path) in message and f"archive/data.pkl declares {BOMB_MIB * MIB + 12} bytes" in message


# --- torch_pickle: legacy element counts -----------------------------------------------------------------------------

def test_legacy_storage_longer_than_the_file_is_refused(tmp_path):
  """A storage of 32 Mi floats (128 MiB) of which the file holds 16 bytes: f.read(n) would allocate n first."""
  numel = 32 * MIB
  obj = {"w": Tensor(Storage("0", numel, legacy=True), 0, (numel,), (1,))}
  path = write_checkpoint(tmp_path / "long.pt", obj, [("0", numel, bytes(16))], "legacy")
  message = refused(torch_pickle.load_state_dict, path)
  assert str(path) in message and f"storage 0 needs {4 * numel} bytes" in message and "file has 16 left" in message


@FORMATS
def test_default_limit_refuses_a_huge_storage_record(tmp_path, fmt):
  numel = 1 << 40  # 4 TiB of float32, above the 64 GiB default
  obj = {"w": Tensor(Storage("0", numel, legacy=fmt == "legacy"), 0, (4,), (1,))}
  path = write_checkpoint(tmp_path / "huge.pt", obj, [("0", numel, bytes(16))], fmt)
  message = refused(torch_pickle.load_state_dict, path)
  assert f"storage '0' ({numel} x float32) would take {4 * numel} bytes" in message
  assert f"the limit is {64 << 30} bytes" in message and "TRANSFER_MAX_TENSOR_BYTES" in message


# --- the limit: keyword, environment variable, module default ------------------------------------------------------

@FORMATS
@pytest.mark.parametrize("how", ["keyword", "env", "module"])
def test_byte_limit_is_configurable(tmp_path, monkeypatch, fmt, how):
  path = tmp_path / "w.pt"
  torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=fmt == "zip")  # 4000 bytes

  def load(limit):
    if how == "keyword":
      return torch_pickle.load_state_dict(path, max_tensor_bytes=limit)
    if how == "env":
      monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", str(limit))
    else:
      monkeypatch.setattr(torch_pickle, "MAX_TENSOR_BYTES", limit)
    return torch_pickle.load_state_dict(path)

  np.testing.assert_array_equal(load(4000)["w"], np.ones(1000, np.float32))
  message = refused(load, 3999)
  assert str(path) in message and "(1000 x float32) would take 4000 bytes (the limit is 3999 bytes" in message


def test_byte_limit_counts_a_files_tensors_together(tmp_path, monkeypatch):
  """Eight overlapping views of one 4 KB storage: each is within the limit, together they are not."""
  base = torch.arange(1024, dtype=torch.float32)
  path = tmp_path / "views.pt"
  torch.save({f"v{i}": base[i:] for i in range(8)}, path)
  monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", str(16 * 1024))
  message = refused(torch_pickle.load_state_dict, path)
  assert "would bring this file's tensors to" in message and "the limit is 16384 bytes" in message
  monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", str(32 * 1024))
  assert len(torch_pickle.load_state_dict(path)) == 8


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_bad_limit_setting_is_named(tmp_path, monkeypatch, value):
  monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", value)
  with pytest.raises(ValueError, match=r"\$TRANSFER_MAX_TENSOR_BYTES="):
    torch_pickle.tensor_byte_limit()


def test_storage_declared_twice_differently_is_refused(tmp_path):
  obj = {"a": Tensor(Storage("0", 4, legacy=False), 0, (4,), (1,)),
         "b": Tensor(Storage("0", 1 << 20, legacy=False), 0, (4,), (1,))}
  path = write_checkpoint(tmp_path / "twice.pt", obj, [("0", 4, bytes(16))], "zip")
  assert "storage '0' is declared as 4 x float32 and as 1048576 x float32" in refused(torch_pickle.load, path)


# --- safetensors -----------------------------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes, header_len: int | None = None) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def f32(shape, begin, end):
  return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


MALFORMED_SAFETENSORS = {
    # id: (file bytes, tensor the message must name or None, phrase it must contain)
    "header-length-2^62": (safetensors_bytes({"a": f32([2], 0, 8)}, bytes(8), header_len=1 << 62), None,
                           f"header length {1 << 62} runs past the end of the file"),
    "too-short": (b"\x01\x00", None, "too short"),
    "not-json": (safetensors_bytes(b"{not json", bytes(8)), None, "header is not JSON"),
    "not-utf8": (safetensors_bytes(b'{"\xff": 1}', b""), None, "header is not JSON"),
    "json-list": (safetensors_bytes([1, 2], b""), None, "header is a JSON list"),
    "offsets-past-end": (safetensors_bytes({"a": f32([1 << 28], 0, 1 << 30)}, bytes(8)), "a",
                         "data_offsets [0, 1073741824] are not within the data section of 8 bytes"),
    "begin-after-end": (safetensors_bytes({"a": f32([0], 8, 0)}, bytes(8)), "a", "are not within the data section"),
    "overlap": (safetensors_bytes({"a": f32([2], 0, 8), "b": f32([1], 4, 8)}, bytes(8)), "b",
                "overlaps the tensor before it"),
    "gap": (safetensors_bytes({"a": f32([1], 4, 8)}, bytes(8)), "a", "leaves bytes [0, 4) unused"),
    "trailing-bytes": (safetensors_bytes({"a": f32([2], 0, 8)}, bytes(12)), None, "cover 8 of the data section's 12"),
    "shape-vs-bytes": (safetensors_bytes({"a": f32([3], 0, 8)}, bytes(8)), "a",
                       "shape [3] of F32 needs 12 bytes but data_offsets [0, 8] span 8"),
    "huge-shape": (safetensors_bytes({"a": f32([1 << 40, 1 << 40], 0, 8)}, bytes(8)), "a", "needs"),
    "negative-dim": (safetensors_bytes({"a": f32([-2], 0, 8)}, bytes(8)), "a", "not a list of at most 64"),
    "unknown-dtype": (safetensors_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "a",
                      "unsupported dtype 'Q7'"),
    "missing-field": (safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "a", "data_offsets"),
    "duplicate-name": (safetensors_bytes(b'{"a": ' + json.dumps(f32([2], 0, 8)).encode() + b', "a": '
                                         + json.dumps(f32([2], 0, 8)).encode() + b'}', bytes(8)), None,
                       "names ['a'] more than once"),
    "bad-metadata": (safetensors_bytes({"__metadata__": {"k": 1}, "a": f32([2], 0, 8)}, bytes(8)), None,
                     "__metadata__"),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_is_a_value_error_naming_file_and_tensor(tmp_path, case):
  content, tensor, phrase = MALFORMED_SAFETENSORS[case]
  path = tmp_path / "model.safetensors"
  path.write_bytes(content)
  message = refused(hf.read_weights_file, str(path))
  assert message.startswith(f"{path}: not a readable safetensors file: ")
  assert tensor is None or f"tensor {tensor!r}: " in message
  assert phrase in message


def test_safetensors_header_above_the_cap_is_refused(tmp_path):
  path = tmp_path / "model.safetensors"
  header_len = 100_000_001  # one past the cap, which is the safetensors library's own
  with open(path, "wb") as f:  # a sparse file: the header length fits in it, nothing is written
    f.write(struct.pack("<Q", header_len) + b"{")
    f.truncate(8 + header_len)
  message = refused(hf.read_weights_file, str(path))
  assert str(path) in message and f"header length {header_len} is above the 100000000-byte cap" in message


def test_safetensors_limit(tmp_path, monkeypatch):
  from safetensors.numpy import save_file
  path = str(tmp_path / "model.safetensors")
  save_file({"a": np.ones(1000, np.float32)}, path)
  assert hf.read_weights_file(path, max_tensor_bytes=4000)["a"].shape == (1000,)
  monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", "3999")
  assert "above the limit of 3999 bytes" in refused(hf.read_weights_file, path)


def test_safetensors_round_trip_every_dtype(tmp_path):
  """The reader that replaced safetensors.numpy.load_file gives what that library gives, for every dtype we map."""
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(0)
  arrays = {
      "f32": rng.standard_normal((3, 4)).astype(np.float32), "f64": rng.standard_normal(5),
      "f16": rng.standard_normal(7).astype(np.float16), "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
      "i64": np.arange(-5, 5) * 1_000_000_007, "i32": np.arange(-3, 3, dtype=np.int32),
      "i16": np.array([-7, 7], np.int16), "i8": np.array([-128, 127], np.int8),
      "u8": np.arange(256, dtype=np.uint8), "u16": np.array([65535], np.uint16), "u32": np.array([1 << 31], np.uint32),
      "u64": np.array([1 << 63], np.uint64), "bool": np.array([True, False, True]),
      "c64": np.array([1 + 2j], np.complex64), "scalar": np.array(2.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
  }
  path = str(tmp_path / "all.safetensors")
  save_file(arrays, path)
  out, ref = hf.read_weights_file(path), load_file(path)
  assert set(out) == set(ref) == set(arrays)
  for name, a in arrays.items():
    assert out[name].dtype == a.dtype == ref[name].dtype and out[name].shape == a.shape, name
    assert out[name].flags.c_contiguous and out[name].flags.writeable, name
    np.testing.assert_array_equal(out[name].reshape(-1).view(np.uint8), a.reshape(-1).view(np.uint8),
                                  err_msg=name)  # bit for bit


# --- .npz ------------------------------------------------------------------------------------------------------------

def npz_with_header(path, shape, data: bytes):
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("w.npy", header.getvalue() + data)
  return path


@pytest.mark.parametrize("numel", [32 * MIB, 1 << 40], ids=["128MiB", "4TiB"])
def test_npz_header_declaring_more_than_its_entry_is_refused(tmp_path, numel):
  """numpy allocates the shape a .npy header declares before reading (only 16 bytes follow here)."""
  path = npz_with_header(tmp_path / "w.npz", (numel,), bytes(16))
  message = refused(pretrained.read_checkpoint, str(path))
  assert str(path) in message and f"array w.npy declares 144 bytes but its header (({numel},) x float32)" in message


def test_npz_limit_and_plain_npz(tmp_path, monkeypatch):
  path = tmp_path / "ok.npz"
  np.savez(path, a=np.arange(1000, dtype=np.float32), b=np.ones((2, 3)))
  out = pretrained.read_checkpoint(str(path))
  np.testing.assert_array_equal(out["a"], np.arange(1000))
  np.testing.assert_array_equal(out["b"], np.ones((2, 3)))
  monkeypatch.setenv("TRANSFER_MAX_TENSOR_BYTES", "4047")  # 4000 + 48 bytes together
  assert "would bring the arrays to 4048 bytes, above the limit of 4047" in refused(pretrained.read_checkpoint,
                                                                                   str(path))


def test_npz_object_array_and_non_array_member_are_refused(tmp_path):
  path = tmp_path / "obj.npz"
  np.savez(path, a=np.array([{"x": 1}], dtype=object))
  assert "not a plain numeric .npz" in refused(pretrained.read_checkpoint, str(path))
  path = tmp_path / "other.npz"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("notes.txt", "hello")
  assert "not a readable .npz" in refused(pretrained.read_checkpoint, str(path))
