"""Score files: pairing results with targets, scoring folders, the score.json document.

The one pairing rule (by file name, then by stem where unambiguous), the one
score.json layout and writer: used by the score CLI and `--mode evaluate`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from drsformer_jax.evaluation import metrics
from drsformer_jax.utils.files import first_names, list_images, write_json_atomic
from drsformer_jax.utils.images import ImageReadError, read_rgb8

SCORE_FILE = "score.json"


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
        return list_images(folder)
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


def score_document(scores: dict[str, dict[str, float]], protocol: str) -> dict[str, Any]:
    """The score.json document: {"protocol", "mean": {"psnr", "ssim"}, "images": {...}}.

    Images in name order; means as plain left-to-right sums in that order, as the
    MATLAB scripts take them.
    """
    names = sorted(scores)
    mean = {key: sum(scores[n][key] for n in names) / len(names) for key in ("psnr", "ssim")}
    return {"protocol": protocol, "mean": mean, "images": {n: scores[n] for n in names}}


def write_score_file(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Writes a score document atomically; ScoreError when that fails."""
    try:
        write_json_atomic(path, doc)
    except OSError as e:
        raise ScoreError(f"cannot write {path}: {e.strerror or e}") from e


def score_folders(results_dir: Path, targets_dir: Path, protocol: str = "matlab",
          json_path: Path | None = None, workers: int | None = None) -> int:
    """Scores a folder of results against one of targets, printing as it goes.

    Returns the exit status of the score CLI (0, or 1 when some pair could not be
    scored); raises ScoreError when nothing can be scored.
    """
    pairing = pair_files(_list_images(results_dir, "results"),
                         _list_images(targets_dir, "targets"))
    if pairing.unpaired_results:
        print(f"warning: {len(pairing.unpaired_results)} result file(s) in {results_dir} "
              f"have no target: {first_names(pairing.unpaired_results)}", file=sys.stderr)
    if pairing.unpaired_targets:
        print(f"warning: {len(pairing.unpaired_targets)} target file(s) in {targets_dir} "
              f"have no result: {first_names(pairing.unpaired_targets)}", file=sys.stderr)
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

    doc = score_document(images, protocol)
    mean = doc["mean"]
    print(f"mean of {len(images)} image(s) ({protocol} protocol): "
          f"PSNR {mean['psnr']:.4f} dB  SSIM {mean['ssim']:.6f}")
    if json_path is not None:
        write_score_file(json_path, doc)
    if failures:
        print(f"error: {len(failures)} of {len(pairing.pairs)} pair(s) could not be scored "
              "and are left out of the mean (see above)", file=sys.stderr)
        return 1
    return 0


