"""Export a DRSformer checkpoint for serving: StableHLO and a TensorFlow SavedModel.

    python -m drsformer_jax.export --checkpoint CKPT --output DIR
        [--platforms cpu,cuda,tpu] [--no-saved-model] [--overwrite]

CKPT: a weights directory (from convert), a training workdir or step directory, or a
release .pth. DIR gets `model.stablehlo` (+ `drsformer_exported.py`, its JAX-only loader),
`saved_model/` and `README.txt` (signatures, shapes, dtypes, this command).
See `drsformer_jax/inference/serving.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from drsformer_jax.checkpoints.loading import load
from drsformer_jax.inference import serving
from drsformer_jax.utils.files import quiet_library_logs

README = """DRSformer exported by drsformer-jax ({model})

Made with: {command}

model.stablehlo  jax.export program (platforms: {platforms}); weights inside.
  input : float32 [N, 8*h, 8*w, 3], RGB in [0, 1] (N, h, w symbolic: any size)
  output: float32 [N, 8*h, 8*w, 3], restored, not clamped
  run it with JAX alone (no Flax, no model code), any image size:
    from drsformer_exported import load_exported   # the file beside this one
    derain = load_exported("{name}")
    restored = derain(rainy)  # float32 [H, W, 3] or [N, H, W, 3] in [0, 1]
  load_exported adds the release's test.py procedure: reflect-pad bottom/right
  to a multiple of 8, run, clamp to [0, 1], crop.
{saved_model}"""

SAVED_MODEL_README = """
saved_model/     TensorFlow SavedModel (jax2tf, native serialization), any size:
  serving_default: images uint8 [N, H, W, 3] RGB -> derained uint8 [N, H, W, 3]
  derain_float   : images float32 [N, H, W, 3] in [0, 1] -> derained float32
  both pad, run, clamp and crop as test.py. Load with
    tf.saved_model.load("{name}/saved_model").signatures["serving_default"](images=x)
  or serve it with TF Serving (model base path: this folder's saved_model/, as
  version 1: copy it to <base>/1/).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drsformer_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="weights dir (convert), training workdir or step dir, or a "
                             "release .pth")
    parser.add_argument("--output", required=True, type=Path, help="folder to write")
    parser.add_argument("--platforms", default=",".join(serving.PLATFORMS),
                        help="comma-separated subset of cpu, cuda, tpu (default: %(default)s)")
    parser.add_argument("--no-saved-model", dest="saved_model", action="store_false",
                        help="StableHLO only (no TensorFlow needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    quiet_library_logs()
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    if not platforms or set(platforms) - set(serving.PLATFORMS):
        parser.error(f"--platforms must be a subset of {','.join(serving.PLATFORMS)}")
    out = args.output
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        model, variables = load(args.checkpoint)
        tmp.mkdir(parents=True)
        serving.export_stablehlo(model, variables, tmp, platforms)
        if args.saved_model:
            serving.export_saved_model(model, variables, tmp, platforms)
        command = "python -m drsformer_jax.export " + " ".join(
            sys.argv[1:] if argv is None else argv)
        (tmp / "README.txt").write_text(README.format(
            model=model.config(), command=command, platforms=",".join(platforms),
            name=out.name, saved_model=SAVED_MODEL_README.format(name=out.name)
            if args.saved_model else ""))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {args.checkpoint} -> {out} ({', '.join(sorted(os.listdir(out)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
