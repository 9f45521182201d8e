"""Times drsformer_jax.metrics.evaluate_batch: N pairs of SIZE x SIZE per protocol.

    python tools/time_metrics.py [--count 1400] [--size 512] [--workers N]

Pairs are scored in batches of --batch distinct pairs (kept in memory) until --count
pairs are done, so the figure is the metric work alone, without decoding files
(`time python -m drsformer_jax.score ...` measures the CLI with decoding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drsformer_jax.evaluation import metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--protocol", choices=metrics.PROTOCOLS, action="append")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, 3)
    targets = rng.integers(0, 256, shape, dtype=np.uint8)
    noise = rng.integers(-12, 13, shape, dtype=np.int16)
    results = np.clip(targets + noise, 0, 255).astype(np.uint8)
    for protocol in args.protocol or metrics.PROTOCOLS:
        metrics.evaluate_batch(results[:2], targets[:2], protocol, workers=args.workers)
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while done < args.count:
            n = min(args.batch, args.count - done)
            metrics.evaluate_batch(results[:n], targets[:n], protocol, workers=args.workers)
            done += n
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        # CPU time too: on a shared machine it says more than the wall time.
        print(f"{protocol:8s} {args.count} pairs of {args.size}x{args.size}: {took:6.1f} s "
              f"({took / args.count * 1e3:.1f} ms per pair), {cpu:.1f} CPU-s")


if __name__ == "__main__":
    main()
