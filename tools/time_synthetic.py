"""Times the synthetic rain generator: milliseconds per training pair of SIZE x SIZE.

    python tools/time_synthetic.py [--count 20] [--size 128] [--regime heavy]

The input pipeline asks for one pair per crop, so this bounds how fast the embedded
default can be fed (a few milliseconds per 128x128 pair is far below a train step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drsformer_jax.data import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--regime", default="heavy")
    args = parser.parse_args()
    synthetic.make_pair(0, "train", 0, args.size, args.size, args.regime)  # warm-up
    start = time.perf_counter()
    for i in range(args.count):
        synthetic.make_pair(0, "train", i, args.size, args.size, args.regime)
    per_pair = (time.perf_counter() - start) / args.count
    print(f"{args.size}x{args.size} {args.regime} pair: {per_pair * 1e3:.1f} ms "
          f"(mean of {args.count})")


if __name__ == "__main__":
    main()
