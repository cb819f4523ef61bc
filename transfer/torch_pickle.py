"""Read PyTorch checkpoints (torch.save output) into numpy arrays without torch and without running pickled code.

A checkpoint is a pickle, and unpickling an untrusted pickle can execute anything. We unpickle with an allow-list:
only the handful of globals a tensor container needs are resolved, each to a harmless stand-in defined here. Tensors
come back as placeholders that are materialised into numpy arrays once the raw storage bytes have been read (in the
legacy format those bytes follow the pickle, so they are not yet available while it is being unpickled).

Both layouts written by torch.save are supported:
  * zip (torch >= 1.6): <prefix>/data.pkl plus one raw file per storage at <prefix>/data/<key>;
  * legacy (_use_new_zipfile_serialization=False): pickles magic, protocol, sys_info, the object, the storage keys,
    then each storage as an int64 little-endian element count followed by its bytes.

A hostile file is refused before anything it declares is allocated: every storage must be present in the file at the
size its record declares (zip entries are checked before they are inflated), no tensor may hold more elements than
its storage, and no storage, tensor, or file total may exceed ``tensor_byte_limit()``.
"""
import collections
import math
import os
import pickle
import zipfile
from typing import Any, NamedTuple

import numpy as np

__all__ = ["load", "load_state_dict", "UnsafePickleError", "MAX_TENSOR_BYTES", "tensor_byte_limit"]

MAX_TENSOR_BYTES = 64 << 30
"""Default cap on the tensor data one checkpoint file may make a reader allocate: each storage and each tensor, and
the file's storages and tensors in total. $TRANSFER_MAX_TENSOR_BYTES or a ``max_tensor_bytes=`` argument overrides
it (lower it when reading files from untrusted sources)."""
LIMIT_ENV = "TRANSFER_MAX_TENSOR_BYTES"
MAX_PICKLE_BYTES = 64 << 20
"""Cap on a zip checkpoint's data.pkl, which holds only structure (names, shapes, storage keys): a state dict's is
kilobytes, while a deflated one can declare gigabytes that zipfile would inflate."""

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_WELL_KNOWN_KEYS = ("state_dict", "model", "model_state_dict")
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}
_DTYPE_NAMES = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
                "uint64", "bool", "complex64", "complex128"} | _ML_DTYPES
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class UnsafePickleError(ValueError):
    """The checkpoint references a global outside the allow-list (it could run code on load)."""


class _Bad(ValueError):
    """Internal: a format problem whose message is already readable."""


def tensor_byte_limit(max_tensor_bytes: "int | None" = None) -> int:
    """The byte cap in force: ``max_tensor_bytes`` if given, else $TRANSFER_MAX_TENSOR_BYTES, else MAX_TENSOR_BYTES
    (read at call time, so a test or a caller can change either)."""
    where = "max_tensor_bytes"
    if max_tensor_bytes is None:
        env = os.environ.get(LIMIT_ENV, "").strip()
        if not env:
            return MAX_TENSOR_BYTES
        where = f"${LIMIT_ENV}"
        try:
            max_tensor_bytes = int(env)
        except ValueError:
            raise ValueError(f"{where}={env!r} is not a whole number of bytes") from None
    if isinstance(max_tensor_bytes, bool) or not isinstance(max_tensor_bytes, int) or max_tensor_bytes <= 0:
        raise ValueError(f"{where}={max_tensor_bytes!r}: expected a positive number of bytes")
    return max_tensor_bytes


class _Budget:
    """Bytes a file may make us allocate, per item and in total; checked before each allocation."""

    def __init__(self, limit: int, kind: str):
        self.limit, self.kind, self.used = limit, kind, 0

    def take(self, nbytes: int, what: str) -> None:
        hint = (f"the limit is {self.limit} bytes; raise it with max_tensor_bytes= or ${LIMIT_ENV} if the file is "
                "trusted")
        if nbytes > self.limit:
            raise _Bad(f"{what} would take {nbytes} bytes ({hint})")
        if self.used + nbytes > self.limit:
            raise _Bad(f"{what} would bring this file's {self.kind} to {self.used + nbytes} bytes ({hint})")
        self.used += nbytes


class _TorchType(NamedTuple):
    """Stand-in for a torch storage class or torch dtype global: just the numpy dtype name (immutable on purpose,
    so a pickle BUILD opcode cannot alter it)."""
    qualname: str
    dtype: str


def _np_dtype(name: str) -> np.dtype:
    if name in _ML_DTYPES:  # numpy lacks these; ml_dtypes ships with jax
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


class _StorageRef(NamedTuple):
    key: str          # raw-data key (root storage)
    dtype: str
    start: int        # element offset into the root (legacy storage views), else 0
    numel: int


class _Pending:
    """A tensor whose bytes are not read yet: storage + offset/shape/strides (in elements)."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, _StorageRef):
            raise _Bad(f"tensor storage is {type(storage).__name__}, expected a persistent storage reference")
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def __setstate__(self, state):  # a BUILD opcode must not rewrite a validated placeholder
        raise _Bad("pickle tries to set state on a tensor")

    def materialize(self, data: dict, name: str, budget: _Budget) -> np.ndarray:
        ref = self.storage
        flat = data[ref.key][ref.start:ref.start + ref.numel]
        if self.dtype is not None and self.dtype.dtype != ref.dtype:  # v3: untyped bytes + dtype
            dt = _np_dtype(self.dtype.dtype)
            if flat.dtype.itemsize != 1 or flat.size % dt.itemsize:
                raise _Bad(f"tensor {name!r}: cannot view a {ref.dtype} storage of {flat.size} elements as {dt}")
            flat = flat.view(dt)
        size, stride, offset = tuple(self.size), tuple(self.stride), self.offset
        ints = all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
        if not ints or len(size) != len(stride):
            raise _Bad(f"tensor {name!r}: bad geometry: offset={offset!r} size={size!r} stride={stride!r}")
        numel = math.prod(size)
        # A zero or overlapping stride can make a view far larger than its storage (torch's expand()); the copy we
        # return would hold all of it. torch.save of a state dict never writes such views, a hostile file does.
        if numel > flat.size:
            raise _Bad(f"tensor {name!r} has {numel} elements (size={size}, stride={stride}) but its storage "
                       f"{ref.key!r} holds {flat.size} {flat.dtype}: refusing a view larger than its storage")
        budget.take(numel * flat.itemsize, f"tensor {name!r} ({numel} x {flat.dtype})")
        if numel == 0:
            return np.zeros(size, flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:  # as_strided does no bounds checking: never let a file make us read past the buffer
            raise _Bad(f"tensor {name!r} (offset={offset}, size={size}, stride={stride}) exceeds its storage of "
                       f"{flat.size}")
        view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride],
                                               writeable=False)
        return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _Pending(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchType):
        raise _Bad(f"_rebuild_tensor_v3 dtype is {dtype!r}")
    return _Pending(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored):  # a Parameter is just its tensor for our purposes
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _TorchType("torch.storage.UntypedStorage", "uint8"),
    **{(mod, cls): _TorchType(f"{mod}.{cls}", dt) for cls, dt in _STORAGE_DTYPES.items()
       for mod in ("torch", "torch.cuda")},  # old legacy GPU checkpoints name torch.cuda.*Storage
    **{("torch", name): _TorchType(f"torch.{name}", name) for name in _DTYPE_NAMES},  # dtype args of v3 tensors
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path, legacy, budget: _Budget):
        super().__init__(file)
        self.path, self.legacy, self.budget = path, legacy, budget
        self.roots: dict[str, _StorageRef] = {}  # storage key -> (dtype, numel) of every root storage seen

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(
            f"{self.path}: refusing to load global '{module}.{name}'; only tensors and plain containers "
            "(dict/OrderedDict/list/tuple/numbers/strings) are read from checkpoints")

    def persistent_load(self, pid):
        n = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == n and pid[0] in ("storage", b"storage")):
            raise _Bad(f"unsupported persistent id {pid!r:.200}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _TorchType) or not isinstance(numel, int) or numel < 0:
            raise _Bad(f"bad storage record {pid!r:.200}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in self.roots:  # checked before any of its bytes is read
            self.budget.take(numel * _np_dtype(storage_type.dtype).itemsize,
                             f"storage {key!r} ({numel} x {storage_type.dtype})")
        root = self.roots.setdefault(key, _StorageRef(key, storage_type.dtype, 0, numel))
        if (root.dtype, root.numel) != (storage_type.dtype, numel):  # torch.save writes one record per storage
            raise _Bad(f"storage {key!r} is declared as {root.numel} x {root.dtype} and as {numel} x "
                       f"{storage_type.dtype}")
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        _view_key, start, view_numel = view  # legacy storage view: a slice of the root storage
        if not (isinstance(start, int) and isinstance(view_numel, int) and 0 <= start <= start + view_numel <= numel):
            raise _Bad(f"bad storage view {view!r}")
        return _StorageRef(key, root.dtype, start, view_numel)


def _resolve(obj, data, memo, budget: _Budget, name: str = ""):
    """Replace _Pending placeholders by arrays throughout (possibly cyclic) containers; ``name`` is obj's key path.

    A tensor the pickle references many times (its memo makes that a few bytes each) is materialised once, as
    torch.load returns one tensor object for it too."""
    if id(obj) in memo:
        return memo[id(obj)][1]
    if isinstance(obj, _Pending):
        memo[id(obj)] = (obj, obj.materialize(data, name or "<top level>", budget))
        return memo[id(obj)][1]
    if isinstance(obj, (dict, list)):  # patched in place, which keeps OrderedDict._metadata and shared references
        memo[id(obj)] = (obj, obj)
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = _resolve(obj[k], data, memo, budget, f"{name}/{k}" if name else str(k))
        else:
            for i in range(len(obj)):
                obj[i] = _resolve(obj[i], data, memo, budget, f"{name}[{i}]")
        return obj
    if isinstance(obj, tuple):  # keep obj alive in the memo so its id stays unique
        memo[id(obj)] = (obj, tuple(_resolve(v, data, memo, budget, f"{name}[{i}]") for i, v in enumerate(obj)))
        return memo[id(obj)][1]
    return obj


def _read_storage(raw: bytes, ref: _StorageRef, what: str) -> np.ndarray:
    dt = _np_dtype(ref.dtype)
    if len(raw) < ref.numel * dt.itemsize:
        raise _Bad(f"truncated: {what} has {len(raw)} bytes, expected {ref.numel} x {ref.dtype}")
    return np.frombuffer(raw, dt, count=ref.numel)


def _entry(zf: zipfile.ZipFile, name: str, max_bytes: int, what: str) -> zipfile.ZipInfo:
    """The entry ``name``, refused if it declares more than ``max_bytes``: zipfile inflates up to the declared size,
    so this bounds what reading it allocates (a few MB of deflated zeros can declare gigabytes)."""
    info = zf.getinfo(name)
    if info.file_size > max_bytes:
        raise _Bad(f"archive entry {name} declares {info.file_size} bytes, more than {what} can hold ({max_bytes})")
    return info


def _load_zip(path, f, limit):
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise _Bad(f"truncated or corrupt zip archive ({e})") from e
    with zf:
        names = set(zf.namelist())
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise _Bad(f"zip archive without a single <prefix>/data.pkl (entries: {zf.namelist()[:5]})")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            _entry(zf, prefix + "byteorder", 16, "a byte-order tag")
            if zf.read(prefix + "byteorder").strip() != b"little":
                raise _Bad("big-endian checkpoints are not supported")
        _entry(zf, pkls[0], MAX_PICKLE_BYTES, "a checkpoint's pickled structure")
        up = _Unpickler(zf.open(pkls[0]), path, legacy=False, budget=_Budget(limit, "storages"))
        obj = up.load()
        data = {}
        for k, ref in up.roots.items():
            name, expected = f"{prefix}data/{k}", ref.numel * _np_dtype(ref.dtype).itemsize
            if name not in names:
                raise _Bad(f"storage {k} is referenced but the archive has no entry {name} (truncated?)")
            if (declared := zf.getinfo(name).file_size) != expected:  # torch writes exactly numel x itemsize
                raise _Bad(f"archive entry {name} declares {declared} bytes but its storage record expects "
                           f"{ref.numel} x {ref.dtype} = {expected} (truncated or tampered)")
            data[k] = _read_storage(zf.read(name), ref, f"storage {k}")
    return obj, data


def _load_legacy(path, f, limit):
    budget = _Budget(limit, "storages")
    file_size = os.fstat(f.fileno()).st_size

    def plain():  # the small header/key pickles go through the same allow-list
        return _Unpickler(f, path, legacy=True, budget=budget).load()

    if plain() != _LEGACY_MAGIC:
        raise _Bad("invalid magic number")
    if (proto := plain()) != _LEGACY_PROTOCOL:
        raise _Bad(f"unsupported legacy protocol {proto!r}")
    if not plain().get("little_endian", True):
        raise _Bad("big-endian checkpoints are not supported")
    up = _Unpickler(f, path, legacy=True, budget=budget)  # its storage records are checked against the limit
    obj = up.load()
    data = {}
    for key in plain():
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        if key not in up.roots:
            raise _Bad(f"storage key {key!r} listed but never referenced")
        ref = up.roots[key]
        count = int.from_bytes(f.read(8), "little")
        if count != ref.numel:  # ref.numel passed the limit, so count is within it too
            raise _Bad(f"storage {key}: file holds {count} elements, pickle expects {ref.numel} (truncated?)")
        nbytes, left = count * _np_dtype(ref.dtype).itemsize, file_size - f.tell()
        if nbytes > left:  # f.read(n) allocates n bytes before it finds out the file is shorter
            raise _Bad(f"truncated: storage {key} needs {nbytes} bytes ({count} x {ref.dtype}) but the file has "
                       f"{left} left")
        data[key] = _read_storage(f.read(nbytes), ref, f"storage {key}")
    if missing := set(up.roots) - set(data):
        raise _Bad(f"storages {sorted(missing)[:5]} referenced but not stored")
    return obj, data


def load(path, *, max_tensor_bytes: "int | None" = None) -> Any:
    """Unpickle a torch.save file with tensors replaced by numpy arrays (copies, C-contiguous).

    ``max_tensor_bytes`` caps each storage and tensor and their totals (default: ``tensor_byte_limit()``)."""
    path = os.fspath(path)
    limit = tensor_byte_limit(max_tensor_bytes)
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(0)
        try:
            if head.startswith(b"PK\x03\x04"):
                obj, data = _load_zip(path, f, limit)
            elif head[257:262] == b"ustar":
                raise _Bad("pre-1.0 tar-format checkpoints are not supported")
            else:
                obj, data = _load_legacy(path, f, limit)
            return _resolve(obj, data, {}, _Budget(limit, "tensors"))
        except UnsafePickleError:
            raise
        except _Bad as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
        except Exception as e:  # truncated/garbage input surfaces as assorted pickle/zip/struct errors
            raise ValueError(f"{path}: not a PyTorch checkpoint or truncated/corrupt "
                             f"({type(e).__name__}: {e})") from e


def _arrays(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, np.ndarray)}


def load_state_dict(path, *, max_tensor_bytes: "int | None" = None) -> dict[str, np.ndarray]:
    """Flat name -> array dict of a checkpoint, unwrapping {'state_dict'|'model'|'model_state_dict': {...}}."""
    top = load(path, max_tensor_bytes=max_tensor_bytes)
    if isinstance(top, dict):
        nested = [k for k in _WELL_KNOWN_KEYS if isinstance(top.get(k), dict) and _arrays(top[k])]
        if _arrays(top) and not any(isinstance(v, dict) and _arrays(v) for v in top.values()):
            return _arrays(top)
        if len(nested) == 1 and not _arrays(top):
            return _arrays(top[nested[0]])
        keys = list(top)[:20]
    else:
        keys = type(top).__name__
    raise ValueError(f"{os.fspath(path)}: cannot find a state dict (a dict of tensors, or one under "
                     f"{'/'.join(_WELL_KNOWN_KEYS)}); top level: {keys}")
