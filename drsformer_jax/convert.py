"""Converting the release's PyTorch checkpoints to Flax and back.

    python -m drsformer_jax.convert --torch-checkpoint deraining.pth --output DIR
    python -m drsformer_jax.convert --to-torch --checkpoint DIR --output model.pth

Forward: reads `{'params': state_dict}` or a bare state dict (names all prefixed
'module.', as DataParallel saves them, are read without the prefix, with a
note), infers the architecture from tensor names and shapes, checks that every
tensor maps onto the model (reporting all missing, unexpected and mis-shaped
names at once) and that every weight is finite, then writes a weights directory
(`checkpoints.weights_dir`). Nothing is written unless everything fits. Reverse: any
Flax checkpoint `drsformer_jax.load` accepts (weights directory, training workdir
or step directory) becomes a release-format `.pth` that the release loads with
`strict=True`; a `.pth` given there is refused (use it as it is). PyTorch is not
needed either way.

Paths, flags and the output's writability are checked before anything is read.
Exit status: 0 done, 1 a bad input or output (one `error:` line), 2 bad flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from drsformer_jax.checkpoints.conversion import describe, write_torch_checkpoint
from drsformer_jax.checkpoints.loading import check_path, load_params
from drsformer_jax.checkpoints.torch_format import TorchCheckpointError
from drsformer_jax.checkpoints.weights_dir import CheckpointError, save_weights_dir
from drsformer_jax.utils.files import ensure_writable_dir, quiet_library_logs


class _RefusedError(Exception):
    """Nothing (more) can be done; the message is the one error line."""


def _parse(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.convert",
        description="Convert DRSformer checkpoints between the PyTorch release and Flax.")
    parser.add_argument("--torch-checkpoint", metavar="FILE",
                        help="release .pth to convert to Flax")
    parser.add_argument("--to-torch", action="store_true",
                        help="convert a Flax checkpoint (--checkpoint) to a release .pth")
    parser.add_argument("--checkpoint", "--flax-checkpoint", dest="checkpoint", metavar="DIR",
                        help="with --to-torch: weights dir, training checkpoint or workdir")
    parser.add_argument("--output", required=True,
                        help="output directory (to Flax) or .pth file (--to-torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(None if argv is None else list(argv))
    quiet_library_logs()
    if args.to_torch:
        if args.torch_checkpoint:
            parser.error("--torch-checkpoint does not apply with --to-torch, which reads a "
                         "Flax checkpoint: give --checkpoint DIR")
        if not args.checkpoint:
            parser.error("--to-torch needs --checkpoint DIR")
    else:
        if args.checkpoint:
            parser.error("--checkpoint applies only with --to-torch; to convert a release "
                         ".pth to Flax, give --torch-checkpoint FILE")
        if not args.torch_checkpoint:
            parser.error("give --torch-checkpoint FILE (or --to-torch --checkpoint DIR)")
    return args


def _writable_folder(folder: Path, output: Path) -> None:
    try:
        ensure_writable_dir(folder)
    except OSError as e:
        raise _RefusedError(f"--output {output}: cannot write in {folder} "
                            f"({e.strerror or e})") from None


def _to_flax(args: argparse.Namespace, notes: list[str]) -> None:
    source, output = Path(args.torch_checkpoint), Path(args.output)
    if not source.exists():
        raise _RefusedError(f"{source}: no such file")
    if source.is_dir():
        raise _RefusedError(f"{source}: is a directory; --torch-checkpoint takes a release .pth "
                            f"file (to write a .pth from a Flax checkpoint: --to-torch "
                            f"--checkpoint {source})")
    if output.exists() and not output.is_dir():
        raise _RefusedError(f"--output {output}: is a file; convert writes a weights "
                            "directory (a folder)")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise _RefusedError(f"--output {output}: exists and is not empty; pass --overwrite to "
                            "replace it")
    _writable_folder(output.absolute().parent, output)  # written aside, renamed into place

    config, params = load_params(source, notes=notes)
    _print_notes(notes)
    try:
        save_weights_dir(output, config, params, overwrite=args.overwrite,
                         metadata={"converted_from": source.name})
    except OSError as e:
        raise _RefusedError(f"--output {output}: cannot write ({e.strerror or e})") from None
    print(f"converted {source} -> {output}: DRSformer({describe(config)})")


def _to_torch(args: argparse.Namespace, notes: list[str]) -> None:
    source, output = check_path(args.checkpoint), Path(args.output)
    if source.is_file():
        raise _RefusedError(f"{source}: is a file; --to-torch reads a Flax checkpoint (a weights "
                            "directory, a training workdir or step directory). A release .pth "
                            "needs no conversion: use it as it is, or convert it to Flax with "
                            f"--torch-checkpoint {source}")
    if output.is_dir():
        raise _RefusedError(f"--output {output}: is a folder; --to-torch writes a .pth file "
                            f"(e.g. {output / 'model.pth'})")
    if output.exists() and not args.overwrite:
        raise _RefusedError(f"--output {output}: exists; pass --overwrite to replace it")
    _writable_folder(output.absolute().parent, output)

    _, params = load_params(source, notes=notes)
    _print_notes(notes)
    try:
        n = write_torch_checkpoint(params, output, args.overwrite)
    except OSError as e:
        raise _RefusedError(f"--output {output}: cannot write ({e.strerror or e})") from None
    print(f"wrote {n} tensors to {output}")


def _print_notes(notes: list[str]) -> None:
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    notes.clear()


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse(argv)
    notes: list[str] = []
    try:
        (_to_torch if args.to_torch else _to_flax)(args, notes)
    except (_RefusedError, CheckpointError, TorchCheckpointError, OSError) as e:
        _print_notes(notes)
        if isinstance(e, OSError):
            message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        else:
            message = str(e)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
