"""Benchmark evaluation: derain a data set's test split and score it as the paper does.

    python main.py --config configs/rain200h.py --workdir DIR --mode evaluate \\
        [--checkpoint PATH] [--output DIR]

Restores every test image with the workdir's best checkpoint (or `--checkpoint`:
an export directory such as converted release weights, a workdir or a step
directory) through derain's machinery (`derain.restore_jobs`: same padding,
automatic tiling, compilation cache), writes `<stem>.png` per image to
`WORKDIR/eval/<dataset>/` (or `--output`), scores them against the targets under
the data set's benchmark protocol (`benchmark_protocol`) with `metrics`, and
writes `score.json` there in the layout of `python -m drsformer_jax.score --json`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from drsformer_jax import images, metrics

# The protocol behind each column of the paper's Table 1 (see metrics.py).
BENCHMARK_PROTOCOLS = {
    "Rain200L": "matlab", "Rain200H": "matlab", "SPA-Data": "matlab",
    "DID-Data": "rcdnet", "DDN-Data": "rcdnet", "synthetic": "matlab",
}
DEFAULT_PROTOCOL = "matlab"  # custom folder sets: the Restormer script of Rain200L/H
SCORE_FILE = "score.json"


class EvaluationError(RuntimeError):
    """An evaluation that could not score every image; the message says why."""


def benchmark_protocol(dataset_name: str) -> str:
    """The scoring protocol of a data set: 'matlab' or 'rcdnet' (see metrics.PROTOCOLS)."""
    return BENCHMARK_PROTOCOLS.get(dataset_name, DEFAULT_PROTOCOL)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path,
                        checkpoint: str | Path | None = None,
                        output_dir: str | Path | None = None) -> dict[str, Any]:
    """Derains the config's test split, writes the PNGs and score.json, returns the scores.

    Returns {"protocol": ..., "mean": {"psnr", "ssim"}, "images": {file name: {...}}},
    the document written to `<output>/score.json`. The first
    `config.dataset.eval_max_images` images only when that is > 0. Raises
    EvaluationError, after writing score.json for the others, when some image could
    not be read, restored or written; DatasetError / CheckpointError (ValueErrors)
    when the data set or the checkpoint cannot be opened.
    """
    from drsformer_jax import derain, input_pipeline

    dataset = str(config.dataset.name)
    protocol = benchmark_protocol(dataset)
    pairs = input_pipeline.open_split(config, "test")
    limit = int(config.dataset.get("eval_max_images", 0) or 0)
    count = len(pairs) if limit <= 0 else min(limit, len(pairs))
    out_dir = Path(output_dir) if output_dir is not None else Path(workdir) / "eval" / dataset
    for kind in ("input_dir", "target_dir"):
        folder = getattr(pairs, kind, None)
        if folder is not None and out_dir.resolve() == Path(folder).resolve():
            raise EvaluationError(f"--output {out_dir} is the data set's {kind[:-4]} folder; "
                                  "choose another folder")
    source = Path(checkpoint) if checkpoint is not None else Path(workdir)
    print(f"evaluating {source} on the {dataset} test split ({count} images, {protocol} "
          f"protocol) -> {out_dir}", flush=True)
    restorer = derain.make_restorer(source, conv_impl=str(config.get("conv_impl", "auto")))
    out_dir.mkdir(parents=True, exist_ok=True)

    scores: dict[str, dict[str, float]] = {}
    jobs, failures = [], []
    for i in range(count):
        try:
            jobs.append(_pair_job(pairs, i, out_dir, protocol, scores))
        except ValueError as e:  # ImageReadError, DatasetError: that pair only
            failures.append(str(e))
            print(f"error: {e}", file=sys.stderr)
    failures += derain.restore_jobs(restorer, jobs, desc=f"evaluate {dataset}")[1]

    names = sorted(scores)  # the order `score` sums in: result file names
    doc: dict[str, Any] = {"protocol": protocol, "mean": {}, "images": {}}
    if names:
        # Plain left-to-right sums, as the score CLI (and the MATLAB scripts) take them.
        doc["mean"] = {key: sum(scores[n][key] for n in names) / len(names)
                       for key in ("psnr", "ssim")}
        doc["images"] = {n: scores[n] for n in names}
        from drsformer_jax.score import write_json_atomic

        write_json_atomic(out_dir / SCORE_FILE, doc)
        print(f"{dataset}: mean of {len(names)} image(s) ({protocol} protocol): "
              f"PSNR {doc['mean']['psnr']:.4f} dB  SSIM {doc['mean']['ssim']:.6f} "
              f"-> {out_dir / SCORE_FILE}", flush=True)
    if failures:
        raise EvaluationError(f"{len(failures)} of {count} test images could not be "
                              f"evaluated and are left out of the mean: {failures[0]}"
                              + (f" (and {len(failures) - 1} more, see above)"
                                 if len(failures) > 1 else ""))
    return doc


def _pair_job(pairs: Any, index: int, out_dir: Path, protocol: str,
              scores: dict[str, dict[str, float]]) -> Any:
    """A derain Job for test pair `index`: restore, write <stem>.png, score against the target."""
    from drsformer_jax.derain import Job

    input_path = getattr(pairs, "input_path", None)
    if input_path is not None:  # a folder: the header is enough to plan
        name = pairs.names[index]
        size = images.probe_size(input_path(index))
    else:  # TFDS: decode once to learn the size (the pixels are not kept)
        name, rainy, _ = pairs.load_named(index)
        size = rainy.shape[:2]
    target = out_dir / f"{Path(name).stem}.png"

    def load() -> tuple[np.ndarray, Any]:
        _, rainy, clean = pairs.load_named(index)
        return images.to_float(rainy), clean

    def save(restored: np.ndarray, clean: np.ndarray) -> None:
        result = images.from_float(restored)
        images.write_image(target, result)
        # Scored from the pixels just written (PNG is lossless), as `score` would read them.
        scores[target.name] = metrics.evaluate(result, clean, protocol)

    return Job(str(name), tuple(size), load, save)


if __name__ == "__main__":
    sys.exit("run it as: python main.py --config CONFIG --workdir DIR --mode evaluate")
