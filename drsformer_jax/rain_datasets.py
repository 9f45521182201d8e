"""CLI: prepare the release's deraining sets as TFDS array_record shards.

    python -m drsformer_jax.rain_datasets --dataset Rain200H --manual-dir data \\
        --data-dir ~/tensorflow_datasets

The builders are `drsformer_jax.data.tfds_builders` (see data/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from drsformer_jax.data import tfds_builders
from drsformer_jax.data.sources import DatasetError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prepare the release's deraining sets as TFDS array_record shards.")
    parser.add_argument("--dataset", nargs="+", required=True,
                        choices=[*tfds_builders.BUILDERS, "all"], help="data set(s) to prepare")
    parser.add_argument("--manual-dir", default="data",
                        help="root of <root>/{train,test}/<Dataset>/{input,target}")
    parser.add_argument("--data-dir", default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    names = list(tfds_builders.BUILDERS) if "all" in args.dataset else args.dataset
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
    for name in names:
        try:
            tfds_builders.prepare(name, args.manual_dir, data_dir)
        except (DatasetError, AssertionError) as e:  # TFDS asserts on a bad manual dir
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
