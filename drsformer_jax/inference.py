"""Running a DRSformer on whole images, as the release's test.py does, and at scale.

The release's procedure: RGB in [0, 1] -> reflect-pad bottom/right to a
multiple of 8 -> model (whole image, or tile by tile with overlapping tiles
averaged) -> clamp to [0, 1] -> crop back. `pad_to_multiple` is the project's
one padding helper (evaluation during training uses it too).

`Restorer` adds what a folder of real photos needs: automatic tiling when a
whole-image pass would not fit in memory (`estimate_memory`), optional size
buckets (`bucket_size`) and batches, so that a folder of mixed sizes compiles a
handful of programs, and `enable_compilation_cache` so that a second run does
not compile at all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drsformer_jax.models import SIZE_MULTIPLE

DEFAULT_TILE_OVERLAP = 32  # the release's --tile_overlap default
CACHE_ENV = "DRSFORMER_JAX_CACHE"

# Memory of a forward pass (float32) beyond the weights, in bytes per pixel per unit
# of the model's `dim`; batch elements add up. Measured, then rounded up:
# - "cpu": the rise of the process's peak resident memory over one pass (programs
#   loaded from the compilation cache): the released model (dim 48, MEFC) 313 bytes
#   at 256x384 and 492 at 128x192 (a fixed part weighs more there), dim 16 without
#   MEFC 259..295 at 256x256 and 488x328.
# - any other backend: XLA's buffer assignment,
#   `jax.jit(model.apply).lower(x).compile().memory_analysis().temp_size_in_bytes`,
#   which a device allocator reserves in full: 1274..1361 bytes (dim 8 and 48, with
#   or without MEFC, 64x64 and 128x128; from the CPU compiler: no GPU was at hand).
#   Should a pass still run out of device memory, `restore_jobs` retries it one
#   image at a time, then with smaller tiles (`Restorer.after_out_of_memory`).
BYTES_PER_PIXEL_PER_DIM = {"cpu": 600, "default": 1400}
MEMORY_FRACTION = 0.8  # of the free memory a pass may plan to use: room for XLA's extras
_TILE_LADDER = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 64)


# --- padding, buckets, tiles ---------------------------------------------------------


def padded_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The smallest (H, W) >= (height, width) that are multiples of `multiple`."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to_multiple(x: np.ndarray | jax.Array, multiple: int = SIZE_MULTIPLE,
                    size: tuple[int, int] | None = None) -> np.ndarray | jax.Array:
    """Reflect-pads the bottom and right of an (N, H, W, C) or (H, W, C) image.

    Pads to the next multiple of `multiple`, or to `size` when given. Reflection
    does not repeat the edge pixel (PyTorch's 'reflect'); for pads wider than
    the image it reflects again (0 1 2 -> 0 1 2 1 0 1 2 1), so even a 3x3 image
    can be padded to 8x8, where PyTorch refuses pads of the image's size or more.
    A side of one pixel is repeated (NumPy's reflection of a single value).
    """
    h, w = x.shape[-3], x.shape[-2]
    th, tw = size if size is not None else padded_size(h, w, multiple)
    if th < h or tw < w:
        raise ValueError(f"cannot pad an image of {h}x{w} to {th}x{tw}")
    if (th, tw) == (h, w):
        return x
    widths = [(0, 0)] * (x.ndim - 3) + [(0, th - h), (0, tw - w), (0, 0)]
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.pad(x, widths, mode="reflect")


def bucket_side(n: int) -> int:
    """One side rounded up to its size bucket: a multiple of max(8, 2^(bits(n) - 4)).

    Sides below 128 round to multiples of 8 (as the release pads), 128..255 to
    16, 256..511 to 32, 512..1023 to 64, and so on: a side grows by less than
    1/8, and there are 8 buckets per octave of sizes.
    """
    step = max(SIZE_MULTIPLE, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def bucket_size(height: int, width: int) -> tuple[int, int]:
    """The padded (H, W) of an image under `--buckets` (see `bucket_side`)."""
    return bucket_side(height), bucket_side(width)


def tile_stride(tile: int, overlap: int) -> int:
    """The release's stride, tile - overlap; tile // 2 where that is not positive.

    (The release's stride is negative when an image side is smaller than the
    overlap, which leaves pixels without any tile; halving the tile avoids that.)
    """
    return tile - overlap if overlap < tile else max(1, tile // 2)


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along a side: range(0, size - tile, stride) + [size - tile], as the release."""
    return [*range(0, size - tile, tile_stride(tile, overlap)), size - tile]


# --- restoration -----------------------------------------------------------------------


def make_restore_fn(model: Any, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted (N, H, W, 3) -> (N, H, W, 3) restoration, clamped to [0, 1].

    H and W must be multiples of 8; compiled once per input shape.
    """
    forward = make_forward_fn(model, variables)
    return lambda x: jnp.clip(forward(x), 0.0, 1.0)


def make_forward_fn(model: Any, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """The jitted model, (N, H, W, 3) -> (N, H, W, 3), not clamped (tiles are averaged first)."""

    # The variables are an argument, not a closure: closed-over arrays become
    # constants that XLA constant-folds, slowly and with different rounding, and
    # they would make the persistent cache key depend on the weights.
    @jax.jit
    def drsformer_forward(variables: Any, x: jax.Array) -> jax.Array:
        return model.apply(variables, x)

    return functools.partial(drsformer_forward, variables)


def restore_image(restore: Callable[[jax.Array], jax.Array], image: np.ndarray) -> np.ndarray:
    """One (H, W, 3) float image in [0, 1] -> restored (H, W, 3) float32, release-style."""
    h, w = image.shape[:2]
    out = restore(jnp.asarray(pad_to_multiple(image.astype(np.float32))[None]))
    return np.asarray(out[0, :h, :w])


def restore_tiled(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile: int,
                  overlap: int = DEFAULT_TILE_OVERLAP, batch: int = 1) -> np.ndarray:
    """The release's tiled pass over one (H, W, 3) image; returns it restored and clamped.

    The image is reflect-padded to a multiple of 8; the tile is min(tile, H, W) of
    the padded size; tiles at `tile_positions` are run `batch` at a time through
    `forward` (unclamped, (n, t, t, 3) -> (n, t, t, 3)), their outputs summed in the
    release's order (rows outer, columns inner) and divided by the number of tiles
    covering each pixel; then clamped and cropped.
    """
    if tile <= 0 or tile % SIZE_MULTIPLE:
        raise ValueError(f"tile size must be a positive multiple of {SIZE_MULTIPLE}, got {tile}")
    h, w = image.shape[:2]
    x = pad_to_multiple(np.asarray(image, np.float32))
    hp, wp = x.shape[:2]
    tile = min(tile, hp, wp)
    origins = [(i, j) for i in tile_positions(hp, tile, overlap)
               for j in tile_positions(wp, tile, overlap)]
    acc = np.zeros((hp, wp, x.shape[2]), np.float32)
    count = np.zeros((hp, wp, 1), np.float32)
    for start in range(0, len(origins), batch):
        chunk = origins[start:start + batch]
        tiles = np.stack([x[i:i + tile, j:j + tile] for i, j in chunk])
        out = np.asarray(forward(tiles), np.float32)
        for (i, j), patch in zip(chunk, out, strict=False):
            acc[i:i + tile, j:j + tile] += patch
            count[i:i + tile, j:j + tile] += 1.0
    return np.clip(acc / count, 0.0, 1.0)[:h, :w]


# --- memory --------------------------------------------------------------------------


def estimate_memory(dim: int, height: int, width: int, batch: int = 1,
                    backend: str | None = None) -> int:
    """Bytes a forward pass of a batch of (height, width) images needs beyond the weights.

    The documented rule: BYTES_PER_PIXEL_PER_DIM[backend] * dim * height * width *
    batch, backend defaulting to JAX's default backend.
    """
    backend = backend or jax.default_backend()
    per_pixel = BYTES_PER_PIXEL_PER_DIM.get(backend, BYTES_PER_PIXEL_PER_DIM["default"])
    return per_pixel * dim * height * width * batch


def available_memory(device: Any = None) -> int | None:
    """Free memory for a forward pass on `device` (default: the first local one).

    CPU: the host's available RAM (MemAvailable, or the cgroup's limit when that is
    smaller). Accelerators: the device allocator's limit minus what is in use (the
    weights, once loaded). None when the platform does not say.
    """
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    free = _meminfo_available()
    cgroup = _cgroup_free()
    options = [v for v in (free, cgroup) if v is not None]
    return min(options) if options else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return int(limit) - int(used)


# --- the persistent compilation cache -------------------------------------------------------


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
    from jax._src import compilation_cache  # no public way to switch folders mid-process

    folder = None if path is None else Path(path).expanduser().absolute()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != (None if folder is None else str(folder)):
        jax.config.update("jax_compilation_cache_dir", None if folder is None else str(folder))
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


# --- planning and running a folder ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one image is run: the program's image size, batch and tile (None: whole image)."""

    size: tuple[int, int]  # padded image size, or (tile, tile)
    batch: int  # images (or tiles) per call at most
    tile: int | None = None
    note: str | None = None  # why it is tiled, when that was decided automatically

    @property
    def key(self) -> tuple[Any, ...]:
        """Images with one key run through the same compiled program."""
        return self.size, self.batch, self.tile


class Restorer:
    """Restores images of any size with one model, compiling as few programs as it can.

    Args:
      model, variables: what `drsformer_jax.load` returns.
      tile: tile every image with this tile size (a multiple of 8), as the
        release's --tile does; None: tile only images that would not fit in memory.
      tile_overlap: overlap of neighbouring tiles (the release's default 32).
      buckets: pad whole images to `bucket_size` instead of the next multiple of 8,
        so that images of similar sizes share a program (results differ slightly:
        see README).
      batch_size: images (or tiles) per call; fewer when memory is short.
      memory_limit: bytes a pass may use; None: MEMORY_FRACTION of `available_memory()`.
    """

    def __init__(self, model: Any, variables: Any, *, tile: int | None = None,
                 tile_overlap: int = DEFAULT_TILE_OVERLAP, buckets: bool = False,
                 batch_size: int = 1, memory_limit: int | None = None):
        if tile is not None and (tile <= 0 or tile % SIZE_MULTIPLE):
            raise ValueError(f"tile size must be a positive multiple of {SIZE_MULTIPLE}, "
                             f"got {tile}")
        if tile_overlap < 0:
            raise ValueError(f"tile overlap must be >= 0, got {tile_overlap}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dim = int(model.dim)
        self.tile, self.tile_overlap = tile, tile_overlap
        self.buckets, self.batch_size = buckets, batch_size
        # One device, one plain layout: weights restored from a training checkpoint carry
        # the training mesh's sharding, which would make a different program (and
        # cache entry) from the same weights out of an export directory.
        variables = jax.device_put(variables, jax.local_devices()[0])
        self._forward = make_forward_fn(model, variables)
        if memory_limit is None:
            free = available_memory()
            memory_limit = None if free is None else int(free * MEMORY_FRACTION)
        self.memory_limit = memory_limit

    def _fits(self, height: int, width: int, batch: int = 1) -> bool:
        return (self.memory_limit is None
                or estimate_memory(self.dim, height, width, batch) <= self.memory_limit)

    def _batch_for(self, height: int, width: int) -> int:
        batch = self.batch_size
        while batch > 1 and not self._fits(height, width, batch):
            batch //= 2
        return batch

    def plan(self, height: int, width: int) -> Plan:
        """The plan for an image of (height, width) pixels."""
        hp, wp = padded_size(height, width)
        if self.tile is not None:
            t = min(self.tile, hp, wp)
            return Plan((t, t), self._batch_for(t, t), self.tile)
        size = bucket_size(height, width) if self.buckets else (hp, wp)
        if self._fits(*size):
            return Plan(size, self._batch_for(*size))
        fitting = [t for t in _TILE_LADDER if self._fits(t, t)]
        tile = fitting[0] if fitting else _TILE_LADDER[-1]
        gib = 2 ** 30
        note = (f"{width}x{height} needs ~{estimate_memory(self.dim, hp, wp) / gib:.1f} GiB "
                f"untiled, {self.memory_limit / gib:.1f} GiB usable: tiling with "
                f"{min(tile, hp, wp)}x{min(tile, hp, wp)} tiles, overlap {self.tile_overlap}")
        t = min(tile, hp, wp)
        return Plan((t, t), self._batch_for(t, t), tile, note)

    def after_out_of_memory(self, plan: Plan) -> Plan | None:
        """The plan to retry with after `plan` ran out of memory; None: nothing smaller.

        First one image (or tile) per call, then the next smaller tile of the ladder.
        """
        if plan.batch > 1:
            return dataclasses.replace(plan, batch=1, note=f"out of memory with batches of "
                                       f"{plan.batch}: retrying one at a time")
        area = plan.size[0] * plan.size[1]
        smaller = [t for t in _TILE_LADDER if min(t, *plan.size) ** 2 < area]
        if not smaller:
            return None
        t = min(smaller[0], *plan.size)
        return Plan((t, t), 1, smaller[0], f"out of memory at {plan.size[1]}x{plan.size[0]}: "
                    f"retrying with {t}x{t} tiles, overlap {self.tile_overlap}")

    def restore(self, images: Sequence[np.ndarray], plan: Plan,
                group_size: int | None = None) -> list[np.ndarray]:
        """Restores (H, W, 3) float images in [0, 1] planned with `plan`.

        `group_size`: how many images of this plan the caller has in all (default:
        these). Calls run plan.batch images, padded with copies of the last one,
        when the group fills a batch; a smaller group runs at the next power of two.
        So a plan compiles one program, or a few powers of two for small groups.
        Returns float32 images of the inputs' sizes, clamped to [0, 1].
        """
        if plan.tile is not None:
            # Tiles are always run plan.batch at a time: one program per tile size.
            run = functools.partial(self._run, batch=plan.batch)
            return [restore_tiled(run, im, plan.tile, self.tile_overlap, plan.batch)
                    for im in images]
        full = (group_size or len(images)) >= plan.batch
        out = []
        for start in range(0, len(images), plan.batch):
            chunk = images[start:start + plan.batch]
            x = np.stack([pad_to_multiple(np.asarray(im, np.float32), size=plan.size)
                          for im in chunk])
            batch = plan.batch if full else _program_batch(len(chunk), plan.batch)
            y = np.clip(self._run(x, batch), 0.0, 1.0)
            out += [y[i, :im.shape[0], :im.shape[1]] for i, im in enumerate(chunk)]
        return out

    def _run(self, x: np.ndarray, batch: int) -> np.ndarray:
        """The model on a stack of n <= batch images, padded with copies to `batch`."""
        n = x.shape[0]
        if batch > n:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        return np.asarray(self._forward(jnp.asarray(x)))[:n]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device or host allocation failure (worth retrying smaller)."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def _program_batch(n: int, max_batch: int) -> int:
    """The next power of two >= n, at most max_batch (and at least n)."""
    return max(n, min(max_batch, 1 << (n - 1).bit_length()))
