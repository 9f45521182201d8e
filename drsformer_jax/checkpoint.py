"""Saving and loading DRSformer weights with orbax.

An *export directory* (what `convert` writes) holds `config.json` (the model's
architecture fields) and `params/` (an orbax checkpoint of `{"params": ...}`).
`load` also accepts a training checkpoint step directory or a training workdir
(see `train.py`), so `derain` and `convert --to-torch` work on either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT = "drsformer-jax"


class CheckpointError(ValueError):
    """A path that is not a loadable checkpoint; the message names it."""


def save_export(directory: str | os.PathLike, model_config: dict[str, Any], params: Any, *,
                overwrite: bool = False, metadata: dict[str, Any] | None = None) -> None:
    """Writes an export directory atomically: complete, or not there at all."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if (directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
            and not overwrite):
        raise FileExistsError(f"{directory} exists and is not empty; pass --overwrite "
                              "to replace it")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        params = jax.tree_util.tree_map(np.asarray, params)
        checkpointer.save(tmp / PARAMS_DIR, {"params": params})
        checkpointer.wait_until_finished()
        info = {"format": FORMAT, "version": 1, "model": model_config, **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture fields recorded in an export directory's config.json."""
    file = Path(path) / CONFIG_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the model config ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT or "model" not in info:
        raise CheckpointError(f"{file}: not a {FORMAT} model config")
    return info["model"]


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, remat: bool = False,
         conv_impl: str = "auto") -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint: `model, variables = load(DIR)`; then `model.apply(variables, x)`.

    `path` is an export directory (from `convert`), a training checkpoint step
    directory, or a training workdir (its best checkpoint by PSNR, else the
    latest). `x` is float32 NHWC in [0, 1] with H, W multiples of 8.
    """
    from drsformer_jax.models import from_config

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        config = read_model_config(path)
        params = _restore_params(path / PARAMS_DIR)
    else:
        from drsformer_jax import train_checkpoints

        config, params = train_checkpoints.load_params(path)
    model = from_config(config, dtype=dtype, remat=remat, conv_impl=conv_impl)
    _check_params(model, config, params, path)
    return model, {"params": params}


def _restore_params(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(directory.absolute())
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{directory}: cannot restore parameters ({e})") from e
    return jax.tree_util.tree_map(jnp.asarray, restored["params"])


def _check_params(model: Any, config: dict[str, Any], params: Any, path: Path) -> None:
    from flax import traverse_util

    x = jnp.zeros((1, 8, 8, config.get("inp_channels", 3)), jnp.float32)
    want = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
                                      ["params"])
    got = traverse_util.flatten_dict(params)
    bad = sorted("/".join(k) for k in set(want) ^ set(got))
    bad += sorted("/".join(k) for k in set(want) & set(got)
                  if tuple(want[k].shape) != tuple(got[k].shape))
    if bad:
        raise CheckpointError(f"{path}: parameters do not match the recorded model config "
                              f"({len(bad)} differ, e.g. {', '.join(bad[:5])})")
