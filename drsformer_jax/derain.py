"""Derain one image or a folder with a DRSformer checkpoint.

    python -m drsformer_jax.derain --checkpoint DIR --input PATH --output DIR

Follows the release's test.py: RGB in [0, 1], reflect-pad bottom/right to a
multiple of 8, model, clamp, crop, round to 8 bits, PNG named after the
input's stem. Grayscale inputs are derained as RGB (the gray value in all three
channels) and written gray; an alpha channel is kept as it is; 16-bit inputs
give 16-bit outputs. A file that cannot be read is named on stderr and skipped;
the others are still processed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from drsformer_jax.images import (
    ImageReadError,
    from_float,
    is_image_file,
    read_image,
    to_float,
    write_image,
)


def list_inputs(path: Path) -> list[Path]:
    """The image files at `path` (one file, or a folder's images sorted by name)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.iterdir() if p.is_file() and is_image_file(p)),
                      key=lambda p: p.name)
    raise FileNotFoundError(f"{path}: no such file or folder")


def split_channels(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """HxWxC pixels -> (RGB float in [0, 1], alpha or None, was_gray)."""
    c = arr.shape[2]
    rgb = to_float(arr[:, :, : 1 if c in (1, 2) else 3])
    alpha = arr[:, :, -1:] if c in (2, 4) else None
    gray = c in (1, 2)
    if gray:
        rgb = np.repeat(rgb, 3, axis=2)
    return rgb, alpha, gray


def merge_channels(rgb: np.ndarray, alpha: np.ndarray | None, gray: bool,
                   dtype: np.dtype) -> np.ndarray:
    """Inverse of `split_channels`: restored RGB float -> pixels of the input's kind."""
    out = from_float(rgb, dtype)
    if gray:
        # The model sees gray as R = G = B; the mean of its three outputs is the gray result.
        out = from_float(rgb.mean(axis=2, keepdims=True), dtype)
    if alpha is not None:
        out = np.concatenate([out, alpha.astype(dtype)], axis=2)
    return out


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drsformer_jax.derain",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="export dir (convert), training checkpoint or workdir")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the derained PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --output to be the input folder (inputs are never replaced)")
    args = parser.parse_args(None if argv is None else list(argv))

    try:
        inputs = list_inputs(Path(args.input))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not inputs:
        print(f"error: {args.input}: no images found", file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    in_dir = inputs[0].parent
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve() and not args.overwrite:
        print(f"error: --output {out_dir} is the input folder; pass --overwrite to write "
              "there (inputs themselves are never replaced)", file=sys.stderr)
        return 1

    from drsformer_jax.checkpoint import CheckpointError, load
    from drsformer_jax.inference import make_restore_fn, restore_image

    try:
        model, variables = load(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    restore = make_restore_fn(model, variables)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    start = time.perf_counter()
    for i, path in enumerate(inputs, 1):
        target = out_dir / f"{path.stem}.png"
        if target.resolve() in {p.resolve() for p in inputs}:
            failures.append(f"{path}: output {target} would replace an input; skipped")
            print(f"error: {failures[-1]}", file=sys.stderr)
            continue
        try:
            pixels = read_image(path)
        except ImageReadError as e:
            failures.append(str(e))
            print(f"error: {e}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        rgb, alpha, gray = split_channels(pixels)
        restored = restore_image(restore, rgb)
        write_image(target, merge_channels(restored, alpha, gray, pixels.dtype))
        h, w = pixels.shape[:2]
        print(f"[{i}/{len(inputs)}] {path.name} ({w}x{h}) -> {target} "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    done = len(inputs) - len(failures)
    print(f"derained {done} of {len(inputs)} images in {time.perf_counter() - start:.1f}s "
          f"-> {out_dir}")
    if failures:
        print(f"{len(failures)} failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
