"""Times drsformer_jax.evaluation.no_reference: seconds per image for NIQE and BRISQUE.

    python tools/time_no_reference.py [--height 321] [--width 481] [--repeat 5]

A benchmark, not a test: the image is synthetic (smooth shading, edges, texture and
noise, fixed seed), one warm-up call per metric builds the cached tables and loads the
parameter files, then the best of --repeat runs is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drsformer_jax.evaluation import no_reference  # noqa: E402


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic HxWx3 uint8 image with the kind of content NIQE/BRISQUE react to."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = 120 + 60 * np.sin(6 * x + 2 * y)[..., None] * np.array([1.0, 0.8, 0.6])
    base[(x - 0.5) ** 2 + (y - 0.3) ** 2 < 0.04] += 50  # a disc: sharp edges
    texture = 25 * np.sin(80 * x * (1 + y))[..., None]
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(base + texture + noise, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=321)
    parser.add_argument("--width", type=int, default=481)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    image = synthetic_image(args.height, args.width)
    for name in ("niqe", "brisque"):
        metric = getattr(no_reference, name)
        score = metric(image)  # warm-up: tables, parameter files
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            metric(image)
            best = min(best, time.perf_counter() - start)
        print(f"{name:8s} {args.height}x{args.width}: {best:.3f} s/image (score {score:.4f})")


if __name__ == "__main__":
    main()
