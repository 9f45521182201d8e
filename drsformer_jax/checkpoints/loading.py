"""`drsformer_jax.load`: a model and its weights from any kind of checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from drsformer_jax.checkpoints import training
from drsformer_jax.checkpoints.conversion import read_torch_checkpoint
from drsformer_jax.checkpoints.export import (
    CheckpointError,
    is_export_dir,
    read_model_config,
    restore_params,
)
from drsformer_jax.model.drsformer import DRSformer, abstract_params, from_config


def load_params(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(model config, params) of a checkpoint of any kind (see `load`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    if path.is_file():
        return read_torch_checkpoint(path)
    if is_export_dir(path):
        return read_model_config(path), restore_params(path / "params")
    return training.load_params(path)


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32,
         **runtime: Any) -> tuple[DRSformer, dict[str, Any]]:
    """Loads a checkpoint: `model, variables = load(PATH)`; then `model.apply(variables, x)`.

    `path` is an export directory (from `convert`), a training checkpoint step
    directory, a training workdir (its best checkpoint by PSNR, else the
    latest), or a release `.pth` file (converted in memory, with `convert`'s
    checks). `runtime`: remat, conv_impl, layout (see `DRSformer`). `x` is
    float32 NHWC in [0, 1] with H, W multiples of 8.
    """
    config, params = load_params(path)
    model = from_config(config, dtype=dtype, **runtime)
    _check_params(model, params, Path(path))
    return model, {"params": params}


def _check_params(model: DRSformer, params: Any, path: Path) -> None:
    want = traverse_util.flatten_dict(abstract_params(model))
    got = traverse_util.flatten_dict(params)
    bad = sorted("/".join(k) for k in set(want) ^ set(got))
    bad += sorted("/".join(k) for k in set(want) & set(got)
                  if tuple(want[k].shape) != tuple(got[k].shape))
    if bad:
        raise CheckpointError(f"{path}: parameters do not match the recorded model config "
                              f"({len(bad)} differ, e.g. {', '.join(bad[:5])})")
