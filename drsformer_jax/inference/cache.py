"""The persistent JAX compilation cache: a second run loads its programs instead of compiling."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
from jax._src import compilation_cache  # no public way to switch folders mid-process

CACHE_ENV = "DRSFORMER_JAX_CACHE"


def default_cache_dir() -> Path:
    """$DRSFORMER_JAX_CACHE, else $XDG_CACHE_HOME/drsformer_jax/jax_cache (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "drsformer_jax" / "jax_cache"


def enable_compilation_cache(path: str | os.PathLike | None) -> Path | None:
    """Keeps every compiled program in `path` (None: off) so later runs load it instead.

    Every program is kept, however quick its compilation (JAX's default keeps only
    those over a second). Can be called again with another folder.
    """
    folder = None if path is None else Path(path).expanduser().absolute()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != (None if folder is None else str(folder)):
        jax.config.update("jax_compilation_cache_dir", None if folder is None else str(folder))
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


@contextlib.contextmanager
def using_compilation_cache(path: str | os.PathLike | None) -> Iterator[Path | None]:
    """`enable_compilation_cache(path)` inside the block, the previous folder after it.

    Training's evaluation keeps its forward programs without caching the train step.
    """
    previous = jax.config.jax_compilation_cache_dir
    folder = None
    with contextlib.suppress(OSError):  # an unusable folder: compile as before
        folder = enable_compilation_cache(path)
    try:
        yield folder
    finally:
        enable_compilation_cache(previous)
