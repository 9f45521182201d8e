"""`Restorer`: a DRSformer run on images of any size, as the release's test.py does.

The release's procedure: RGB in [0, 1] -> reflect-pad bottom/right to a
multiple of 8 (`tiling.pad_to_multiple`) -> model (whole image, or tile by tile
with overlapping tiles averaged) -> clamp to [0, 1] -> crop back.

`Restorer` adds what a folder of real photos needs: automatic tiling when a
whole-image pass would not fit in memory (`memory.estimate_memory`), optional
size buckets and batches, so that a folder of mixed sizes compiles a handful of
programs; every call's batch is split over the local devices (an 8-GPU host
restores eight images or tiles at once); `make_restorer` also turns on the
persistent compilation cache, so that a second run does not compile at all.
Training's evaluation, `--mode evaluate` and `derain` all restore through a
`Restorer`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from drsformer_jax.checkpoints.loading import load
from drsformer_jax.inference.cache import default_cache_dir, enable_compilation_cache
from drsformer_jax.inference.ensemble import ENSEMBLE_SIZE, self_ensemble
from drsformer_jax.inference.memory import MEMORY_FRACTION, available_memory, estimate_memory
from drsformer_jax.inference.tiling import (
    DEFAULT_TILE_OVERLAP,
    TILE_BLENDS,
    bucket_size,
    pad_to_multiple,
    padded_size,
    restore_tiled,
)
from drsformer_jax.model.drsformer import SIZE_MULTIPLE

_TILE_LADDER = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 64)



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
      batch_size: images (or tiles) per device per call; fewer when memory is short.
      memory_limit: bytes a pass may use on one device; None: MEMORY_FRACTION of
        `available_memory()`.
      devices: the devices a call's batch is split over; None: every local device.
        Outputs equal one device's up to the rounding that batching itself changes.
      ensemble: x8 geometric self-ensemble (`ensemble.self_ensemble`): each image or
        tile is run in its 8 flips / rotations as one batch, and the outputs are turned
        back and averaged; 8x the work and memory per image; not the paper's protocol.
      tile_blend: how overlapping tiles are combined: 'box' (the release's average) or
        'cosine' (smooth ramps over the overlaps, no seams; `tiling.blend_weights`).
    """

    def __init__(self, model: Any, variables: Any, *, tile: int | None = None,
                 tile_overlap: int = DEFAULT_TILE_OVERLAP, buckets: bool = False,
                 batch_size: int = 1, memory_limit: int | None = None,
                 devices: Sequence[jax.Device] | None = None, ensemble: bool = False,
                 tile_blend: str = "box"):
        if tile is not None and (tile <= 0 or tile % SIZE_MULTIPLE):
            raise ValueError(f"tile size must be a positive multiple of {SIZE_MULTIPLE}, "
                             f"got {tile}")
        if tile_overlap < 0:
            raise ValueError(f"tile overlap must be >= 0, got {tile_overlap}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if tile_blend not in TILE_BLENDS:
            raise ValueError(f"unknown tile blend {tile_blend!r}; choose from "
                             f"{', '.join(TILE_BLENDS)}")
        self.dim = int(model.dim)
        devices = list(jax.local_devices() if devices is None else devices)
        self.platform = devices[0].platform
        self.mesh = Mesh(np.array(devices), ("batch",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._split = NamedSharding(self.mesh, PartitionSpec("batch"))  # a call's batch
        model = model.for_platform(self.platform)
        self.tile, self.tile_overlap = tile, tile_overlap
        self.buckets, self.batch_size = buckets, batch_size
        self.ensemble, self.tile_blend = ensemble, tile_blend
        # The variables are an argument, not a closure: closed-over arrays become
        # constants that XLA constant-folds, slowly and with different rounding, and
        # they would make the persistent cache key depend on the weights.
        def drsformer_forward(variables: Any, x: jax.Array) -> jax.Array:
            return model.apply(variables, x)

        self._apply = jax.jit(self_ensemble(drsformer_forward) if ensemble
                              else drsformer_forward)
        self.set_variables(variables)
        if memory_limit is None:
            free = available_memory()
            memory_limit = None if free is None else int(free * MEMORY_FRACTION)
        self.memory_limit = memory_limit

    def set_variables(self, variables: Any) -> None:
        """Restores with these weights from now on (same shapes: nothing recompiles)."""
        # Replicated on this restorer's devices: weights restored from a training
        # checkpoint carry the training mesh's sharding, which would make a different
        # program (and cache entry) from the same weights out of a weights directory.
        self._variables = jax.device_put(variables, self._replicated)

    @property
    def device_count(self) -> int:
        """How many devices share each call's batch."""
        return int(self.mesh.size)

    def _fits(self, height: int, width: int, batch: int = 1) -> bool:
        return (self.memory_limit is None
                or estimate_memory(self.dim, height, width,
                                   batch * (ENSEMBLE_SIZE if self.ensemble else 1), self.platform)
                <= self.memory_limit)

    def _batch_for(self, height: int, width: int) -> int:
        """Images per call: what fits one device (at most batch_size) on every device."""
        batch = self.batch_size
        while batch > 1 and not self._fits(height, width, batch):
            batch //= 2
        return batch * self.device_count

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
        need = estimate_memory(self.dim, hp, wp, backend=self.platform)
        note = (f"{width}x{height} needs ~{need / gib:.1f} GiB "
                f"untiled, {self.memory_limit / gib:.1f} GiB usable: tiling with "
                f"{min(tile, hp, wp)}x{min(tile, hp, wp)} tiles, overlap {self.tile_overlap}")
        t = min(tile, hp, wp)
        return Plan((t, t), self._batch_for(t, t), tile, note)

    def after_out_of_memory(self, plan: Plan) -> Plan | None:
        """The plan to retry with after `plan` ran out of memory; None: nothing smaller.

        First one image (or tile) per device, then the next smaller tile of the ladder.
        """
        one_each = self.device_count
        if plan.batch > one_each:
            return dataclasses.replace(plan, batch=one_each, note=f"out of memory with "
                                       f"batches of {plan.batch}: retrying one at a time"
                                       + (" per device" if one_each > 1 else ""))
        area = plan.size[0] * plan.size[1]
        smaller = [t for t in _TILE_LADDER if min(t, *plan.size) ** 2 < area]
        if not smaller:
            return None
        t = min(smaller[0], *plan.size)
        return Plan((t, t), one_each, smaller[0], f"out of memory at {plan.size[1]}x"
                    f"{plan.size[0]}: retrying with {t}x{t} tiles, overlap {self.tile_overlap}")

    def restore(self, images: Sequence[np.ndarray], plan: Plan,
                group_size: int | None = None,
                on_tiles: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Restores (H, W, 3) float images in [0, 1] planned with `plan`.

        `group_size`: how many images of this plan the caller has in all (default:
        these). Calls run plan.batch images, padded with copies of the last one,
        when the group fills a batch; a smaller group runs at the next power of two
        (times the device count). So a plan compiles one program, or a few for small
        groups.
        Returns float32 images of the inputs' sizes, clamped to [0, 1].
        `on_tiles(done, total)`: the tiles of each tiled image, as they are run.
        """
        if plan.tile is not None:
            # Tiles are always run plan.batch at a time: one program per tile size.
            run = functools.partial(self._run, batch=plan.batch)
            return [restore_tiled(run, im, plan.tile, self.tile_overlap, plan.batch, on_tiles,
                                  blend=self.tile_blend)
                    for im in images]
        full = (group_size or len(images)) >= plan.batch
        out = []
        for start in range(0, len(images), plan.batch):
            chunk = images[start:start + plan.batch]
            x = np.stack([pad_to_multiple(np.asarray(im, np.float32), size=plan.size)
                          for im in chunk])
            batch = (plan.batch if full
                     else _program_batch(len(chunk), plan.batch, self.device_count))
            y = np.clip(self._run(x, batch), 0.0, 1.0)
            out += [y[i, :im.shape[0], :im.shape[1]] for i, im in enumerate(chunk)]
        return out

    def _run(self, x: np.ndarray, batch: int) -> np.ndarray:
        """The model on a stack of n <= batch images, padded with copies to `batch`."""
        n = x.shape[0]
        if batch > n:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        x = jax.device_put(x, self._split)
        return np.asarray(self._apply(self._variables, x))[:n]


def _program_batch(n: int, max_batch: int, devices: int = 1) -> int:
    """The next power of two >= n, at most max_batch (and at least n), rounded up to a
    multiple of `devices` (max_batch is one)."""
    batch = max(n, min(max_batch, 1 << (n - 1).bit_length()))
    return -(-batch // devices) * devices


def make_restorer(checkpoint: str | os.PathLike, *, tile: int | None = None,
                  tile_overlap: int = DEFAULT_TILE_OVERLAP, buckets: bool = False,
                  batch_size: int = 1, memory_limit_gib: float | None = None,
                  cache_dir: str | os.PathLike | None = None, ensemble: bool = False,
                  tile_blend: str = "box", **load_kwargs: Any) -> Restorer:
    """Loads `checkpoint` into a Restorer (arguments: derain's restore flags).

    Turns the persistent compilation cache on first: `cache_dir`, or
    `default_cache_dir()` when None; "none" turns it off.
    """
    cache = default_cache_dir() if cache_dir is None else cache_dir
    cache = None if str(cache).lower() in ("none", "") else cache
    try:
        enable_compilation_cache(cache)
    except OSError as e:  # a read-only home, say: run without the cache
        print(f"note: compilation cache off: cannot create {cache} ({e.strerror or e})",
              file=sys.stderr)
        enable_compilation_cache(None)
    model, variables = load(checkpoint, **load_kwargs)
    limit = None if memory_limit_gib is None else int(memory_limit_gib * 2 ** 30)
    return Restorer(model, variables, tile=tile, tile_overlap=tile_overlap, buckets=buckets,
                    batch_size=batch_size, memory_limit=limit, ensemble=ensemble,
                    tile_blend=tile_blend)
