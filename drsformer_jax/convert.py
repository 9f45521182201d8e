"""Converting the release's PyTorch checkpoints to Flax and back.

    python -m drsformer_jax.convert --torch-checkpoint deraining.pth --output DIR
    python -m drsformer_jax.convert --to-torch --checkpoint DIR --output model.pth

Forward: reads `{'params': state_dict}` or a bare state dict, infers the
architecture from tensor names and shapes, checks that every tensor maps onto
the model (reporting all missing, unexpected and mis-shaped names at once),
then writes an export directory (`checkpoints.export`). Nothing is written
unless everything fits. Reverse: any checkpoint `drsformer_jax.load` accepts
becomes a release-format `.pth` that the release loads with `strict=True`.
PyTorch is not needed either way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from drsformer_jax.checkpoints.conversion import (
    convert_torch_checkpoint,
    describe,
    write_torch_checkpoint,
)
from drsformer_jax.checkpoints.export import CheckpointError
from drsformer_jax.checkpoints.loading import load_params
from drsformer_jax.checkpoints.torch_format import TorchCheckpointError


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.convert",
        description="Convert DRSformer checkpoints between the PyTorch release and Flax.")
    parser.add_argument("--torch-checkpoint", help="release .pth to convert to Flax")
    parser.add_argument("--to-torch", action="store_true",
                        help="convert a Flax checkpoint (--checkpoint) to a release .pth")
    parser.add_argument("--checkpoint", "--flax-checkpoint", dest="checkpoint",
                        help="with --to-torch: export dir, training checkpoint or workdir")
    parser.add_argument("--output", required=True,
                        help="output directory (to Flax) or .pth file (--to-torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        if args.to_torch:
            if not args.checkpoint:
                parser.error("--to-torch needs --checkpoint DIR")
            _, params = load_params(args.checkpoint)
            n = write_torch_checkpoint(params, args.output, args.overwrite)
            print(f"wrote {n} tensors to {args.output}")
        else:
            if not args.torch_checkpoint:
                parser.error("give --torch-checkpoint FILE (or --to-torch --checkpoint DIR)")
            config = convert_torch_checkpoint(args.torch_checkpoint, args.output,
                                              args.overwrite)
            print(f"converted {args.torch_checkpoint} -> {args.output}: "
                  f"DRSformer({describe(config)})")
    except (CheckpointError, TorchCheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
