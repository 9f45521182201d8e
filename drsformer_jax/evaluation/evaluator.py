"""The one evaluator: restore a test split through a `Restorer` and score it.

Training's periodic evaluation (`evaluate_during_training`) and `main.py --mode
evaluate` (`evaluate_checkpoint`) both run `restore_pairs`: each rainy image goes
through `inference.restore_jobs` (the release's test.py procedure: reflect-pad to
a multiple of 8, model, clamp, crop, automatic tiling only when an image would
not fit in memory), is rounded to 8 bits as a saved PNG would be, and is scored
against its target with `metrics.evaluate`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from drsformer_jax.data.sources import PairSource, eval_count, open_split
from drsformer_jax.evaluation.scores import (
    SCORE_FILE,
    format_figures,
    image_figures,
    needs_targets,
    parse_protocol,
    score_document,
    write_score_file,
)
from drsformer_jax.inference import Job, Restorer, make_restorer, restore_jobs
from drsformer_jax.utils import images
from drsformer_jax.utils.files import ensure_writable_dir, first_names

# The protocol behind each column of the paper's Table 1 (see metrics.py), and
# Table 2's no-reference metrics for real rain (a set of rainy images only).
BENCHMARK_PROTOCOLS = {
    "Rain200L": "matlab", "Rain200H": "matlab", "SPA-Data": "matlab",
    "DID-Data": "rcdnet", "DDN-Data": "rcdnet", "synthetic": "matlab",
    "Real": "niqe,brisque",
}
DEFAULT_PROTOCOL = "matlab"  # custom folder sets: the Restormer script of Rain200L/H

# on_image(index, rainy uint8, restored uint8, clean uint8)
ImageCallback = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class EvaluationError(RuntimeError):
    """An evaluation that could not score every image; the message says why."""


def benchmark_protocol(config: ml_collections.ConfigDict) -> str:
    """The scoring protocol of the configured data set: `dataset.benchmark_protocol` if
    set (e.g. 'niqe,brisque' for a custom real-rain set), else by its name (Tables 1, 2)."""
    chosen = str(config.dataset.get("benchmark_protocol", "") or "")
    return chosen or BENCHMARK_PROTOCOLS.get(str(config.dataset.name), DEFAULT_PROTOCOL)


def restore_pairs(restorer: Restorer, pairs: PairSource, indices: Sequence[int],
                  protocol: str, *, out_dir: Path | None = None,
                  on_image: ImageCallback | None = None, desc: str = "evaluate",
                  progress: bool = True) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Restores and scores test pairs `indices`; returns ({name: figures}, failures).

    The figures of each image are those of `scores.image_figures` under `protocol`
    (e.g. "psnr", "ssim"; "niqe", "brisque") for the restored image, and the same
    with an "input_" prefix for the rainy input; `name` is `<stem>.png`. With
    `out_dir` each restored image is written there as that PNG (and scored from
    the pixels written, as `score` would read them).
    """
    scores: dict[str, dict[str, float]] = {}
    jobs, failures = [], []
    for index in indices:
        try:
            jobs.append(_pair_job(pairs, index, protocol, scores, out_dir, on_image))
        except ValueError as e:  # ImageReadError, DatasetError: that pair only
            failures.append(str(e))
            print(f"error: {e}", file=sys.stderr)
    failures += restore_jobs(restorer, jobs, desc=desc, progress=progress)[1]
    return scores, failures


def _pair_job(pairs: PairSource, index: int, protocol: str,
              scores: dict[str, dict[str, float]], out_dir: Path | None,
              on_image: ImageCallback | None) -> Job:
    input_path = getattr(pairs, "input_path", None)
    if input_path is not None:  # a folder: the header is enough to plan
        name = pairs.names[index]
        size = images.probe_size(input_path(index))
    else:  # in memory or TFDS: decode once to learn the size (the pixels are not kept)
        name, rainy, _ = pairs.load_named(index)
        size = rainy.shape[:2]
    file_name = f"{Path(name).stem}.png"

    def load() -> tuple[np.ndarray, Any]:
        _, rainy, clean = pairs.load_named(index)
        return images.to_float(rainy), (rainy, clean)

    def save(restored: np.ndarray, context: tuple[np.ndarray, np.ndarray]) -> None:
        rainy, clean = context
        result = images.from_float(restored)
        if out_dir is not None:
            images.write_image(out_dir / file_name, result)
        if on_image is not None:
            on_image(index, rainy, result, clean)
        protocols = parse_protocol(protocol)
        out, inp = (image_figures(x, clean, protocols) for x in (result, rainy))
        scores[file_name] = {**out, **{f"input_{k}": v for k, v in inp.items()}}

    return Job(str(name), tuple(size), load, save)


def evaluate_during_training(restorer: Restorer, pairs: PairSource, protocol: str,
                             on_image: ImageCallback | None = None) -> dict[str, float]:
    """Mean figures of the (already loaded) test pairs, for training's periodic evaluation.

    Each process restores every `process_count`-th image; the sums are combined
    across processes. Returns {"psnr", "ssim", "input_psnr", "input_ssim"}.
    """
    count, index = jax.process_count(), jax.process_index()
    scores, failures = restore_pairs(restorer, pairs, range(index, len(pairs), count),
                                     protocol, on_image=on_image, progress=False)
    if failures:
        raise EvaluationError(f"{len(failures)} test image(s) could not be evaluated: "
                              + first_names(failures, 2, sep="; "))
    keys = ("psnr", "ssim", "input_psnr", "input_ssim")
    sums = np.array([sum(s[k] for s in scores.values()) for k in keys] + [len(scores)],
                    np.float64)
    if count > 1:
        # Sent as raw bits: JAX (without x64) would round float64 to float32.
        bits = multihost_utils.process_allgather(sums.view(np.uint32))
        sums = np.asarray(bits).view(np.float64).reshape(count, -1).sum(axis=0)
    n = max(float(sums[-1]), 1.0)
    return {k: float(v) / n for k, v in zip(keys, sums[:-1], strict=True)}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                        checkpoint: str | os.PathLike | None = None,
                        output_dir: str | os.PathLike | None = None, *, ensemble: bool = False,
                        tile_blend: str = "box") -> dict[str, Any]:
    """Derains the config's test split, writes the PNGs and score.json, returns the scores.

    `ensemble`, `tile_blend`: the Restorer's options (x8 self-ensemble, not the
    paper's protocol; how tiles are blended where an image is tiled).

    Returns {"protocol": ..., "mean": {"psnr", "ssim"}, "images": {file name: {...}}},
    the document written to `<output>/score.json` (the layout of `score --json`).
    The first `config.dataset.eval_max_images` images only when that is > 0.
    Raises EvaluationError, after writing score.json for the others, when some
    image could not be read, restored or written; DatasetError / CheckpointError
    (ValueErrors) when the data set or the checkpoint cannot be opened.
    """
    dataset = str(config.dataset.name)
    protocol = benchmark_protocol(config)
    with_targets = needs_targets(parse_protocol(protocol))
    pairs = open_split(config, "test", inputs_only=not with_targets)
    count = eval_count(config, len(pairs))
    out_dir = Path(output_dir) if output_dir is not None else Path(workdir) / "eval" / dataset
    for kind in ("input_dir", "target_dir"):
        folder = getattr(pairs, kind, None)
        if folder and out_dir.resolve() == Path(folder).resolve():
            raise EvaluationError(f"--output {out_dir} is the data set's {kind[:-4]} folder; "
                                  "choose another folder")
    source = Path(checkpoint) if checkpoint is not None else Path(workdir)
    print(f"evaluating {source} on the {dataset} test split ({count} images, {protocol} "
          f"protocol) -> {out_dir}", flush=True)
    try:  # before any model work: a read-only or file --output fails here
        ensure_writable_dir(out_dir)
    except OSError as e:
        raise EvaluationError(f"--output {out_dir}: cannot write there "
                              f"({e.strerror or e})") from None
    restorer = make_restorer(source, conv_impl=str(config.get("conv_impl", "auto")),
                             ensemble=ensemble, tile_blend=tile_blend)
    scores, failures = restore_pairs(restorer, pairs, range(count), protocol, out_dir=out_dir,
                                     desc=f"evaluate {dataset}")
    doc: dict[str, Any] = {"protocol": protocol, "mean": {}, "images": {}}
    if scores:
        # Full-reference: the results' figures, the layout of `score --json`. No
        # reference (real rain): the inputs' too, the paper's Table 2 row.
        doc = score_document({n: {k: v for k, v in s.items()
                                  if not (with_targets and k.startswith("input_"))}
                              for n, s in scores.items()}, protocol)
        write_score_file(out_dir / SCORE_FILE, doc)
        print(f"{dataset}: mean of {len(scores)} image(s) ({protocol} protocol): "
              f"{format_figures(doc['mean'])} -> {out_dir / SCORE_FILE}", flush=True)
    if failures:
        raise EvaluationError(f"{len(failures)} of {count} test images could not be "
                              f"evaluated and are left out of the mean: {failures[0]}"
                              + (f" (and {len(failures) - 1} more, see above)"
                                 if len(failures) > 1 else ""))
    return doc
