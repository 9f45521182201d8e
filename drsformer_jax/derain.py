"""Derain one image or a folder with a DRSformer checkpoint.

    python -m drsformer_jax.derain --checkpoint DIR --input PATH --output DIR
        [--tile N [--tile-overlap 32] [--tile-blend box|cosine]] [--ensemble]
        [--batch-size B] [--buckets]
        [--cache-dir DIR] [--memory-limit GIB] [--overwrite]

Follows the release's test.py: RGB in [0, 1], reflect-pad bottom/right to a
multiple of 8, model (tile by tile with --tile), clamp, crop, round, PNG named
after the input's stem (<stem>_<ext>.png where two inputs share a stem, _2, _3
added where even that is taken). Images too large for the memory are tiled
automatically, with a note. EXIF orientation is applied: outputs are upright.

Channels: gray inputs are derained as RGB (the gray value in all three
channels) and written gray, the mean of the three restored channels; an alpha
channel is copied unchanged; 16-bit inputs give 16-bit outputs. A file that
cannot be read is named in one line and skipped, the others are still
processed, and the exit status is 1. Inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from drsformer_jax import inference
from drsformer_jax.inference import make_restorer, restore_jobs
from drsformer_jax.inference.photos import folder_jobs, list_inputs
from drsformer_jax.utils.files import IMAGE_EXTENSIONS, ensure_writable_dir, quiet_library_logs


def _positive_multiple_of_8(text: str) -> int:
    value = int(text)
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_restore_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape how images are run (tiles, batches, buckets, cache, memory,
    ensemble); also reproduce's."""
    parser.add_argument("--tile", type=_positive_multiple_of_8, metavar="N",
                        help="run every image tile by tile with N x N tiles (a multiple of 8), "
                             "as the release's --tile; default: only images that would not "
                             "fit in memory are tiled")
    parser.add_argument("--tile-overlap", type=_non_negative, metavar="PX",
                        default=inference.DEFAULT_TILE_OVERLAP,
                        help="overlap of neighbouring tiles (default: %(default)s)")
    parser.add_argument("--tile-blend", choices=inference.TILE_BLENDS, default="box",
                        help="how overlapping tiles are combined: box, the release's average "
                             "(default), or cosine, a smooth ramp over the overlap that "
                             "leaves no seams where tiles disagree")
    parser.add_argument("--ensemble", action="store_true",
                        help="x8 self-ensemble: every image (or tile) in its 8 flips and "
                             "rotations, turned back and averaged; 8x the time, not the "
                             "paper's protocol")
    parser.add_argument("--batch-size", type=_positive, default=1, metavar="B",
                        help="images of one size (or tiles) per device per model call; "
                             "each call is split over every local device (default: 1)")
    parser.add_argument("--buckets", action="store_true",
                        help="pad images to a few bucket sizes (sides rounded up by < 1/8) so "
                             "that mixed sizes share compiled programs; results differ "
                             "slightly from the release's pad-to-8 (see README)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="persistent compilation cache (default: $DRSFORMER_JAX_CACHE, "
                             "else $XDG_CACHE_HOME/drsformer_jax/jax_cache, XDG_CACHE_HOME "
                             "defaulting to ~/.cache; 'none' turns it off)")
    parser.add_argument("--memory-limit", type=_positive_float, metavar="GIB",
                        help="memory a forward pass may use, in GiB (default: 80%% of the "
                             "free device memory / RAM); larger images are tiled")


class _RefusedError(Exception):
    """Nothing can be started; the message is the one error line."""


def _inputs_and_output(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """The images to derain and a writable output folder, checked before any model work."""
    try:
        inputs = list_inputs(Path(args.input))
    except FileNotFoundError as e:
        raise _RefusedError(str(e)) from None
    except OSError as e:
        raise _RefusedError(f"{args.input}: cannot list ({e.strerror or e})") from None
    if not inputs:
        raise _RefusedError(f"{args.input}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    out_dir = Path(args.output)
    if out_dir.exists() and out_dir.resolve() == inputs[0].parent.resolve() \
            and not args.overwrite:
        raise _RefusedError(f"--output {out_dir} is the input folder; pass --overwrite to write "
                       "there (inputs themselves are never replaced)")
    try:
        ensure_writable_dir(out_dir)
    except OSError as e:
        raise _RefusedError(f"--output {out_dir}: cannot write there ({e.strerror or e})") from None
    return inputs, out_dir


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.derain", description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="weights dir (convert), training checkpoint or workdir, or a "
                             "release .pth")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the derained PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --output to be the input folder (inputs are never replaced)")
    add_restore_flags(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    quiet_library_logs()
    start, done = time.perf_counter(), 0
    try:
        inputs, out_dir = _inputs_and_output(args)
        jobs, failures = folder_jobs(inputs, out_dir)
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        if jobs:
            try:
                restorer = make_restorer(
                    args.checkpoint, tile=args.tile, tile_overlap=args.tile_overlap,
                    buckets=args.buckets, batch_size=args.batch_size,
                    memory_limit_gib=args.memory_limit, cache_dir=args.cache_dir,
                    ensemble=args.ensemble, tile_blend=args.tile_blend)
            except ValueError as e:  # CheckpointError is a ValueError
                raise _RefusedError(str(e)) from None
            done, failed = restore_jobs(restorer, jobs)
            failures += failed
    except _RefusedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the outputs written so far are complete", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    print(f"derained {done} of {len(inputs)} images in {seconds:.1f}s "
          f"({done / max(seconds, 1e-9):.2f} images/s) -> {out_dir}")
    if failures:
        print(f"{len(failures)} of {len(inputs)} failed:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
