"""Scores restored images the way the paper's Tables 1 and 2 do.

    python -m drsformer_jax.score --results DIR --targets DIR [--protocol matlab]
        [--json FILE]
    python -m drsformer_jax.score --results DIR --protocol niqe,brisque [--json FILE]

Full-reference protocols (matlab, rcdnet, basicsr: PSNR / SSIM on the Y channel)
need --targets; the no-reference metrics (niqe, brisque: real rain, Table 2) score
the results alone; one full-reference protocol and no-reference metrics can be
combined (--protocol matlab,niqe). Images are read as 8-bit RGB: gray as R=G=B,
alpha dropped, 16 bits rounded to 8.

Files are paired by name; a result 1.png and a target 1.jpg pair by their stem
when no exact name matches. Files left unpaired are listed as warnings. Prints the
figures per image and their means; --json writes
{"protocol": ..., "mean": {"psnr": ..., "ssim": ...}, "images": {name: {...}}}
(with "niqe" / "brisque" keys for those metrics)
with the result files' names. An identical pair has PSNR inf, written Infinity in
the JSON (Python's json module reads it back), and makes the mean inf, as in the
MATLAB scripts.

Exit status: 0 when every pair was scored; 1 when some pair could not be (unreadable
image, size mismatch, too small: NIQE needs 96x96): those are named, skipped and summed
up at the end;
2 when nothing could be scored (a missing folder, no pairs) or the JSON could not
be written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from drsformer_jax.evaluation.scores import ScoreError, parse_protocol, score_folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.score",
        description="PSNR / SSIM of restored images against targets (Y channel), or NIQE / "
                    "BRISQUE of the images alone, as the DRSformer paper computes them.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, metavar="DIR",
                        help="folder of restored images")
    parser.add_argument("--targets", type=Path, metavar="DIR",
                        help="folder of ground truths (for matlab, rcdnet, basicsr)")
    parser.add_argument(
        "--protocol", default="matlab",
        help="comma-separated: matlab (Rain200L/H, SPA-Data: evaluate_PSNR_SSIM.m), rcdnet "
             "(DID-Data, DDN-Data: RCDNet's statistic.m), basicsr (the release's training "
             "validation), niqe, brisque (real rain: pyiqa's defaults) (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        parse_protocol(args.protocol)
    except ValueError as e:
        parser.error(str(e))
    try:
        return score_folders(args.results, args.targets, args.protocol, args.json)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
