"""Files: the one image lister, the one pairing rule, atomic writes, and how lists of names
are shown."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from absl import logging as absl_logging

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NAMES_SHOWN = 5  # names shown before "and N more"

# The umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the name has one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, sorted by name.

    Hidden files (names starting with '.'), sub-folders and other extensions
    are left out. Raises OSError when the folder cannot be listed.
    """
    with os.scandir(folder) as entries:
        found = [Path(e.path) for e in entries
                 if not e.name.startswith(".") and is_image_file(e.name) and e.is_file()]
    return sorted(found, key=lambda p: p.name)


@dataclass(frozen=True)
class Pairing:
    """What `pair_files` found."""

    pairs: list[tuple[Path, Path]]  # (result or input, target), sorted by the first's name
    unpaired_results: list[str]  # names of the first list's files left over, sorted
    unpaired_targets: list[str]  # names of the targets left over, sorted


def pair_files(results: Sequence[Path], targets: Sequence[Path]) -> Pairing:
    """The one pairing rule: by exact file name, then the rest by stem (the name without
    its extension) where exactly one file of each side has it; never a guess.

    What is left over is returned, and the caller decides: the score CLI warns, a data
    set (`data.sources.find_pairs`) is an error unless asked for the pairs found.
    """
    by_name = {p.name: p for p in targets}
    pairs: list[tuple[Path, Path]] = []
    left_results = []
    for r in results:
        t = by_name.pop(r.name, None)
        if t is None:
            left_results.append(r)
        else:
            pairs.append((r, t))
    stems_r: dict[str, list[Path]] = {}
    stems_t: dict[str, list[Path]] = {}
    for r in left_results:
        stems_r.setdefault(r.stem, []).append(r)
    for t in by_name.values():
        stems_t.setdefault(t.stem, []).append(t)
    unpaired_r, unpaired_t = [], []
    for stem, rs in stems_r.items():
        ts = stems_t.pop(stem, [])
        if len(rs) == 1 and len(ts) == 1:
            pairs.append((rs[0], ts[0]))
        else:  # none, or several files share the stem: no guessing
            unpaired_r += [r.name for r in rs]
            unpaired_t += [t.name for t in ts]
    for ts in stems_t.values():
        unpaired_t += [t.name for t in ts]
    pairs.sort(key=lambda pair: pair[0].name)
    return Pairing(pairs, sorted(unpaired_r), sorted(unpaired_t))


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and checks that a file can be written there (OSError if
    not), so that a long job finds out before it starts rather than at its first output."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def first_names(names: Sequence[str], limit: int = NAMES_SHOWN, sep: str = ", ") -> str:
    """'a, b, c, and 4 more': the first `limit` names, and how many are left out."""
    shown = sep.join(names[:limit])
    more = len(names) - limit
    return f"{shown}{sep}and {more} more" if more > 0 else shown


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to it when the block succeeds.

    `path` then appears complete or not at all; on an error the temporary file
    is removed and `path` is left as it was. The file gets the usual
    0o666 & ~umask permissions (mkstemp's are 0o600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never mask the error that got us here
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` so that `path` is complete or absent (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, doc: Any, indent: int = 1) -> None:
    """Writes `doc` as JSON so that `path` is complete or absent."""
    write_bytes_atomic(path, (json.dumps(doc, indent=indent) + "\n").encode())


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


class FolderLock:
    """An exclusive lock on a folder (`<folder>/.lock`, flock), released when the
    holder exits, also when it crashes or is killed, so it is never left stuck.
    The file records who holds it, for the message of the next one to try."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".lock"
        self._file: Any = None

    def acquire(self) -> FolderLock:
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FolderInUseError(f"{self.path.parent} is in use by {holder}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def quiet_library_logs() -> None:
    """Only errors from absl-logging libraries (orbax's notes on read-only managers and
    the like): the command-line tools say what matters themselves."""
    absl_logging.set_verbosity(absl_logging.ERROR)
