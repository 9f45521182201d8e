"""Reading and writing PyTorch `.pth` state dicts without PyTorch.

A `.pth` written by `torch.save` (PyTorch >= 1.6) is a zip archive holding a
protocol-2 pickle (`<name>/data.pkl`) whose tensors refer by key to raw
little-endian storages (`<name>/data/<key>`). Reading uses a restricted
unpickler that only rebuilds dicts and tensors, so a checkpoint can never run
code. Writing emits the same pickle opcodes torch does, so `torch.load`
(including `weights_only=True`) reads the result.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from ml_dtypes import bfloat16  # bfloat16 for numpy, installed with JAX

from drsformer_jax.utils.files import atomic_path

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": bfloat16,
}
_DTYPE_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}


class TorchCheckpointError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands; names the file."""


# Bounds that keep a hostile file from taking the machine's memory or stack.
_MAX_DEPTH = 64  # containers nested deeper than this (or a container holding itself)
_MAX_DIMS = 64  # numpy's limit
_INT64_MAX = 2**63 - 1
_SLACK_BYTES = 1 << 30  # tensors may take 2x their storages' bytes plus this (views, expand)


class _Inert:
    """Records the pickle builds; BUILD (setstate) on them is refused."""

    __slots__ = ()
    __hash__ = None  # cannot be dict keys or set members

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a tensor or storage record")


class _StorageType(_Inert):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES.get(name)  # None: a storage type we cannot read


class _StorageRef(_Inert):
    """A persistent id ('storage', type, key, location, numel), read when its tensor is."""

    __slots__ = ("storage_type", "key", "numel")

    def __init__(self, storage_type: Any, key: str, numel: Any):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _TensorRecord(_Inert):
    """The arguments of `_rebuild_tensor_v2`, checked and viewed once the tensor's name
    (its key path in the unpickled dicts) is known."""

    __slots__ = ("args",)

    def __init__(self, args: tuple):
        self.args = args


def _rebuild_tensor(*args: Any) -> _TensorRecord:
    return _TensorRecord(args)


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) <= _MAX_DIMS and all(map(_is_int, v))


def _short(v: Any) -> str:
    return reprlib.repr(v)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path,
                 big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._path = archive, prefix, path
        self._big_endian = big_endian
        self._storages: dict[tuple[str, str], np.ndarray] = {}
        self._storage_bytes = 0
        self._tensor_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage") and name.isidentifier():
            return _StorageType(name)  # an unsupported one is refused with its tensor's name
        raise TorchCheckpointError(
            f"{self._path}: holds a pickled {_short(module)}.{_short(name)}, which cannot be "
            f"read without PyTorch (only dicts of tensors are supported)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"{self._path}: unsupported persistent id {_short(pid)}")
        if not isinstance(pid[2], str) or not pid[2].isalnum():
            raise TorchCheckpointError(
                f"{self._path}: storage key {_short(pid[2])} is not a record name")
        return _StorageRef(pid[1], pid[2], pid[4])

    # --- after unpickling: every tensor checked against its storage, then copied out ---

    def materialize(self, obj: Any, names: tuple[str, ...] = (), depth: int = 0) -> Any:
        """`obj` with each tensor record replaced by its array, named by its key path."""
        if isinstance(obj, _TensorRecord):
            return self._tensor(obj, "/".join(names) if names else None)
        if isinstance(obj, (dict, list, tuple)) and depth >= _MAX_DEPTH:
            raise TorchCheckpointError(
                f"{self._path}: corrupt PyTorch checkpoint (containers nested more than "
                f"{_MAX_DEPTH} deep, or holding themselves)")
        if isinstance(obj, dict):
            for k in list(obj):
                name = k if isinstance(k, str) else _short(k)
                obj[k] = self.materialize(obj[k], (*names, name), depth + 1)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                obj[i] = self.materialize(v, (*names, f"[{i}]"), depth + 1)
        elif isinstance(obj, tuple):
            return tuple(self.materialize(v, (*names, f"[{i}]"), depth + 1)
                         for i, v in enumerate(obj))
        return obj

    def _tensor(self, record: _TensorRecord, name: str | None) -> np.ndarray:
        args = record.args
        ref = args[0] if args else None
        key = ref.key if isinstance(ref, _StorageRef) else None
        label = "tensor" if name is None else f"tensor {name}"
        if key is not None:
            label = (f"storage record data/{key}" if name is None
                     else f"{label} (storage record data/{key})")

        def refuse(why: str) -> TorchCheckpointError:
            return TorchCheckpointError(f"{self._path}: {label}: {why}")

        if len(args) < 4 or key is None:
            raise refuse("malformed tensor record (no storage, offset, size and stride)")
        offset, size, stride = args[1], args[2], args[3]
        if not (_is_int(offset) and _is_shape(size) and _is_shape(stride)
                and len(size) == len(stride)):
            raise refuse(f"malformed tensor record (offset {_short(offset)}, size "
                         f"{_short(size)}, stride {_short(stride)})")
        size, stride = tuple(size), tuple(stride)
        if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
            raise refuse(f"negative offset, size or stride (offset {offset}, size {size}, "
                         f"stride {stride})")
        numel = math.prod(size)
        if numel > _INT64_MAX:
            raise refuse(f"size {size} has {numel} elements, more than int64 can count")
        data = self._storage(ref, refuse)
        if numel == 0:
            return np.zeros(size, data.dtype)
        last = offset + sum(st * (n - 1) for n, st in zip(size, stride, strict=True))
        if last >= data.size:
            raise refuse(f"offset {offset}, size {size} and stride {stride} reach element "
                         f"{last}, but the storage holds {data.size}")
        nbytes = numel * data.dtype.itemsize
        self._tensor_bytes += nbytes
        if self._tensor_bytes > 2 * self._storage_bytes + _SLACK_BYTES:
            raise refuse(f"its {nbytes} bytes bring the tensors to {self._tensor_bytes} bytes, "
                         f"more than twice the {self._storage_bytes} bytes of their storages "
                         "plus 1 GiB (an expanded or repeated view this large is refused)")
        # In bounds: every element reached is in data[offset:last + 1]. A dimension of
        # size 1 reaches nothing with its stride, which may then be anything.
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:last + 1], shape=size,
            strides=tuple(st * itemsize if n > 1 else 0 for n, st in zip(size, stride,
                                                                           strict=True)),
            writeable=False)
        return np.array(view)  # own the memory: storages can be shared between tensors

    def _storage(self, ref: _StorageRef, refuse: Any) -> np.ndarray:
        kind, numel = ref.storage_type, ref.numel
        if not isinstance(kind, _StorageType):
            raise refuse(f"storage type {_short(kind)} is not a PyTorch storage type")
        if kind.dtype is None:
            supported = ", ".join(_STORAGE_DTYPES)
            raise refuse(f"storage type torch.{kind.name} is not supported ({supported} are)")
        if not _is_int(numel) or not 0 <= numel <= _INT64_MAX:
            raise refuse(f"malformed storage size {_short(numel)}")
        cache_key = (ref.key, kind.name)
        if cache_key in self._storages:
            return self._storages[cache_key]
        dtype = np.dtype(kind.dtype)
        member = f"{self._prefix}data/{ref.key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise refuse("its storage record is missing") from None
        need = numel * dtype.itemsize
        if info.file_size % dtype.itemsize:
            raise refuse(f"the storage record holds {info.file_size} bytes, not a multiple of "
                         f"the {dtype.name} item size ({dtype.itemsize})")
        if info.file_size < need:
            raise refuse(f"the storage record is truncated: {info.file_size} bytes, but "
                         f"{numel} {dtype.name} elements need {need}")
        with self._archive.open(info) as f:
            raw = f.read(need)  # a longer record is read as torch does: its first `need` bytes
        if len(raw) != need:
            raise refuse(f"the storage record is truncated: {len(raw)} bytes, but {numel} "
                         f"{dtype.name} elements need {need}")
        if dtype == np.bool_:
            data = np.frombuffer(raw, np.uint8) != 0
        else:
            data = np.frombuffer(raw, dtype.newbyteorder(">" if self._big_endian else "<"))
            if not data.dtype.isnative:
                data = data.astype(dtype)
        self._storages[cache_key] = data
        self._storage_bytes += need
        return data


def _check_opcodes(data: bytes) -> None:
    """Refuses, before unpickling, what the C unpickler would turn into a huge allocation:
    a memo index far beyond the pickle's size, or a length beyond its end."""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= len(data):
            raise pickle.UnpicklingError(f"memo index {arg} out of range")


def load_pth(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` file holding (nested) dicts of tensors as numpy arrays.

    Every tensor is checked against its storage before it is viewed (offset, sizes and
    strides must stay inside it; supported dtype; whole items); anything else raises
    TorchCheckpointError naming the tensor and the file.
    """
    path = Path(path)
    if path.is_dir():
        raise TorchCheckpointError(f"{path}: is a directory, not a .pth file")
    if not path.is_file():
        raise TorchCheckpointError(f"{path}: no such file")
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                head = f.read(2)
            if head[:1] == b"\x80":
                raise TorchCheckpointError(f"{path}: legacy (pre-1.6) PyTorch format; "
                                           "re-save it with a recent torch.save")
            raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (no data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            names = set(archive.namelist())
            big = (f"{prefix}byteorder" in names
                   and archive.read(f"{prefix}byteorder").strip() == b"big")
            data = archive.read(pkl[0])
            _check_opcodes(data)
            unpickler = _Unpickler(data, archive, prefix, path, big)
            return unpickler.materialize(unpickler.load())
    except TorchCheckpointError:
        raise
    except OSError as e:
        raise TorchCheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # a damaged pickle or zip raises many types; all mean the same
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise TorchCheckpointError(f"{path}: corrupt PyTorch checkpoint ({why})") from e


class _PickleWriter:
    """Emits the protocol-2 opcodes torch.save uses for a dict of tensors."""

    def __init__(self) -> None:
        self.out = io.BytesIO()

    def op(self, code: bytes) -> None:
        self.out.write(code)

    def global_(self, module: str, name: str) -> None:
        self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def str_(self, s: str) -> None:
        b = s.encode("utf-8")
        self.op(b"X" + struct.pack("<I", len(b)) + b)

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.op(b"K" + struct.pack("<B", v))
        elif -(2**31) <= v < 2**31:
            self.op(b"J" + struct.pack("<i", v))
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.op(b"\x8a" + struct.pack("<B", len(raw)) + raw)

    def tuple_(self, values: tuple[int, ...]) -> None:
        self.op(b"(")
        for v in values:
            self.int_(int(v))
        self.op(b"t")

    def empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.op(b")R")

    def tensor(self, key: str, arr: np.ndarray) -> None:
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(b"((")
        self.str_("storage")
        self.global_("torch", _DTYPE_STORAGES[arr.dtype])
        self.str_(key)
        self.str_("cpu")
        self.int_(arr.size)
        self.op(b"tQ")  # the persistent id tuple, then BINPERSID
        self.int_(0)
        self.tuple_(arr.shape)
        strides, acc = [], 1
        for dim in reversed(arr.shape):
            strides.append(acc)
            acc *= dim
        self.tuple_(tuple(reversed(strides)))
        self.op(b"\x89")  # requires_grad=False
        self.empty_ordered_dict()  # backward hooks
        self.op(b"tR")


def save_pth(path: str | os.PathLike, state_dict: dict[str, np.ndarray],
             wrap_key: str | None = "params") -> None:
    """Writes `{wrap_key: state_dict}` (or the bare state dict) like `torch.save` does.

    The file is written to a temporary name and renamed, so it is complete or absent.
    """
    path = Path(path)
    arrays = {}
    for name, value in state_dict.items():
        arr = np.array(value, order="C", copy=None)  # keeps 0-d arrays 0-d
        if arr.dtype not in _DTYPE_STORAGES:
            raise TypeError(f"{name}: dtype {arr.dtype} has no PyTorch storage type")
        arrays[name] = arr.astype(arr.dtype.newbyteorder("<"), copy=False)

    w = _PickleWriter()
    w.op(b"\x80\x02")
    if wrap_key is not None:
        w.op(b"}")
        w.str_(wrap_key)
    w.empty_ordered_dict()
    w.op(b"(")
    for i, (name, arr) in enumerate(arrays.items()):
        w.str_(name)
        w.tensor(str(i), arr)
    w.op(b"u")
    if wrap_key is not None:
        w.op(b"s")
    w.op(b".")

    archive_name = path.stem or "archive"
    records = [("data.pkl", w.out.getvalue()), ("byteorder", b"little")]
    records += [(f"data/{i}", arr.tobytes()) for i, arr in enumerate(arrays.values())]
    records += [("version", b"3\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            _write_aligned(archive, f"{archive_name}/{name}", data)


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes, alignment: int = 64) -> None:
    """Stores `data` uncompressed, its first byte on an `alignment` boundary (as torch does,
    so that readers may memory-map tensors)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = archive.fp.tell() + 30 + len(name.encode())
    pad = (-(header_end + 4)) % alignment
    # A private extra-field block ('FB', as torch names it) holding only padding.
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    archive.writestr(info, data)
