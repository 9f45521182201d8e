"""Geometric self-ensemble: the 8 flips / 90-degree rotations of an image, averaged.

The "+" of restoration papers (EDSR+, SwinIR+, ...): each image is run through
the model in all 8 orientations of the dihedral group, each output is turned
back, and the 8 are averaged. It is not the DRSformer paper's protocol (Table 1
is a single pass); it costs 8 forward passes per image.

`self_ensemble(forward)` wraps a forward `(variables, x) -> y` on NHWC batches
into one with the same signature, meant to run inside one `jax.jit`: the 8
versions of each image go through the model as one batch. A 90-degree rotation
of a non-square H x W image is W x H, so there the four orientations that keep
the shape and the four that transpose it are two batches (two model calls of two
shapes in one program); a square image (every tile) is one batch of 8.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ENSEMBLE_SIZE = 8  # the dihedral group of the square
# Orientations that keep an H x W image H x W (0, 2: rotations by 0 and 180 degrees,
# 4, 6: their mirrors), and the ones that make it W x H.
SHAPE_KEEPING = (0, 2, 4, 6)
TRANSPOSING = (1, 3, 5, 7)

Forward = Callable[[Any, jax.Array], jax.Array]


def dihedral(x: jax.Array, k: int) -> jax.Array:
    """Orientation k (0..7) of an (..., H, W, C) array: rotated by k % 4 quarter turns
    (counter-clockwise), then mirrored left-right when k >= 4."""
    if not 0 <= k < ENSEMBLE_SIZE:
        raise ValueError(f"orientation must be in 0..7, got {k}")
    y = jnp.rot90(x, k % 4, axes=(-3, -2))
    return jnp.flip(y, axis=-2) if k >= 4 else y


def inverse_dihedral(y: jax.Array, k: int) -> jax.Array:
    """Undoes `dihedral(., k)`: inverse_dihedral(dihedral(x, k), k) == x exactly."""
    if not 0 <= k < ENSEMBLE_SIZE:
        raise ValueError(f"orientation must be in 0..7, got {k}")
    x = jnp.flip(y, axis=-2) if k >= 4 else y
    return jnp.rot90(x, -(k % 4), axes=(-3, -2))


def _run_orientations(forward: Forward, variables: Any, x: jax.Array,
                      ks: tuple[int, ...]) -> tuple[jax.Array, Any]:
    """Sum (float32) over orientations `ks` of the turned-back outputs, from one model
    call; and the model's output dtype."""
    n = x.shape[0]
    # (N, K, h, w, C) -> (N*K, ...): each image's versions stay together, so a batch
    # split over devices along N keeps every image's versions on its own device.
    stacked = jnp.stack([dihedral(x, k) for k in ks], axis=1)
    y = forward(variables, stacked.reshape(n * len(ks), *stacked.shape[2:]))
    dtype = y.dtype
    y = y.reshape(n, len(ks), *y.shape[1:]).astype(jnp.float32)
    total = inverse_dihedral(y[:, 0], ks[0])
    for i, k in enumerate(ks[1:], start=1):
        total = total + inverse_dihedral(y[:, i], k)
    return total, dtype


def self_ensemble(forward: Forward) -> Forward:
    """`forward` averaged over the 8 orientations of each (N, H, W, C) input image.

    The result has `forward`'s output dtype; the mean is taken in float32 over the
    raw (unclamped) outputs, as the restoration papers' "+" does.
    """
    def ensembled(variables: Any, x: jax.Array) -> jax.Array:
        if x.shape[1] == x.shape[2]:
            total, dtype = _run_orientations(forward, variables, x, tuple(range(ENSEMBLE_SIZE)))
        else:  # the transposed orientations are W x H: a second batch of their own
            total, dtype = _run_orientations(forward, variables, x, SHAPE_KEEPING)
            total = total + _run_orientations(forward, variables, x, TRANSPOSING)[0]
        return (total / ENSEMBLE_SIZE).astype(dtype)

    return ensembled
