"""Scores restored images against their targets the way the paper's Table 1 does.

    python -m drsformer_jax.score --results DIR --targets DIR [--protocol matlab]
        [--json FILE]

Files are paired by name; a result 1.png and a target 1.jpg pair by their stem
when no exact name matches. Files left unpaired are listed as warnings. Prints PSNR /
SSIM per image and their means; --json writes
{"protocol": ..., "mean": {"psnr": ..., "ssim": ...}, "images": {name: {...}}}
with the result files' names. An identical pair has PSNR inf, written Infinity in
the JSON (Python's json module reads it back), and makes the mean inf, as in the
MATLAB scripts.

Exit status: 0 when every pair was scored; 1 when some pair could not be (unreadable
image, size mismatch, too small): those are named, skipped and summed up at the end;
2 when nothing could be scored (a missing folder, no pairs) or the JSON could not
be written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from drsformer_jax import metrics
from drsformer_jax.images import ImageReadError, is_image_file, read_rgb8, write_bytes_atomic

_SHOW = 5  # names listed for a group of unpaired files


class ScoreError(Exception):
    """A fatal problem, reported as one line."""


@dataclass(frozen=True)
class Pairing:
    pairs: list[tuple[Path, Path]]  # (result, target), sorted by result name
    unpaired_results: list[str]
    unpaired_targets: list[str]


def _list_images(folder: Path, what: str) -> list[Path]:
    if not folder.exists():
        raise ScoreError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise ScoreError(f"{what} path is not a folder: {folder}")
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    except OSError as e:
        raise ScoreError(f"cannot list {what} folder {folder}: {e.strerror or e}") from e


def pair_files(results: Sequence[Path], targets: Sequence[Path]) -> Pairing:
    """Pairs by exact file name, then the rest by stem where that is unambiguous."""
    by_name = {p.name: p for p in targets}
    pairs: list[tuple[Path, Path]] = []
    left_results = []
    for r in results:
        t = by_name.pop(r.name, None)
        if t is None:
            left_results.append(r)
        else:
            pairs.append((r, t))
    stems_r: dict[str, list[Path]] = {}
    stems_t: dict[str, list[Path]] = {}
    for r in left_results:
        stems_r.setdefault(r.stem, []).append(r)
    for t in by_name.values():
        stems_t.setdefault(t.stem, []).append(t)
    unpaired_r, unpaired_t = [], []
    for stem, rs in stems_r.items():
        ts = stems_t.pop(stem, [])
        if len(rs) == 1 and len(ts) == 1:
            pairs.append((rs[0], ts[0]))
        else:  # none, or several files share the stem: no guessing
            unpaired_r += [r.name for r in rs]
            unpaired_t += [t.name for t in ts]
    for ts in stems_t.values():
        unpaired_t += [t.name for t in ts]
    pairs.sort(key=lambda pair: pair[0].name)
    return Pairing(pairs, sorted(unpaired_r), sorted(unpaired_t))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    more = len(names) - _SHOW
    return f"{shown}, and {more} more" if more > 0 else shown


def _score_pair(result: Path, target: Path, protocol: str) -> dict[str, float] | str:
    """Figures of one pair, or a one-line reason it could not be scored."""
    try:
        a = read_rgb8(result)
        b = read_rgb8(target)
    except ImageReadError as e:
        return str(e)
    if a.shape != b.shape:
        return (f"{result}: size {a.shape[1]}x{a.shape[0]} differs from target {target} "
                f"({b.shape[1]}x{b.shape[0]})")
    try:
        return metrics.evaluate(a, b, protocol)
    except ValueError as e:
        return f"{result}: {e}"


def write_json_atomic(path: Path, doc: dict) -> None:
    """Writes doc so that the file appears complete or not at all."""
    write_bytes_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def _mean(values: list[float]) -> float:
    # A running sum in file order, as the MATLAB scripts take it.
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def score(results_dir: Path, targets_dir: Path, protocol: str = "matlab",
          json_path: Path | None = None, workers: int | None = None) -> int:
    """Runs the CLI's work; returns the exit status. Raises ScoreError when fatal."""
    pairing = pair_files(_list_images(results_dir, "results"),
                         _list_images(targets_dir, "targets"))
    if pairing.unpaired_results:
        print(f"warning: {len(pairing.unpaired_results)} result file(s) in {results_dir} "
              f"have no target: {_names(pairing.unpaired_results)}", file=sys.stderr)
    if pairing.unpaired_targets:
        print(f"warning: {len(pairing.unpaired_targets)} target file(s) in {targets_dir} "
              f"have no result: {_names(pairing.unpaired_targets)}", file=sys.stderr)
    if not pairing.pairs:
        raise ScoreError(f"no image pairs: no file in {results_dir} matches one in {targets_dir}")

    images: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    workers = workers or os.cpu_count() or 1
    # Decoding and the numpy work both release the GIL, so threads use all cores.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = pool.map(lambda pair: _score_pair(*pair, protocol), pairing.pairs)
        bar = tqdm(zip(pairing.pairs, outcomes, strict=True), total=len(pairing.pairs),
                   unit="image", desc=f"scoring ({protocol})", file=sys.stderr,
                   dynamic_ncols=True)
        for (result, _), outcome in bar:
            if isinstance(outcome, str):
                failures.append(outcome)
                bar.write(f"error: {outcome}", file=sys.stderr)
            else:
                images[result.name] = outcome
                bar.write(f"{result.name}  PSNR {outcome['psnr']:.4f} dB  "
                          f"SSIM {outcome['ssim']:.6f}", file=sys.stdout)
    if not images:
        raise ScoreError(f"no pair could be scored ({len(failures)} failed, see above)")

    mean = {"psnr": _mean([v["psnr"] for v in images.values()]),
            "ssim": _mean([v["ssim"] for v in images.values()])}
    print(f"mean of {len(images)} image(s) ({protocol} protocol): "
          f"PSNR {mean['psnr']:.4f} dB  SSIM {mean['ssim']:.6f}")
    if json_path is not None:
        try:
            write_json_atomic(json_path, {"protocol": protocol, "mean": mean, "images": images})
        except OSError as e:
            raise ScoreError(f"cannot write {json_path}: {e.strerror or e}") from e
    if failures:
        print(f"error: {len(failures)} of {len(pairing.pairs)} pair(s) could not be scored "
              "and are left out of the mean (see above)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.score",
        description="PSNR / SSIM of restored images against targets, on the Y channel, "
                    "as the DRSformer paper's evaluation scripts compute them.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, metavar="DIR",
                        help="folder of restored images")
    parser.add_argument("--targets", type=Path, required=True, metavar="DIR",
                        help="folder of ground truths")
    parser.add_argument(
        "--protocol", choices=metrics.PROTOCOLS, default="matlab",
        help="matlab: Rain200L/H and SPA-Data (evaluate_PSNR_SSIM.m); rcdnet: DID-Data and "
             "DDN-Data (RCDNet's statistic.m); basicsr: the release's training validation "
             "(default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        return score(args.results, args.targets, args.protocol, args.json)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
