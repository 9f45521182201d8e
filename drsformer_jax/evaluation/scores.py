"""Score files: pairing results with targets, scoring folders, the score.json document.

Results pair with targets by the one pairing rule (`utils.files.pair_files`: by file
name, then by stem where unambiguous; leftovers are warned about); the one score.json
layout and writer: used by the score CLI and `--mode evaluate`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from drsformer_jax.evaluation import metrics, no_reference
from drsformer_jax.utils.files import first_names, list_images, pair_files, write_json_atomic
from drsformer_jax.utils.images import ImageReadError, read_rgb8

SCORE_FILE = "score.json"


class ScoreError(Exception):
    """A fatal problem, reported as one line."""


def folder_images(folder: Path, what: str) -> list[Path]:
    """The images in `folder` (`utils.files.list_images`); a ScoreError naming it as
    `what` when it is missing, not a folder or cannot be listed."""
    if not folder.exists():
        raise ScoreError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise ScoreError(f"{what} path is not a folder: {folder}")
    try:
        return list_images(folder)
    except OSError as e:
        raise ScoreError(f"cannot list {what} folder {folder}: {e.strerror or e}") from e


NO_REFERENCE = {"niqe": no_reference.niqe, "brisque": no_reference.brisque}
LABELS = {"psnr": "PSNR {:.4f} dB", "ssim": "SSIM {:.6f}", "niqe": "NIQE {:.4f}",
          "brisque": "BRISQUE {:.4f}"}


def parse_protocol(text: str) -> tuple[str, ...]:
    """'matlab', 'niqe,brisque', 'rcdnet,niqe', ...: at most one full-reference protocol
    (metrics.PROTOCOLS: PSNR and SSIM against a target) and any no-reference metrics."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in (*metrics.PROTOCOLS, *NO_REFERENCE)]
    if unknown or not names:
        raise ValueError(f"unknown protocol {', '.join(unknown) or repr(text)}; choose from "
                         f"{', '.join((*metrics.PROTOCOLS, *NO_REFERENCE))}")
    if len([p for p in names if p in metrics.PROTOCOLS]) > 1 or len(set(names)) < len(names):
        raise ValueError(f"{text}: at most one of {', '.join(metrics.PROTOCOLS)}, "
                         "and each metric once")
    return names


def needs_targets(protocols: Sequence[str]) -> bool:
    return any(p in metrics.PROTOCOLS for p in protocols)


def image_figures(result: np.ndarray, target: np.ndarray | None,
                  protocols: Sequence[str]) -> dict[str, float]:
    """The figures of one uint8 RGB result: psnr / ssim against `target` under the
    full-reference protocol, and each no-reference metric of the result alone."""
    out: dict[str, float] = {}
    for p in protocols:
        if p in NO_REFERENCE:
            out[p] = NO_REFERENCE[p](result)
        else:
            out.update(metrics.evaluate(result, target, p))
    return out


def format_figures(figures: dict[str, float]) -> str:
    return "  ".join(LABELS.get(k, k + " {:.4f}").format(v) for k, v in figures.items())


def _score_file(result: Path, target: Path | None,
                protocols: Sequence[str]) -> dict[str, float] | str:
    """Figures of one result (and its target), or a one-line reason it could not be scored."""
    try:
        a = read_rgb8(result)
        b = None if target is None else read_rgb8(target)
    except ImageReadError as e:
        return str(e)
    if b is not None and a.shape != b.shape:
        return (f"{result}: size {a.shape[1]}x{a.shape[0]} differs from target {target} "
                f"({b.shape[1]}x{b.shape[0]})")
    try:
        return image_figures(a, b, protocols)
    except ValueError as e:
        return f"{result}: {e}"


def score_document(scores: dict[str, dict[str, float]], protocol: str) -> dict[str, Any]:
    """The score.json document: {"protocol", "mean": {figure: mean}, "images": {...}}.

    Images in name order; means as plain left-to-right sums in that order, as the
    MATLAB scripts take them; every figure of the images is averaged.
    """
    names = sorted(scores)
    keys = list(scores[names[0]]) if names else []
    mean = {key: sum(scores[n][key] for n in names) / len(names) for key in keys}
    return {"protocol": protocol, "mean": mean, "images": {n: scores[n] for n in names}}


def write_score_file(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Writes a score document atomically; ScoreError when that fails."""
    try:
        write_json_atomic(path, doc)
    except OSError as e:
        raise ScoreError(f"cannot write {path}: {e.strerror or e}") from e


def _work(results_dir: Path, targets_dir: Path | None,
          protocols: Sequence[str]) -> tuple[list[tuple[Path, Path | None]], int]:
    """(result, target or None) to score, and how many results were found."""
    results = folder_images(results_dir, "results")
    if not needs_targets(protocols):
        if not results:
            raise ScoreError(f"no images in {results_dir}")
        return [(r, None) for r in results], len(results)
    if targets_dir is None:
        raise ScoreError(f"--targets is needed for {', '.join(metrics.PROTOCOLS)} "
                         "(PSNR / SSIM against ground truths)")
    pairing = pair_files(results, folder_images(targets_dir, "targets"))
    if pairing.unpaired_results:
        print(f"warning: {len(pairing.unpaired_results)} result file(s) in {results_dir} "
              f"have no target: {first_names(pairing.unpaired_results)}", file=sys.stderr)
    if pairing.unpaired_targets:
        print(f"warning: {len(pairing.unpaired_targets)} target file(s) in {targets_dir} "
              f"have no result: {first_names(pairing.unpaired_targets)}", file=sys.stderr)
    if not pairing.pairs:
        raise ScoreError(f"no image pairs: no file in {results_dir} matches one in {targets_dir}")
    return list(pairing.pairs), len(pairing.pairs)


def score_folders(results_dir: Path, targets_dir: Path | None, protocol: str = "matlab",
                  json_path: Path | None = None, workers: int | None = None) -> int:
    """Scores a folder of results (against one of targets), printing as it goes.

    Returns the exit status of the score CLI (0, or 1 when some image could not be
    scored); raises ScoreError when nothing can be scored.
    """
    try:
        protocols = parse_protocol(protocol)
    except ValueError as e:
        raise ScoreError(str(e)) from None
    if json_path is not None and not Path(json_path).parent.is_dir():
        raise ScoreError(f"--json {json_path}: folder {Path(json_path).parent} does not exist")
    work, count = _work(results_dir, targets_dir, protocols)
    images: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    # Decoding and the numpy work both release the GIL, so threads use all cores.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        outcomes = pool.map(lambda item: _score_file(*item, protocols), work)
        bar = tqdm(zip(work, outcomes, strict=True), total=len(work), unit="image",
                   desc=f"scoring ({protocol})", file=sys.stderr, dynamic_ncols=True)
        for (result, _), outcome in bar:
            if isinstance(outcome, str):
                failures.append(outcome)
                bar.write(f"error: {outcome}", file=sys.stderr)
            else:
                images[result.name] = outcome
                bar.write(f"{result.name}  {format_figures(outcome)}", file=sys.stdout)
    if not images:
        raise ScoreError(f"no image could be scored ({len(failures)} failed, see above)")
    doc = score_document(images, protocol)
    print(f"mean of {len(images)} image(s) ({protocol} protocol): {format_figures(doc['mean'])}")
    if json_path is not None:
        write_score_file(json_path, doc)
    if failures:
        what = "pair(s)" if needs_targets(protocols) else "image(s)"
        print(f"error: {len(failures)} of {count} {what} could not be scored "
              "and are left out of the mean (see above)", file=sys.stderr)
        return 1
    return 0
