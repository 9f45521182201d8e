"""The one table of release tensor names <-> Flax parameter paths, used both ways.

Each rule is a pair of templates, release name and Flax path ('/'-joined), with
the same placeholders. A placeholder is either a pattern copied as it is
(`{level}`, `{i}`) or a two-way map of values (`{leaf}`: weight <-> kernel).
Converting matches one side's template and fills in the other's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np

from drsformer_jax.model.mefc import EXPERTS

_SEP, _DIL = EXPERTS[:4], EXPERTS[4:7]  # the experts with parameters: separable, dilated

# name -> a regex (the same text on both sides) or {release value: Flax value}.
_PLACEHOLDERS: dict[str, str | Mapping[str, str]] = {
    "level": r"encoder_level[1-3]|latent|decoder_level[1-3]",
    "mefc": r"encoder_level0|refinement",
    "updown": r"(?:down|up)\d_\d",
    "i": r"\d+",
    "layer": r"\w+",
    "cheap": r"output|reduce_chan_level[23]",
    "branch": r"attn|ffn",
    "norm": r"norm[12]",
    "scalar": r"temperature|attn[1-4]",
    "leaf": {"weight": "kernel", "bias": "bias"},
    "ln_leaf": {"weight": "scale", "bias": "bias"},
    "fc": {"0": "router_fc1", "2": "router_fc2"},
    "sep": {str(j): name for j, name in enumerate(_SEP)},
    "sep_part": {"0": "dw1", "1": "pw1", "3": "dw2", "4": "pw2"},
    "dil": {str(j + len(_SEP)): name for j, name in enumerate(_DIL)},
    "dil_part": {"0": "dw", "1": "pw"},
}

# (release name, Flax path)
_RULES = (
    ("{level}.{i}.{norm}.body.{ln_leaf}", "{level}_{i}/{norm}/{ln_leaf}"),
    ("{level}.{i}.attn.{scalar}", "{level}_{i}/attn/{scalar}"),
    ("{level}.{i}.{branch}.{layer}.{leaf}", "{level}_{i}/{branch}/{layer}/{leaf}"),
    ("{mefc}.layers.0.ca_fc.{fc}.{leaf}", "{mefc}/{fc}/{leaf}"),
    ("{mefc}.layers.1.preprocess.op.0.weight", "{mefc}/preprocess/kernel"),
    ("{mefc}.layers.1._ops.{i}._out.0.weight", "{mefc}/step_{i}_fuse/kernel"),
    ("{mefc}.layers.1._ops.{i}._ops.{sep}.op.{sep_part}.weight",
     "{mefc}/step_{i}_{sep}/{sep_part}/kernel"),
    ("{mefc}.layers.1._ops.{i}._ops.{dil}.op.{dil_part}.weight",
     "{mefc}/step_{i}_{dil}/{dil_part}/kernel"),
    ("{updown}.body.0.weight", "{updown}/conv/kernel"),
    ("patch_embed.proj.{leaf}", "patch_embed/{leaf}"),
    ("{cheap}.{leaf}", "{cheap}/{leaf}"),
)


def _pattern(template: str, side: int) -> re.Pattern:
    """The regex of one side (0: release, 1: Flax) of a rule's template."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        kind = _PLACEHOLDERS[m[1]]
        values = kind if isinstance(kind, str) else "|".join(
            re.escape(v) for v in (kind if side == 0 else kind.values()))
        out.append(f"(?P<{m[1]}>{values})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


@functools.cache
def _compiled() -> tuple[tuple[re.Pattern, re.Pattern, str, str], ...]:
    return tuple((_pattern(t, 0), _pattern(f, 1), t, f) for t, f in _RULES)


def _fill(template: str, groups: dict[str, str], to_flax: bool) -> str:
    values = {}
    for name, value in groups.items():
        kind = _PLACEHOLDERS[name]
        if isinstance(kind, str):
            values[name] = value
        else:
            values[name] = kind[value] if to_flax else {v: k for k, v in kind.items()}[value]
    return template.format(**values)


def torch_to_flax(name: str) -> tuple[str, ...] | None:
    """The Flax parameter path of a release tensor name, or None if it has none."""
    for torch_re, _, _, flax_t in _compiled():
        m = torch_re.fullmatch(name)
        if m:
            return tuple(_fill(flax_t, m.groupdict(), True).split("/"))
    return None


def flax_to_torch(path: tuple[str, ...]) -> str | None:
    """The release tensor name of a Flax parameter path, or None if it has none."""
    joined = "/".join(path)
    for _, flax_re, torch_t, _ in _compiled():
        m = flax_re.fullmatch(joined)
        if m:
            return _fill(torch_t, m.groupdict(), False)
    return None


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
