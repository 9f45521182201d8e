"""Derain one image or a folder with a DRSformer checkpoint.

    python -m drsformer_jax.derain --checkpoint DIR --input PATH --output DIR
        [--tile N [--tile-overlap 32]] [--batch-size B] [--buckets]
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
import collections
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drsformer_jax.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    from_float,
    is_image_file,
    probe_size,
    read_image,
    to_float,
    write_image,
)


def list_inputs(path: Path) -> list[Path]:
    """The image files at `path` (one file, or a folder's images sorted by name).

    Hidden files (names starting with '.') in a folder are left out.
    """
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted((p for p in path.iterdir()
                       if p.is_file() and is_image_file(p) and not p.name.startswith(".")),
                      key=lambda p: p.name)
    raise FileNotFoundError(f"{path}: no such file or folder")


def output_names(inputs: Sequence[Path]) -> list[str]:
    """Output file names, one per input and all different (also ignoring case).

    <stem>.png; <stem>_<ext>.png for inputs that share a stem (a.png, a.jpg ->
    a_png.png, a_jpg.png); where even that is taken, _2, _3, ... is added.
    """
    stems = collections.Counter(p.stem.casefold() for p in inputs)
    used: set[str] = set()
    names = []
    for p in inputs:
        stem = p.stem if stems[p.stem.casefold()] == 1 else f"{p.stem}_{p.suffix[1:].lower()}"
        name, k = f"{stem}.png", 2
        while name.casefold() in used:
            name, k = f"{stem}_{k}.png", k + 1
        used.add(name.casefold())
        names.append(name)
    return names


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
    # The model sees gray as R = G = B; the mean of its three outputs is the gray result.
    out = from_float(rgb.mean(axis=2, keepdims=True) if gray else rgb, dtype)
    if alpha is not None:
        out = np.concatenate([out, alpha.astype(dtype)], axis=2)
    return out


# --- restoring a list of images (derain and evaluate) ---------------------------------


@dataclass(frozen=True)
class Job:
    """One image to restore.

    `load` returns (RGB float HxWx3 in [0, 1], anything `save` needs) and raises a
    ValueError (ImageReadError, DatasetError) naming the input when it cannot be
    read; `save` gets the restored RGB and that context, and raises OSError (or a
    ValueError naming the image) when it fails. `size` is (H, W) as `load` will give
    it (from the file's header).
    """

    name: str
    size: tuple[int, int]
    load: Callable[[], tuple[np.ndarray, Any]]
    save: Callable[[np.ndarray, Any], None]


def restore_jobs(restorer: Any, jobs: Sequence[Job], *,
                 desc: str = "derain") -> tuple[int, list[str]]:
    """Restores every job with `restorer` (an inference.Restorer); returns (done, failures).

    Jobs are grouped by the program they run in (`Restorer.plan`), so each
    program compiles once, and run a batch at a time; inputs are read and outputs
    written on threads while the model runs. A job that cannot be read, restored
    or written gives one line in `failures` (also shown as it happens) and the
    others go on. Shows a progress bar with images/s.
    """
    from tqdm import tqdm

    plans = [restorer.plan(*job.size) for job in jobs]
    first: dict[Any, int] = {}
    counts: collections.Counter = collections.Counter(plan.key for plan in plans)
    for i, plan in enumerate(plans):
        first.setdefault(plan.key, i)
    order = sorted(range(len(jobs)), key=lambda i: (first[plans[i].key], i))
    chunks: list[list[int]] = []
    for i in order:
        per_call = 1 if plans[i].tile is not None else plans[i].batch
        last = chunks[-1] if chunks else None
        if last and plans[last[0]].key == plans[i].key and len(last) < per_call:
            last.append(i)
        else:
            chunks.append([i])

    failures: list[str] = []
    done = 0
    seen: set[Any] = set()
    downgraded: dict[Any, Any] = {}  # plan key -> the smaller plan that worked after an OOM
    saving: collections.deque[tuple[int, Future]] = collections.deque()
    bar = tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)

    def fail(line: str) -> None:
        failures.append(line)
        bar.write(f"error: {line}", file=sys.stderr)

    def settle(keep: int) -> None:
        nonlocal done
        while len(saving) > keep:
            i, future = saving.popleft()
            try:
                future.result()
                done += 1
            except OSError as e:
                fail(f"{jobs[i].name}: cannot write the output ({e.strerror or e})")
            except ValueError as e:
                fail(f"{jobs[i].name}: {e}")
            bar.update(1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        loading = [pool.submit(jobs[i].load) for i in chunks[0]] if chunks else []
        for c, chunk in enumerate(chunks):
            loaded, ready = loading, []
            if c + 1 < len(chunks):
                loading = [pool.submit(jobs[i].load) for i in chunks[c + 1]]
            for i, future in zip(chunk, loaded, strict=True):
                try:
                    ready.append((i, *future.result()))
                except ValueError as e:  # ImageReadError and the like name their file
                    fail(str(e))
                    bar.update(1)
            # The header's size is what was planned; re-plan if decoding disagrees.
            groups: dict[Any, list[tuple[int, np.ndarray, Any]]] = {}
            for item in ready:
                plan = restorer.plan(*item[1].shape[:2])
                groups.setdefault(plan, []).append(item)
            for plan, items in groups.items():
                if plan.note:
                    for i, _, _ in items:
                        bar.write(f"note: {jobs[i].name}: {plan.note}")
                if plan.key not in seen:
                    seen.add(plan.key)
                    what = f"{plan.size[1]}x{plan.size[0]}" + (" tiles" if plan.tile else "")
                    bar.set_postfix_str(f"compiling for {what}", refresh=True)
                restored = _restore_or_retry(restorer, items, plan, counts[plan.key],
                                             jobs, bar, downgraded)
                bar.set_postfix_str("")
                if isinstance(restored, BaseException):  # one bad batch must not stop others
                    for i, _, _ in items:
                        fail(f"{jobs[i].name}: restoration failed ({_first_line(restored)})")
                        bar.update(1)
                    continue
                for (i, _, context), out in zip(items, restored, strict=True):
                    saving.append((i, pool.submit(jobs[i].save, out, context)))
            # Bounded backlog of pending writes: restored images wait in memory.
            settle(keep=2 * max(len(chunk), 1))
        settle(keep=0)
    bar.close()
    return done, failures


def _restore_or_retry(restorer: Any, items: list[tuple[int, np.ndarray, Any]], plan: Any,
                      group_size: int, jobs: Sequence[Job], bar: Any,
                      downgraded: dict[Any, Any]) -> Any:
    """Restored images, retried smaller after an out-of-memory error; or the error.

    A plan that ran out of memory is not tried again: later images of that plan go
    straight to the smaller one that worked (`downgraded`).
    """
    from drsformer_jax.inference import is_out_of_memory

    key = plan.key
    plan = downgraded.get(key, plan)
    while True:
        try:
            restored = restorer.restore([rgb for _, rgb, _ in items], plan,
                                        group_size=group_size)
            if plan.key != key:
                downgraded[key] = plan
            return restored
        except Exception as e:
            plan = restorer.after_out_of_memory(plan) if is_out_of_memory(e) else None
            if plan is None:
                return e
            bar.write(f"note: {', '.join(jobs[i].name for i, _, _ in items)}: {plan.note}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- the command line ----------------------------------------------------------------------


def _file_job(path: Path, target: Path, size: tuple[int, int]) -> Job:
    def load() -> tuple[np.ndarray, Any]:
        pixels = read_image(path)
        rgb, alpha, gray = split_channels(pixels)
        return rgb, (alpha, gray, pixels.dtype)

    def save(restored: np.ndarray, context: Any) -> None:
        write_image(target, merge_channels(restored, *context))

    return Job(str(path), size, load, save)


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


def _add_restore_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape how images are run (tiles, batches, buckets, cache, memory)."""
    from drsformer_jax import inference

    parser.add_argument("--tile", type=_positive_multiple_of_8, metavar="N",
                        help="run every image tile by tile with N x N tiles (a multiple of 8), "
                             "as the release's --tile; default: only images that would not "
                             "fit in memory are tiled")
    parser.add_argument("--tile-overlap", type=_non_negative, metavar="PX",
                        default=inference.DEFAULT_TILE_OVERLAP,
                        help="overlap of neighbouring tiles (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive, default=1, metavar="B",
                        help="images of one size (or tiles) per model call (default: 1)")
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


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.derain", description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="export dir (convert), training checkpoint or workdir")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the derained PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --output to be the input folder (inputs are never replaced)")
    _add_restore_flags(parser)
    args = parser.parse_args(None if argv is None else list(argv))

    try:
        inputs = list_inputs(Path(args.input))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {args.input}: cannot list ({e.strerror or e})", file=sys.stderr)
        return 1
    if not inputs:
        print(f"error: {args.input}: no images found ({', '.join(IMAGE_EXTENSIONS)})",
              file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    in_dir = inputs[0].parent
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve() and not args.overwrite:
        print(f"error: --output {out_dir} is the input folder; pass --overwrite to write "
              "there (inputs themselves are never replaced)", file=sys.stderr)
        return 1

    failures: list[str] = []
    jobs: list[Job] = []
    resolved_inputs = {p.resolve() for p in inputs}
    for path, name in zip(inputs, output_names(inputs), strict=True):
        target = out_dir / name
        if target.resolve() in resolved_inputs:
            failures.append(f"{path}: output {target} would replace an input; skipped")
            print(f"error: {failures[-1]}", file=sys.stderr)
            continue
        try:
            size = probe_size(path)
        except ImageReadError as e:
            failures.append(str(e))
            print(f"error: {e}", file=sys.stderr)
            continue
        jobs.append(_file_job(path, target, size))

    start = time.perf_counter()
    done = 0
    if jobs:
        try:
            restorer = make_restorer(
                args.checkpoint, tile=args.tile, tile_overlap=args.tile_overlap,
                buckets=args.buckets, batch_size=args.batch_size,
                memory_limit_gib=args.memory_limit, cache_dir=args.cache_dir)
        except ValueError as e:  # CheckpointError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --output {out_dir}: cannot create the folder ({e.strerror or e})",
                  file=sys.stderr)
            return 1
        try:
            done, failed = restore_jobs(restorer, jobs)
        except KeyboardInterrupt:
            print("error: interrupted; the outputs written so far are complete",
                  file=sys.stderr)
            return 130
        failures += failed
    seconds = time.perf_counter() - start
    print(f"derained {done} of {len(inputs)} images in {seconds:.1f}s "
          f"({done / max(seconds, 1e-9):.2f} images/s) -> {out_dir}")
    if failures:
        print(f"{len(failures)} of {len(inputs)} failed:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return 0


def make_restorer(checkpoint: str | Path, *, tile: int | None = None,
                  tile_overlap: int = 32, buckets: bool = False, batch_size: int = 1,
                  memory_limit_gib: float | None = None, cache_dir: str | Path | None = None,
                  **load_kwargs: Any) -> Any:
    """Loads `checkpoint` into an inference.Restorer (arguments: the restore flags).

    Turns the persistent compilation cache on first: `cache_dir`, or
    `inference.default_cache_dir()` when None; "none" turns it off.
    """
    from drsformer_jax import inference
    from drsformer_jax.checkpoint import load

    cache = inference.default_cache_dir() if cache_dir is None else cache_dir
    cache = None if str(cache).lower() in ("none", "") else cache
    try:
        inference.enable_compilation_cache(cache)
    except OSError as e:  # a read-only home, say: run without the cache
        print(f"note: compilation cache off: cannot create {cache} ({e.strerror or e})",
              file=sys.stderr)
        inference.enable_compilation_cache(None)
    model, variables = load(checkpoint, **load_kwargs)
    limit = None if memory_limit_gib is None else int(memory_limit_gib * 2 ** 30)
    return inference.Restorer(model, variables, tile=tile, tile_overlap=tile_overlap,
                              buckets=buckets, batch_size=batch_size, memory_limit=limit)


if __name__ == "__main__":
    sys.exit(main())
