"""How far tiled results are from whole-image ones, and how visible their seams are.

    python -m drsformer_jax.tile_seams --tiled DIR --whole DIR --tile 64 [--tile-overlap 16]

Pairs the PNGs of two derain runs of the same images by name (one with --tile,
one without) and prints per image, and as means: the PSNR of the tiled result
against the whole-image one (MATLAB protocol, Y channel), and the largest seam
step: over every tile border line (the tile geometry of derain's --tile and
--tile-overlap), the mean absolute jump across the line of (tiled - whole), in
8-bit gray levels (`inference.tiling.seam_step`), beside the mean jump across the
other lines (what content alone gives). Exit status 1 when nothing pairs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drsformer_jax.evaluation import metrics
from drsformer_jax.evaluation.scores import ScoreError, folder_images, pair_files
from drsformer_jax.inference.tiling import (
    DEFAULT_TILE_OVERLAP,
    padded_size,
    seam_step,
    tile_borders,
)
from drsformer_jax.utils.images import ImageReadError, read_rgb8


def other_lines_step(tiled: np.ndarray, whole: np.ndarray, tile: int, overlap: int) -> float:
    """The mean absolute jump of (tiled - whole) across the lines that are not tile borders,
    averaged over those lines: what a seam step compares with (gray levels of the input)."""
    diff = tiled.astype(np.float64) - whole.astype(np.float64)
    h, w = diff.shape[:2]
    hp, wp = padded_size(h, w)
    t = min(tile, hp, wp)
    rows = set(tile_borders(hp, t, overlap))
    cols = set(tile_borders(wp, t, overlap))
    steps = [np.abs(diff[b] - diff[b - 1]).mean() for b in range(1, h) if b not in rows]
    steps += [np.abs(diff[:, b] - diff[:, b - 1]).mean() for b in range(1, w) if b not in cols]
    return float(np.mean(steps)) if steps else 0.0


def compare(tiled: np.ndarray, whole: np.ndarray, tile: int, overlap: int) -> dict[str, float]:
    """{'psnr': tiled vs whole (Y, MATLAB), 'seam_step': largest seam step, 'other_step':
    the mean step across the other lines; steps in 8-bit gray levels}."""
    psnr = metrics.evaluate(tiled, whole, "matlab")["psnr"]
    return {"psnr": psnr, "seam_step": seam_step(tiled / 255.0, whole / 255.0, tile, overlap)
            * 255.0, "other_step": other_lines_step(tiled, whole, tile, overlap)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drsformer_jax.tile_seams",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tiled", type=Path, required=True, metavar="DIR",
                        help="derain's output with --tile")
    parser.add_argument("--whole", type=Path, required=True, metavar="DIR",
                        help="derain's output without --tile (same inputs)")
    parser.add_argument("--tile", type=int, required=True, help="the --tile of the tiled run")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP,
                        help="the --tile-overlap of the tiled run (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        pairs = pair_files(folder_images(args.tiled, "tiled"),
                           folder_images(args.whole, "whole")).pairs
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = []
    for tiled, whole in pairs:
        try:
            a, b = read_rgb8(tiled), read_rgb8(whole)
        except ImageReadError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        rows.append(compare(a, b, args.tile, args.tile_overlap))
        print(f"{tiled.name}: PSNR {rows[-1]['psnr']:.2f} dB, largest seam step "
              f"{rows[-1]['seam_step']:.3f} gray levels (other lines "
              f"{rows[-1]['other_step']:.3f})")
    if not rows:
        print("error: no pairs of tiled and whole results", file=sys.stderr)
        return 1
    print(f"mean of {len(rows)}: PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB, largest "
          f"seam step {np.mean([r['seam_step'] for r in rows]):.3f} (max "
          f"{max(r['seam_step'] for r in rows):.3f}) gray levels; other lines "
          f"{np.mean([r['other_step'] for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
