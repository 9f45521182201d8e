"""Converting the release's PyTorch checkpoints to Flax and back.

    python -m drsformer_jax.convert --torch-checkpoint deraining.pth --output DIR
    python -m drsformer_jax.convert --to-torch --checkpoint DIR --output model.pth

Forward: reads `{'params': state_dict}` or a bare state dict, infers the
architecture from tensor names and shapes, checks that every tensor maps onto
the model (reporting all missing, unexpected and mis-shaped names at once),
then writes an export directory (`drsformer_jax.checkpoint`). Nothing is written
unless everything fits. Reverse: any checkpoint `drsformer_jax.load` accepts
becomes a release-format `.pth` that the release loads with `strict=True`.
PyTorch is not needed either way.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drsformer_jax.mefc import EXPERTS
from drsformer_jax.torch_checkpoint import TorchCheckpointError, load_pth, save_pth


class ConversionError(ValueError):
    """The checkpoint does not fit the model; the message lists the offending names."""


# --- names -----------------------------------------------------------------------------

_LEVELS = r"encoder_level[1-3]|latent|decoder_level[1-3]"
_MEFC = r"encoder_level0|refinement"
_SEP_PARTS = {"0": "dw1", "1": "pw1", "3": "dw2", "4": "pw2"}
_DIL_PARTS = {"0": "dw", "1": "pw"}


def _expert_part(expert: int, index: str) -> str | None:
    parts = _SEP_PARTS if expert < 4 else _DIL_PARTS if expert < 7 else {}
    return parts.get(index)


def torch_to_flax(name: str) -> tuple[str, ...] | None:
    """The Flax parameter path of a release tensor name, or None if it has none."""
    m = re.fullmatch(rf"({_LEVELS})\.(\d+)\.(norm[12])\.body\.(weight|bias)", name)
    if m:
        leaf = "scale" if m[4] == "weight" else "bias"
        return (f"{m[1]}_{m[2]}", m[3], leaf)
    m = re.fullmatch(rf"({_LEVELS})\.(\d+)\.attn\.(temperature|attn[1-4])", name)
    if m:
        return (f"{m[1]}_{m[2]}", "attn", m[3])
    m = re.fullmatch(rf"({_LEVELS})\.(\d+)\.(attn|ffn)\.(\w+)\.(weight|bias)", name)
    if m:
        return (f"{m[1]}_{m[2]}", m[3], m[4], _leaf(m[5]))
    m = re.fullmatch(rf"({_MEFC})\.layers\.0\.ca_fc\.([02])\.(weight|bias)", name)
    if m:
        return (m[1], "router_fc1" if m[2] == "0" else "router_fc2", _leaf(m[3]))
    m = re.fullmatch(rf"({_MEFC})\.layers\.1\.preprocess\.op\.0\.weight", name)
    if m:
        return (m[1], "preprocess", "kernel")
    m = re.fullmatch(rf"({_MEFC})\.layers\.1\._ops\.(\d+)\._out\.0\.weight", name)
    if m:
        return (m[1], f"step_{m[2]}_fuse", "kernel")
    m = re.fullmatch(rf"({_MEFC})\.layers\.1\._ops\.(\d+)\._ops\.(\d+)\.op\.(\d+)\.weight", name)
    if m and int(m[3]) < len(EXPERTS) and _expert_part(int(m[3]), m[4]):
        return (m[1], f"step_{m[2]}_{EXPERTS[int(m[3])]}", _expert_part(int(m[3]), m[4]),
                "kernel")
    m = re.fullmatch(r"((?:down|up)\d_\d)\.body\.0\.weight", name)
    if m:
        return (m[1], "conv", "kernel")
    m = re.fullmatch(r"(patch_embed)\.proj\.(weight|bias)|"
                     r"(output|reduce_chan_level[23])\.(weight|bias)", name)
    if m:
        return (m[1] or m[3], _leaf(m[2] or m[4]))
    return None


def flax_to_torch(path: tuple[str, ...]) -> str:
    """The release tensor name of a Flax parameter path (inverse of `torch_to_flax`)."""
    p = "/".join(path)
    m = re.fullmatch(rf"({_LEVELS})_(\d+)/(norm[12])/(scale|bias)", p)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}.body.{'weight' if m[4] == 'scale' else 'bias'}"
    m = re.fullmatch(rf"({_LEVELS})_(\d+)/attn/(temperature|attn[1-4])", p)
    if m:
        return f"{m[1]}.{m[2]}.attn.{m[3]}"
    m = re.fullmatch(rf"({_LEVELS})_(\d+)/(attn|ffn)/(\w+)/(kernel|bias)", p)
    if m:
        return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}.{_torch_leaf(m[5])}"
    m = re.fullmatch(rf"({_MEFC})/router_fc([12])/(kernel|bias)", p)
    if m:
        return f"{m[1]}.layers.0.ca_fc.{0 if m[2] == '1' else 2}.{_torch_leaf(m[3])}"
    m = re.fullmatch(rf"({_MEFC})/preprocess/kernel", p)
    if m:
        return f"{m[1]}.layers.1.preprocess.op.0.weight"
    m = re.fullmatch(rf"({_MEFC})/step_(\d+)_fuse/kernel", p)
    if m:
        return f"{m[1]}.layers.1._ops.{m[2]}._out.0.weight"
    m = re.fullmatch(rf"({_MEFC})/step_(\d+)_(\w+?)/(\w+)/kernel", p)
    if m and m[3] in EXPERTS:
        j = EXPERTS.index(m[3])
        index = {v: k for k, v in (_SEP_PARTS if j < 4 else _DIL_PARTS).items()}.get(m[4])
        if index is not None:
            return f"{m[1]}.layers.1._ops.{m[2]}._ops.{j}.op.{index}.weight"
    m = re.fullmatch(r"((?:down|up)\d_\d)/conv/kernel", p)
    if m:
        return f"{m[1]}.body.0.weight"
    m = re.fullmatch(r"patch_embed/(kernel|bias)", p)
    if m:
        return f"patch_embed.proj.{_torch_leaf(m[1])}"
    m = re.fullmatch(r"(output|reduce_chan_level[23])/(kernel|bias)", p)
    if m:
        return f"{m[1]}.{_torch_leaf(m[2])}"
    raise ConversionError(f"no release tensor name for Flax parameter {p}")


def _leaf(torch_leaf: str) -> str:
    return "kernel" if torch_leaf == "weight" else "bias"


def _torch_leaf(flax_leaf: str) -> str:
    return "weight" if flax_leaf == "kernel" else "bias"


# The release registers modules in this order; its state_dict follows it.
_ORDER = ["patch_embed", "encoder_level0", "encoder_level1", "down1_2", "encoder_level2",
          "down2_3", "encoder_level3", "down3_4", "latent", "up4_3", "reduce_chan_level3",
          "decoder_level3", "up3_2", "reduce_chan_level2", "decoder_level2", "up2_1",
          "decoder_level1", "refinement", "output",
          "norm1", "attn", "norm2", "ffn", "temperature", "attn1", "attn2", "attn3", "attn4",
          "qkv", "qkv_dwconv", "project_in", "dwconv3x3", "dwconv5x5", "dwconv3x3_1",
          "dwconv5x5_1", "project_out", "layers", "ca_fc", "preprocess", "_ops", "_out",
          "op", "body", "proj", "weight", "bias"]
_RANK = {name: i for i, name in enumerate(_ORDER)}


def torch_sort_key(name: str) -> tuple[tuple[int, int], ...]:
    """Sorts release tensor names into the release's state_dict order."""
    return tuple((0, int(part)) if part.isdigit() else (1, _RANK.get(part, len(_ORDER)))
                 for part in name.split("."))


def to_flax_array(torch_value: np.ndarray) -> np.ndarray:
    """OIHW conv weights -> HWIO; (out, in) Linear weights -> (in, out); others as-is."""
    if torch_value.ndim == 4:
        return np.transpose(torch_value, (2, 3, 1, 0))
    if torch_value.ndim == 2:
        return torch_value.T
    return torch_value


def to_torch_array(flax_value: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_array`."""
    if flax_value.ndim == 4:
        return np.ascontiguousarray(np.transpose(flax_value, (3, 2, 0, 1)))
    if flax_value.ndim == 2:
        return np.ascontiguousarray(flax_value.T)
    return np.asarray(flax_value)


# --- architecture inference ----------------------------------------------------------

def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The DRSformer architecture fields a release state dict was made with."""
    def get(name: str) -> np.ndarray:
        if name not in state_dict:
            raise ConversionError(f"cannot infer the architecture: tensor {name} is missing")
        return state_dict[name]

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

def unwrap_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    """`{'params': sd}` or a bare `sd` -> sd, with clear errors for anything else."""
    if isinstance(obj, Mapping) and "params" in obj and isinstance(obj["params"], Mapping):
        obj = obj["params"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{source}: not a DRSformer checkpoint (expected "
                              f"{{'params': state_dict}} or a state_dict)")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ConversionError(f"{source}: not a DRSformer state dict: {len(bad)} entries are "
                              f"not tensors (keys: {keys}{', ...' if len(obj) > 8 else ''})")
    return dict(obj)


def _expected_params(config: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from drsformer_jax.models import from_config

    model = from_config(config)
    x = jnp.zeros((1, 8, 8, config["inp_channels"]), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def state_dict_to_flax(state_dict: Mapping[str, np.ndarray],
                       config: dict[str, Any] | None = None,
                       source: str = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
    """Release state dict -> (model config, Flax params), or ConversionError listing problems."""
    from flax import traverse_util

    config = config or infer_config(state_dict)
    expected = _expected_params(config)
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
        raise ConversionError(f"{source} does not fit DRSformer({_describe(config)}):\n"
                              + "\n".join(problems))
    return config, traverse_util.unflatten_dict(params)


def flax_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> release state dict (float32 numpy), in the release's order."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(params))
    sd = {flax_to_torch(path): to_torch_array(np.asarray(v)) for path, v in flat.items()}
    return {k: sd[k] for k in sorted(sd, key=torch_sort_key)}


def _describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def convert_torch_checkpoint(torch_checkpoint: str | Path, output: str | Path,
                             overwrite: bool = False) -> dict[str, Any]:
    """Release `.pth` -> export directory. Returns the model config."""
    from drsformer_jax.checkpoint import save_export

    source = str(torch_checkpoint)
    state_dict = unwrap_state_dict(load_pth(torch_checkpoint), source)
    config, params = state_dict_to_flax(state_dict, source=source)
    save_export(output, config, params, overwrite=overwrite,
                metadata={"converted_from": Path(source).name})
    return config


def export_torch_checkpoint(checkpoint: str | Path, output: str | Path,
                            overwrite: bool = False) -> int:
    """Any checkpoint `load` accepts -> release-format `.pth`. Returns the tensor count."""
    from drsformer_jax.checkpoint import load

    output = Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it")
    _, variables = load(checkpoint)
    sd = flax_to_state_dict(variables["params"])
    save_pth(output, sd, wrap_key="params")
    return len(sd)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.convert",
        description="Convert DRSformer checkpoints between the PyTorch release and Flax.")
    parser.add_argument("--torch-checkpoint", help="release .pth to convert to Flax")
    parser.add_argument("--to-torch", action="store_true",
                        help="convert a Flax checkpoint (--checkpoint) to a release .pth")
    parser.add_argument("--checkpoint", "--flax-checkpoint", dest="checkpoint",
                        help="with --to-torch: export dir, training checkpoint or workdir")
    parser.add_argument("--output", required=True,
                        help="output directory (to Flax) or .pth file (--to-torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        if args.to_torch:
            if not args.checkpoint:
                parser.error("--to-torch needs --checkpoint DIR")
            n = export_torch_checkpoint(args.checkpoint, args.output, args.overwrite)
            print(f"wrote {n} tensors to {args.output}")
        else:
            if not args.torch_checkpoint:
                parser.error("give --torch-checkpoint FILE (or --to-torch --checkpoint DIR)")
            config = convert_torch_checkpoint(args.torch_checkpoint, args.output,
                                              args.overwrite)
            print(f"converted {args.torch_checkpoint} -> {args.output}: "
                  f"DRSformer({_describe(config)})")
    except (ConversionError, TorchCheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
