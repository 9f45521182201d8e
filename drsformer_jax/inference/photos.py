"""Photos on disk: which files to derain, output names, channels in and out."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from drsformer_jax.inference.jobs import Job
from drsformer_jax.utils.files import IMAGE_EXTENSIONS, is_image_file, list_images
from drsformer_jax.utils.images import (
    ImageReadError,
    from_float,
    probe_size,
    read_image,
    to_float,
    write_image,
)


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """The image files at `path`: one file, or a folder's images (`files.list_images`)."""
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):  # the same types as in a folder, e.g. no GIF
            raise FileNotFoundError(f"{path}: not one of the image types derain reads "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if path.is_dir():
        return list_images(path)
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


def file_job(path: Path, target: Path, size: tuple[int, int]) -> Job:
    """Derain `path` into the PNG `target`, keeping gray, alpha and 16 bits."""

    def load() -> tuple[np.ndarray, Any]:
        pixels = read_image(path)
        rgb, alpha, gray = split_channels(pixels)
        return rgb, (alpha, gray, pixels.dtype)

    def save(restored: np.ndarray, context: Any) -> None:
        write_image(target, merge_channels(restored, *context))

    return Job(str(path), size, load, save)


def folder_jobs(inputs: Sequence[Path], out_dir: Path) -> tuple[list[Job], list[str]]:
    """One job per input writing into `out_dir`; and the inputs refused, one line each.

    An input is refused when its output would replace an input, or when its
    header cannot be read.
    """
    jobs, failures = [], []
    resolved_inputs = {p.resolve() for p in inputs}
    for path, name in zip(inputs, output_names(inputs), strict=True):
        target = out_dir / name
        if target.resolve() in resolved_inputs:
            failures.append(f"{path}: output {target} would replace an input; skipped")
            continue
        try:
            jobs.append(file_job(path, target, probe_size(path)))
        except ImageReadError as e:
            failures.append(str(e))
    return jobs, failures
