"""Running an exported DRSformer (`python -m drsformer_jax.export`) with JAX alone.

    from drsformer_jax.exported import load_exported   # or drsformer_jax.load_exported
    derain = load_exported("exported/")
    restored = derain(rainy)   # float32 (H, W, 3) or (N, H, W, 3) in [0, 1], any size

This file imports nothing but JAX and NumPy (no Flax, no model code), and the
export command copies it into its output folder as `drsformer_exported.py`,
so a serving host needs only `pip install jax` (plus the accelerator plugin).
The program (`model.stablehlo`) takes (N, 8*h, 8*w, 3) float32; `load_exported`
adds the release's test.py procedure around it: reflect-pad bottom/right to a
multiple of 8, run, clamp to [0, 1], crop back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax import export

PROGRAM_FILE = "model.stablehlo"
MULTIPLE = 8


def reflect_indices(size: int, target: int) -> np.ndarray:
    """Indices 0..target-1 into a side of `size`, reflected at the end without repeating
    the edge (PyTorch's 'reflect'), and reflected again past it (0 1 2 -> 0 1 2 1 0 1 2 1);
    a side of one pixel is repeated. The same as NumPy's pad mode 'reflect'."""
    if size == 1:
        return np.zeros(target, np.int64)
    period = 2 * (size - 1)
    i = np.arange(target) % period
    return np.where(i < size, i, period - i)


def load_exported(directory: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model as a function of float32 images in [0, 1] of any size."""
    program = export.deserialize(bytearray((Path(directory) / PROGRAM_FILE).read_bytes()))

    def derain(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.float32)
        single = x.ndim == 3
        x = x[None] if single else x
        h, w = x.shape[1:3]
        hp, wp = -(-h // MULTIPLE) * MULTIPLE, -(-w // MULTIPLE) * MULTIPLE
        x = x[:, reflect_indices(h, hp)][:, :, reflect_indices(w, wp)]
        y = np.clip(np.asarray(program.call(jax.numpy.asarray(x))), 0.0, 1.0)[:, :h, :w]
        return y[0] if single else y

    return derain
