"""Padding, size buckets and tiles: the geometry of the release's test.py procedure.

`pad_to_multiple` is the project's one padding helper: reflect-pad bottom/right
to a multiple of 8, as the release does before the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drsformer_jax.model.drsformer import SIZE_MULTIPLE

DEFAULT_TILE_OVERLAP = 32  # the release's --tile_overlap default


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



def restore_tiled(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile: int,
                  overlap: int = DEFAULT_TILE_OVERLAP, batch: int = 1,
                  on_tiles: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The release's tiled pass over one (H, W, 3) image; returns it restored and clamped.

    The image is reflect-padded to a multiple of 8; the tile is min(tile, H, W) of
    the padded size; tiles at `tile_positions` are run `batch` at a time through
    `forward` (unclamped, (n, t, t, 3) -> (n, t, t, 3)), their outputs summed in the
    release's order (rows outer, columns inner) and divided by the number of tiles
    covering each pixel; then clamped and cropped. `on_tiles(done, total)` is told
    the progress after every call (a progress bar for large images).
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
        if on_tiles is not None:
            on_tiles(start + len(chunk), len(origins))
    return np.clip(acc / count, 0.0, 1.0)[:h, :w]
