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
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from ml_dtypes import bfloat16  # bfloat16 for numpy, installed with JAX

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": bfloat16,
}
_DTYPE_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if v is not None}


class TorchCheckpointError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands; names the file."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *_unused: Any) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)  # own the memory: storages can be shared between tensors


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path,
                 big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._path = archive, prefix, path
        self._big_endian = big_endian
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES and _STORAGE_DTYPES[name] is not None:
            return _StorageType(name)
        raise TorchCheckpointError(
            f"{self._path}: holds a pickled {module}.{name}, which cannot be read without "
            f"PyTorch (only dicts of tensors are supported)")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchCheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError as e:
                raise TorchCheckpointError(f"{self._path}: storage {key} is missing") from e
            dtype = np.dtype(storage_type.dtype).newbyteorder(">" if self._big_endian else "<")
            self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
        return self._storages[key]


def load_pth(path: str | os.PathLike) -> Any:
    """Loads a `torch.save` file holding (nested) dicts of tensors as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise TorchCheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise TorchCheckpointError(
                f"{path}: legacy (pre-1.6) PyTorch format; re-save it with a recent torch.save")
        raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (no data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            names = set(archive.namelist())
            big = (f"{prefix}byteorder" in names
                   and archive.read(f"{prefix}byteorder").strip() == b"big")
            return _Unpickler(archive.read(pkl[0]), archive, prefix, path, big).load()
    except TorchCheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error,
            ValueError, TypeError) as e:
        raise TorchCheckpointError(f"{path}: corrupt PyTorch checkpoint ({e})") from e


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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for name, data in records:
                _write_aligned(archive, f"{archive_name}/{name}", data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
