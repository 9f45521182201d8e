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
# How overlapping tiles are combined: the release's average, or smooth ramps.
TILE_BLENDS = ("box", "cosine")


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


def blend_weights(size: int, tile: int, overlap: int,
                  blend: str = "box") -> tuple[list[int], np.ndarray]:
    """Tile origins along one side and each tile's weights, (n, tile) float64.

    At every pixel the weights of the tiles covering it sum to one, so a 2-D
    tile's weight (the outer product of its row and column weights) does too.
    'box': 1 / (tiles covering the pixel), the release's average. 'cosine': each
    tile ramps up over its overlap with the previous tile and down over its overlap
    with the next one (sin^2 at pixel centres: positive everywhere, and two
    overlapping ramps already sum to one); image borders are not ramped.
    """
    if blend not in TILE_BLENDS:
        raise ValueError(f"unknown tile blend {blend!r}; choose from {', '.join(TILE_BLENDS)}")
    origins = tile_positions(size, tile, overlap)
    raw = np.ones((len(origins), tile))
    if blend == "cosine":
        d = np.arange(tile) + 0.5
        for a, o in enumerate(origins):
            if a > 0 and (left := origins[a - 1] + tile - o) > 0:
                raw[a] *= np.where(d < left, np.sin(np.pi / 2 * d / left) ** 2, 1.0)
            if a + 1 < len(origins) and (right := o + tile - origins[a + 1]) > 0:
                raw[a] *= np.where(d[::-1] < right, np.sin(np.pi / 2 * d[::-1] / right) ** 2,
                                   1.0)
    total = np.zeros(size)
    for o, w in zip(origins, raw, strict=True):
        total[o:o + tile] += w
    return origins, np.stack([w / total[o:o + tile] for o, w in zip(origins, raw, strict=True)])


def restore_tiled(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile: int,
                  overlap: int = DEFAULT_TILE_OVERLAP, batch: int = 1,
                  on_tiles: Callable[[int, int], None] | None = None,
                  blend: str = "box") -> np.ndarray:
    """The release's tiled pass over one (H, W, 3) image; returns it restored and clamped.

    The image is reflect-padded to a multiple of 8; the tile is min(tile, H, W) of
    the padded size; tiles at `tile_positions` are run `batch` at a time through
    `forward` (unclamped, (n, t, t, 3) -> (n, t, t, 3)), their outputs summed in the
    release's order (rows outer, columns inner) and divided by the number of tiles
    covering each pixel; then clamped and cropped. `blend='cosine'` weights each
    tile with `blend_weights` instead (a smooth ramp over the overlaps: no seams
    where neighbouring tiles disagree; not the release's result). `on_tiles(done,
    total)` is told the progress after every call (a progress bar for large images).
    """
    if tile <= 0 or tile % SIZE_MULTIPLE:
        raise ValueError(f"tile size must be a positive multiple of {SIZE_MULTIPLE}, got {tile}")
    if blend not in TILE_BLENDS:
        raise ValueError(f"unknown tile blend {blend!r}; choose from {', '.join(TILE_BLENDS)}")
    h, w = image.shape[:2]
    x = pad_to_multiple(np.asarray(image, np.float32))
    hp, wp = x.shape[:2]
    tile = min(tile, hp, wp)
    rows, row_w = blend_weights(hp, tile, overlap, blend)
    cols, col_w = blend_weights(wp, tile, overlap, blend)
    origins = [(a, b) for a in range(len(rows)) for b in range(len(cols))]
    acc = np.zeros((hp, wp, x.shape[2]), np.float32)
    count = np.zeros((hp, wp, 1), np.float32)
    for start in range(0, len(origins), batch):
        chunk = origins[start:start + batch]
        tiles = np.stack([x[rows[a]:rows[a] + tile, cols[b]:cols[b] + tile] for a, b in chunk])
        out = np.asarray(forward(tiles), np.float32)
        for (a, b), patch in zip(chunk, out, strict=False):
            i, j = rows[a], cols[b]
            if blend == "box":  # the release's sum, then one division by the count
                acc[i:i + tile, j:j + tile] += patch
                count[i:i + tile, j:j + tile] += 1.0
            else:  # weights that already sum to one
                weight = np.outer(row_w[a], col_w[b]).astype(np.float32)[..., None]
                acc[i:i + tile, j:j + tile] += weight * patch
        if on_tiles is not None:
            on_tiles(start + len(chunk), len(origins))
    restored = acc / count if blend == "box" else acc
    return np.clip(restored, 0.0, 1.0)[:h, :w]


def tile_borders(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start or end inside a side of `size` (padded) pixels: the seam lines b,
    between pixels b - 1 and b."""
    origins = tile_positions(size, tile, overlap)
    return sorted({o for o in origins if o > 0} | {o + tile for o in origins if o + tile < size})


def seam_step(tiled: np.ndarray, whole: np.ndarray, tile: int,
              overlap: int = DEFAULT_TILE_OVERLAP) -> float:
    """The largest seam step of a tiled result: over every tile border line (both axes),
    the mean absolute jump across the line of (tiled - whole), the image's own edges
    cancelled by the whole-image result; in the images' units (x 255 for gray levels).

    `tiled`, `whole`: (H, W, C) results of one image, as `restore_tiled` ran it
    with `tile` and `overlap` (the borders are those of its padded geometry).
    """
    diff = np.asarray(tiled, np.float64) - np.asarray(whole, np.float64)
    h, w = diff.shape[:2]
    hp, wp = padded_size(h, w)
    t = min(tile, hp, wp)
    steps = [np.abs(diff[b] - diff[b - 1]).mean() for b in tile_borders(hp, t, overlap) if b < h]
    steps += [np.abs(diff[:, b] - diff[:, b - 1]).mean()
              for b in tile_borders(wp, t, overlap) if b < w]
    return float(max(steps, default=0.0))
