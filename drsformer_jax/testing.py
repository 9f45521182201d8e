"""Deterministic weights and inputs for parity fixtures and tests.

Parity fixtures store the release's output, not its weights: the weights are
regenerated here, bit for bit, from (seed, tensor name). Values come from the
raw PCG64 stream, whose output NumPy guarantees stable across versions, turned
into float32 with exact arithmetic -- so the fixture generator (which runs the
release) and the tests (which do not) see identical numbers.

Every kind of tensor is moved off its initial value (LayerNorm weights and
biases, temperatures, the attn1..attn4 mixing weights), or a wrong mapping of
it could go unnoticed.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import numpy as np


def uniform(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 uniform in [-1, 1) from (seed, name), platform- and version-independent."""
    n = int(np.prod(shape, dtype=np.int64))
    key = (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63
    raw = np.random.PCG64(key).random_raw(n) if n else np.zeros(0, np.uint64)
    u = (raw >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23)  # [0, 2)
    return (u - np.float32(1.0)).reshape(shape)


def random_tensor(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A release tensor with values of the right scale for its role (float32)."""
    u = uniform(seed, name, shape)
    f = np.float32
    if re.search(r"norm[12]\.body\.weight$", name):
        return f(1.0) + f(0.5) * u
    if re.search(r"norm[12]\.body\.bias$", name):
        return f(0.3) * u
    if name.endswith(".temperature"):
        return f(1.75) + f(1.25) * u  # (0.5, 3)
    if re.search(r"\.attn[1-4]$", name):
        return f(0.2) + f(0.6) * u
    if name.endswith(".bias"):
        return f(0.2) * u
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    # A little above PyTorch's default scale so that every stage moves the output.
    return f(1.5 / np.sqrt(fan_in)) * u


def random_state_dict(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]],
                      seed: int) -> dict[str, np.ndarray]:
    """A release-format state dict (torch names, OIHW shapes) of `random_tensor`s."""
    return {name: random_tensor(seed, name, tuple(shape)) for name, shape in names_and_shapes}


def odd_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """NHWC float32 test images in [0, 1] with awkward content: saturated 0 and 1 areas,
    a constant patch, sharp edges, smooth gradients and per-pixel noise."""
    yy, xx = np.meshgrid(np.linspace(0, 1, height, dtype=np.float32),
                         np.linspace(0, 1, width, dtype=np.float32), indexing="ij")
    images = []
    for b in range(batch):
        u = (uniform(seed + b, "odd_images", (height, width, 3)) + 1) / 2
        img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(9 * xx * yy + b)], axis=-1)
        img = np.where(u > 0.85, u, img)  # speckle
        img[: height // 4, : width // 4] = 1.0  # saturated white
        img[-height // 4:, -width // 4:] = 0.0  # black
        img[height // 3: height // 2, width // 2: 3 * width // 4] = np.float32(0.37)
        img[:, width // 2 + b] = 1.0 - img[:, width // 2 + b]  # a sharp line
        images.append(img if b % 2 == 0 else u)  # every other image: pure noise
    return np.clip(np.stack(images), 0, 1).astype(np.float32)
