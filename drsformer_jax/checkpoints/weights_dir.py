"""Weights directories: what `convert` writes and `drsformer_jax.load` reads.

A weights directory holds `config.json` (the model's architecture fields) and `params/`
(an orbax checkpoint of `{"params": ...}`).
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
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT = "drsformer-jax"


class CheckpointError(ValueError):
    """A path that is not a loadable checkpoint; the message names it."""


def is_weights_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_weights_dir(directory: str | os.PathLike, model_config: dict[str, Any], params: Any,
                     *, overwrite: bool = False,
                     metadata: dict[str, Any] | None = None) -> None:
    """Writes a weights directory atomically: complete, or not there at all."""
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
    """The architecture fields recorded in a weights directory's config.json."""
    file = Path(path) / CONFIG_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the model config ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT or "model" not in info:
        raise CheckpointError(f"{file}: not a {FORMAT} model config")
    return info["model"]


def restore_params(directory: Path) -> Any:
    try:
        restored = ocp.StandardCheckpointer().restore(directory.absolute())
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{directory}: cannot restore parameters ({e})") from e
    return jax.tree_util.tree_map(jnp.asarray, restored["params"])
