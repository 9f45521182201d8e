"""Release `.pth` state dicts <-> Flax parameters, and the architecture they imply.

Forward: `{'params': state_dict}` or a bare state dict; the architecture is
inferred from tensor names and shapes, and every tensor is checked against the
model (all missing, unexpected and mis-shaped names reported at once) before
anything is written. Reverse: Flax params -> a state dict the release loads
with `strict=True`. Names map through `names`, files through `torch_format`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from drsformer_jax.checkpoints.names import (
    flax_to_torch,
    to_flax_array,
    to_torch_array,
    torch_sort_key,
    torch_to_flax,
)
from drsformer_jax.checkpoints.torch_format import load_pth, save_pth
from drsformer_jax.checkpoints.weights_dir import CheckpointError
from drsformer_jax.model.drsformer import abstract_params, from_config
from drsformer_jax.utils.files import first_names


class ConversionError(CheckpointError):
    """The checkpoint does not fit the model; the message lists the offending names."""


# --- architecture inference ----------------------------------------------------------

def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The DRSformer architecture fields a release state dict was made with."""
    def get(name: str) -> np.ndarray:
        if name not in state_dict:
            raise ConversionError(f"cannot infer the architecture: tensor {name} is missing")
        value = state_dict[name]
        if value.ndim == 0 or value.shape[0] == 0:
            raise ConversionError(f"cannot infer the architecture: tensor {name} has shape "
                                  f"{tuple(value.shape)}")
        return value

    embed = get("patch_embed.proj.weight")
    if embed.ndim != 4:
        raise ConversionError(f"patch_embed.proj.weight has shape {embed.shape}, expected 4-D")
    dim, inp_channels = int(embed.shape[0]), int(embed.shape[1])
    out_channels = int(get("output.weight").shape[0])

    levels = ["encoder_level1", "encoder_level2", "encoder_level3", "latent"]
    num_blocks, heads = [], []
    for lvl in levels:
        indices = {int(m[1]) for k in state_dict if (m := re.match(rf"{lvl}\.(\d+)\.", k))}
        if not indices:
            raise ConversionError(f"cannot infer the architecture: no {lvl}.* tensors")
        num_blocks.append(max(indices) + 1)
        heads.append(int(get(f"{lvl}.0.attn.temperature").shape[0]))

    hidden = {dim * 2**i: int(get(f"{lvl}.0.ffn.project_in.weight").shape[0]) // 2
              for i, lvl in enumerate(levels)}
    try:
        factor = _infer_ffn_factor(hidden)
    except ConversionError:
        # One mis-shaped level must not hide the others: fit level 1 alone and let
        # the shape check name the tensors that disagree.
        factor = _infer_ffn_factor({dim: hidden[dim]})
    return {
        "inp_channels": inp_channels, "out_channels": out_channels, "dim": dim,
        "num_blocks": num_blocks, "heads": heads, "ffn_expansion_factor": factor,
        "bias": "encoder_level1.0.attn.qkv.bias" in state_dict,
        "layernorm_type": ("WithBias" if "encoder_level1.0.norm1.body.bias" in state_dict
                           else "BiasFree"),
        "use_mefc": any(k.startswith("encoder_level0.") for k in state_dict),
    }


def _infer_ffn_factor(hidden: dict[int, int]) -> float:
    """A factor f with int(c * f) == hidden[c] at every level: the release's 2.66 when it
    fits, else the shortest decimal in the interval all levels allow."""
    def fits(f: float) -> bool:
        return all(int(c * f) == h for c, h in hidden.items())

    if fits(2.66):
        return 2.66
    lo = max(h / c for c, h in hidden.items())
    hi = min((h + 1) / c for c, h in hidden.items())
    for digits in range(1, 9):
        f = math.ceil(lo * 10**digits) / 10**digits
        if f < hi and fits(f):
            return f
    if lo < hi and fits(lo):
        return lo
    widths = ", ".join(f"{h} at {c} channels" for c, h in hidden.items())
    raise ConversionError(f"no ffn_expansion_factor gives the MSFN widths {widths}")


# --- conversion ------------------------------------------------------------------------

MODULE_PREFIX = "module."  # what DataParallel / DistributedDataParallel put before every name


def unwrap_state_dict(obj: Any, source: str,
                      notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """`{'params': sd}` or a bare `sd` -> sd, with clear errors for anything else.

    A state dict whose names all start with 'module.' (saved from a DataParallel or
    DistributedDataParallel wrapper) is read without the prefix; `notes` gets a line saying so.
    """
    if isinstance(obj, Mapping) and "params" in obj and isinstance(obj["params"], Mapping):
        obj = obj["params"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{source}: not a DRSformer checkpoint (expected "
                              f"{{'params': state_dict}} or a state_dict)")
    keys = [k if isinstance(k, str) else repr(k) for k in obj]
    bad = [k for k, v in zip(keys, obj.values(), strict=True) if not isinstance(v, np.ndarray)]
    if bad:
        raise ConversionError(f"{source}: not a DRSformer state dict: {len(bad)} entries are "
                              f"not tensors ({first_names(bad)}; keys: {first_names(keys)})")
    if not all(isinstance(k, str) for k in obj):
        raise ConversionError(f"{source}: not a DRSformer state dict: tensor names that are "
                              f"not strings ({first_names(keys)})")
    if all(k.startswith(MODULE_PREFIX) for k in obj):
        obj = {k[len(MODULE_PREFIX):]: v for k, v in obj.items()}
        if notes is not None:
            notes.append(f"{source}: every tensor name starts with '{MODULE_PREFIX}' (saved "
                         "from DataParallel / DistributedDataParallel); read without it")
    return dict(obj)


def _expected_params(config: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = abstract_params(from_config(config))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _listing(title: str, items: list[str]) -> str:
    return f"{title} ({len(items)}):\n  " + first_names(items, 10, sep="\n  ")


def state_dict_to_flax(state_dict: Mapping[str, np.ndarray],
                       config: dict[str, Any] | None = None,
                       source: str = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
    """Release state dict -> (model config, Flax params), or ConversionError listing problems."""
    if not any(torch_to_flax(name) for name in state_dict):
        raise ConversionError(f"{source}: no DRSformer tensors; first names: "
                              f"{first_names(list(state_dict))}")
    if config is None:
        try:
            config = infer_config(state_dict)
        except ConversionError as e:
            prefixed = sum(name.startswith(MODULE_PREFIX) for name in state_dict)
            hint = (f" ({prefixed} of the {len(state_dict)} names start with "
                    f"'{MODULE_PREFIX}', the others do not)" if prefixed else "")
            raise ConversionError(f"{source}: {e}{hint}") from None
    try:
        expected = _expected_params(config)
    except Exception as e:  # a config no DRSformer can have (zero heads, ...)
        raise ConversionError(f"{source}: no DRSformer has this architecture "
                              f"({describe(config)}): {e}") from e
    params, unexpected, misshaped = {}, [], []
    for name, value in state_dict.items():
        path = torch_to_flax(name)
        if path is None or path not in expected:
            unexpected.append(f"{name} {tuple(value.shape)}")
            continue
        arr = to_flax_array(np.asarray(value))
        if tuple(arr.shape) != expected[path]:
            want = to_torch_array(np.zeros(expected[path], np.int8)).shape
            misshaped.append(f"{name}: got {tuple(value.shape)}, the model needs {want}")
            continue
        params[path] = arr.astype(np.float32)
    missing = [flax_to_torch(p) for p in expected if p not in params
               and flax_to_torch(p) not in state_dict]
    problems = [_listing(t, items) for t, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("tensors with the wrong shape", misshaped)) if items]
    if problems:
        raise ConversionError(f"{source} does not fit DRSformer({describe(config)}):\n"
                              + "\n".join(problems))
    return config, traverse_util.unflatten_dict(params)


def flax_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> release state dict (float32 numpy), in the release's order."""
    flat = traverse_util.flatten_dict(dict(params))
    unnamed = ["/".join(path) for path in flat if flax_to_torch(path) is None]
    if unnamed:
        raise ConversionError("no release tensor name for Flax parameters "
                              + first_names(unnamed))
    sd = {flax_to_torch(path): to_torch_array(np.asarray(v)) for path, v in flat.items()}
    return {k: sd[k] for k in sorted(sd, key=torch_sort_key)}


def describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def read_torch_checkpoint(path: str | os.PathLike,
                          notes: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, Flax params) of a release `.pth`, every tensor checked against the model.

    Non-finite weights are refused by `loading.load_params`, which every reader goes through.
    """
    sd = unwrap_state_dict(load_pth(path), str(path), notes)
    return state_dict_to_flax(sd, source=str(path))


def write_torch_checkpoint(params: Mapping[str, Any], output: str | os.PathLike,
                           overwrite: bool = False) -> int:
    """Flax params -> a release-format `.pth` (`{'params': state_dict}`). Returns the count."""
    output = Path(output)
    if output.is_dir():
        raise ConversionError(f"{output}: is a folder; the .pth is a file")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it")
    sd = flax_to_state_dict(params)
    save_pth(output, sd, wrap_key="params")
    return len(sd)
