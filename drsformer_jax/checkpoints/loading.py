"""`drsformer_jax.load`: a model and its weights from any kind of checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from drsformer_jax.checkpoints import training
from drsformer_jax.checkpoints.conversion import read_torch_checkpoint
from drsformer_jax.checkpoints.names import flax_to_torch, torch_sort_key
from drsformer_jax.checkpoints.weights_dir import (
    PARAMS_DIR,
    CheckpointError,
    is_weights_dir,
    read_model_config,
    restore_params,
)
from drsformer_jax.model.drsformer import DRSformer, abstract_params, from_config
from drsformer_jax.utils.files import first_names


def check_path(path: str | os.PathLike) -> Path:
    """The cheap checks of a checkpoint path, before anything is read (CheckpointError)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    if path.name == PARAMS_DIR and path.is_dir() and is_weights_dir(path.parent):
        raise CheckpointError(f"{path}: is the {PARAMS_DIR}/ folder of the weights directory "
                              f"{path.parent}; give {path.parent} itself")
    return path


def load_params(path: str | os.PathLike, *,
                notes: list[str] | None = None) -> tuple[dict[str, Any], Any]:
    """(model config, params) of a checkpoint of any kind (see `load`).

    Every kind is refused (CheckpointError) when a weight is NaN or infinite. `notes`
    gets a line for what was accepted with a fix (a 'module.' prefix stripped).
    """
    path = check_path(path)
    if path.is_file():
        config, params = read_torch_checkpoint(path, notes)
    elif is_weights_dir(path):
        config, params = read_model_config(path), restore_params(path / PARAMS_DIR)
    else:
        config, params = training.load_params(path)
    check_finite(params, str(path), release_names=path.is_file())
    return config, params


def check_finite(params: Any, source: str, release_names: bool = False) -> None:
    """CheckpointError naming the parameters that hold a NaN or an infinity.

    Names are Flax paths ('output/kernel'), or the release's tensor names
    ('output.weight') when `release_names`.
    """
    # On the host, after one transfer: a device-side check compiles a program per shape
    # (seconds at a start, more than the restore itself).
    flat = traverse_util.flatten_dict(jax.device_get(dict(params)))
    bad = [key for key, value in flat.items()
           if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all()]
    if not bad:
        return
    if release_names:
        names = sorted((flax_to_torch(k) or "/".join(k) for k in bad), key=torch_sort_key)
    else:
        names = sorted("/".join(k) for k in bad)
    n = len(names)
    raise CheckpointError(f"{source}: {n} tensor{' is' if n == 1 else 's are'} not finite "
                          f"(NaN or inf): {first_names(names)}")


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, precision: str | None = None,
         **runtime: Any) -> tuple[DRSformer, dict[str, Any]]:
    """Loads a checkpoint: `model, variables = load(PATH)`; then `model.apply(variables, x)`.

    `path` is a weights directory (from `convert`), a training checkpoint step
    directory, a training workdir (its best checkpoint by PSNR, else the
    latest), or a release `.pth` file (converted in memory, with `convert`'s
    checks). Weights that are NaN or infinite are refused. `precision`: of the
    matmuls and convolutions ("highest" is true float32 on GPUs and TPUs, whose
    default is TF32 / bfloat16 passes; see `DRSformer.matmul_precision`).
    `runtime`: remat, conv_impl, layout (see `DRSformer`; for another platform than
    this host's, `model.for_platform(...)`). `x` is float32 NHWC in [0, 1] with H, W
    multiples of 8.
    """
    config, params = load_params(path)
    model = from_config(config, dtype=dtype, matmul_precision=precision, **runtime)
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
