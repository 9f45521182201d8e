"""Running a DRSformer on whole images, as the release's test.py does.

RGB in [0, 1] -> reflect-pad bottom/right to a multiple of 8 -> model ->
clamp to [0, 1] -> crop back. `pad_to_multiple` is the project's one padding
helper (evaluation during training uses it too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drsformer_jax.models import SIZE_MULTIPLE


def padded_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The smallest (H, W) >= (height, width) that are multiples of `multiple`."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to_multiple(x: np.ndarray | jax.Array, multiple: int = SIZE_MULTIPLE,
                    size: tuple[int, int] | None = None) -> np.ndarray | jax.Array:
    """Reflect-pads the bottom and right of an (N, H, W, C) or (H, W, C) image.

    Pads to the next multiple of `multiple`, or to `size` when given. Reflection
    does not repeat the edge pixel (PyTorch's 'reflect'); for pads wider than
    the image it reflects again, so even a 3x3 image can be padded to 8x8.
    """
    h, w = x.shape[-3], x.shape[-2]
    th, tw = size if size is not None else padded_size(h, w, multiple)
    if th < h or tw < w:
        raise ValueError(f"cannot pad an image of {h}x{w} to {th}x{tw}")
    if (th, tw) == (h, w):
        return x
    widths = [(0, 0)] * (x.ndim - 3) + [(0, th - h), (0, tw - w), (0, 0)]
    xp = np if isinstance(x, np.ndarray) else jnp
    if h == 1 or w == 1:  # reflection needs two pixels along an axis
        return xp.pad(x, widths, mode="edge")
    return xp.pad(x, widths, mode="reflect")


def make_restore_fn(model: Any, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted (N, H, W, 3) -> (N, H, W, 3) restoration, clamped to [0, 1].

    H and W must be multiples of 8; compiled once per input shape.
    """

    # The variables are an argument, not a closure: closed-over arrays become
    # constants that XLA constant-folds, slowly and with different rounding.
    @jax.jit
    def restore(variables: Any, x: jax.Array) -> jax.Array:
        return jnp.clip(model.apply(variables, x), 0.0, 1.0)

    return functools.partial(restore, variables)


def restore_image(restore: Callable[[jax.Array], jax.Array], image: np.ndarray) -> np.ndarray:
    """One (H, W, 3) float image in [0, 1] -> restored (H, W, 3) float32, release-style."""
    h, w = image.shape[:2]
    out = restore(jnp.asarray(pad_to_multiple(image.astype(np.float32))[None]))
    return np.asarray(out[0, :h, :w])
