"""The DRSformer U-Net (Flax linen).

NHWC in and out; inside, the activations are in the platform's layout (NCHW on CPU,
NHWC on GPUs and TPUs: `convolution.FORMULATIONS`), or the one `DRSformer.layout` names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import traverse_util

from drsformer_jax.model.attention import TopKSparseAttention
from drsformer_jax.model.convolution import (
    Conv,
    Layer,
    channel_axis,
    check_precision,
    resolve_conv_impl,
    resolve_layout,
    resolve_recompute,
)
from drsformer_jax.model.feedforward import MixedScaleFeedForward
from drsformer_jax.model.initializers import initial_value
from drsformer_jax.model.mefc import MEFC
from drsformer_jax.model.normalization import LayerNorm

# Three 2x down-samplings: image sides must be multiples of 8.
SIZE_MULTIPLE = 8


def pixel_unshuffle(x: jax.Array, r: int = 2, channels_first: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H/r, W/r, C*r*r), PyTorch's channel order c*r*r + dy*r + dx.

    With `channels_first`, (N, C, H, W) -> (N, C*r*r, H/r, W/r), same channel order.
    """
    if channels_first:
        return rearrange(x, "b c (h dy) (w dx) -> b (c dy dx) h w", dy=r, dx=r)
    return rearrange(x, "b (h dy) (w dx) c -> b h w (c dy dx)", dy=r, dx=r)


def pixel_shuffle(x: jax.Array, r: int = 2, channels_first: bool = False) -> jax.Array:
    """Inverse of `pixel_unshuffle`: (N, H, W, C*r*r) -> (N, H*r, W*r, C)."""
    if channels_first:
        return rearrange(x, "b (c dy dx) h w -> b c (h dy) (w dx)", dy=r, dx=r)
    return rearrange(x, "b h w (c dy dx) -> b (h dy) (w dx) c", dy=r, dx=r)


class TransformerBlock(Layer):
    """Sparse transformer block: x + TKSA(LN(x)), then + MSFN(LN(x))."""

    dim: int
    num_heads: int
    ffn_expansion_factor: float = 2.66
    use_bias: bool = False
    layernorm_type: str = "WithBias"
    recompute: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = self.options()
        ln = dict(kind=self.layernorm_type, recompute=self.recompute, **kw)
        x = x + TopKSparseAttention(self.dim, self.num_heads, self.use_bias, self.recompute,
                                    name="attn", **kw)(LayerNorm(name="norm1", **ln)(x))
        ffn = MixedScaleFeedForward(self.dim, self.ffn_expansion_factor, self.use_bias,
                                    self.recompute, name="ffn", **kw)
        return x + ffn(LayerNorm(name="norm2", **ln)(x))


class Resample(Layer):
    """Down: conv3x3 C -> C/2, then pixel-unshuffle(2): 2C channels at half size.
    Up: conv3x3 C -> 2C, then pixel-shuffle(2): C/2 channels at double size."""

    up: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[channel_axis(self.channels_first)]
        x = Conv(c * 2 if self.up else c // 2, 3, name="conv", **self.options())(x)
        shuffle = pixel_shuffle if self.up else pixel_unshuffle
        return shuffle(x, channels_first=self.channels_first)


class DRSformer(nn.Module):
    """DRSformer (Chen et al., CVPR 2023), parameter-compatible with the release.

    Input: (N, H, W, inp_channels) float in [0, 1], H and W multiples of 8.
    Output: restored image of the same shape, float32 (float64 when `dtype` is
    float64, with JAX's x64 mode on), not clamped.

    Fields mirror the release's constructor; `use_mefc=False` is the variant
    without MEFC used for Rain200L and SPA-Data. `dtype` is the computation dtype
    (parameters stay `param_dtype`); `remat` ("blocks" or True; "none" or False)
    rematerialises each transformer block and MEFC in the backward pass, keeping
    only their inputs; `conv_impl` picks the depthwise / grouped convolution
    formulation and `layout` the activation layout inside the model ("auto": the
    platform's, see `for_platform` and `convolution.FORMULATIONS`), as does
    `recompute` (the LayerNorms, TKSA's normalised q / k and scores, MSFN's project_in
    and depthwise branches and MEFC's steps run again in the backward pass instead of
    keeping their activations: less memory, a little more time; off on CPU);
    `matmul_precision` is that of every matmul and convolution but TKSA's scores,
    which are always at "highest" (None: JAX's default; "highest" is true float32 on
    accelerators). Input and output are NHWC whatever the layout, and the parameters
    are the same.
    """

    inp_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    num_blocks: Sequence[int] = (4, 6, 6, 8)
    heads: Sequence[int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    layernorm_type: str = "WithBias"
    use_mefc: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    conv_impl: str = "auto"
    layout: str = "auto"
    matmul_precision: str | None = None
    recompute: bool | str = "auto"

    def config(self) -> dict[str, Any]:
        """The architecture fields as a JSON-friendly dict (no dtype / runtime choices)."""
        return model_config(self)

    def for_platform(self, platform: str) -> DRSformer:
        """This model with "auto" formulation and layout resolved for `platform` ("cpu",
        "cuda", "tpu"): the program's own platform, which is not the host's default
        backend when compiling for a mesh of other devices or exporting."""
        return self.clone(conv_impl=resolve_conv_impl(self.conv_impl, platform),
                          layout=resolve_layout(self.layout, platform),
                          recompute=resolve_recompute(self.recompute, platform))

    def layer_options(self) -> dict[str, Any]:
        """What every layer is told (`Layer`'s fields), "auto" resolved for the default
        backend: call `for_platform` first for another platform."""
        return dict(channels_first=resolve_layout(self.layout) == "NCHW",
                    conv_impl=resolve_conv_impl(self.conv_impl), dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    precision=check_precision(self.matmul_precision))

    def stacks(self) -> list[tuple[str, int, int, int, int]]:
        """The transformer-block stacks, in order: (name, depth, channels, heads,
        downsampling factor of the input's height and width)."""
        d, nb, nh = self.dim, self.num_blocks, self.heads
        return [("encoder_level1", nb[0], d, nh[0], 1),
                ("encoder_level2", nb[1], 2 * d, nh[1], 2),
                ("encoder_level3", nb[2], 4 * d, nh[2], 4), ("latent", nb[3], 8 * d, nh[3], 8),
                ("decoder_level3", nb[2], 4 * d, nh[2], 4),
                ("decoder_level2", nb[1], 2 * d, nh[1], 2),
                # No 1x1 reduction at level 1: the decoder runs at 2 * dim channels.
                ("decoder_level1", nb[0], 2 * d, nh[0], 1)]

    def block(self, channels: int, heads: int, **fields: Any) -> TransformerBlock:
        """One transformer block as this model builds it (no rematerialisation)."""
        return TransformerBlock(channels, heads, self.ffn_expansion_factor, self.bias,
                                self.layernorm_type, resolve_recompute(self.recompute),
                                **self.layer_options(), **fields, parent=None)

    @nn.compact
    def __call__(self, inp: jax.Array) -> jax.Array:
        self._check_input(inp)
        kw = self.layer_options()
        cf = kw["channels_first"]
        cax = channel_axis(cf)
        block_cls, mefc_cls = (remat_policy(self.remat)(c) for c in (TransformerBlock, MEFC))
        recompute = resolve_recompute(self.recompute)

        stacks = {name: (depth, dim, heads) for name, depth, dim, heads, _ in self.stacks()}

        def level(x: jax.Array, name: str) -> jax.Array:
            depth, dim, heads = stacks[name]
            for i in range(depth):
                x = block_cls(dim, heads, self.ffn_expansion_factor, self.bias,
                              self.layernorm_type, recompute, name=f"{name}_{i}", **kw)(x)
            return x

        d = self.dim
        x = inp.astype(self.dtype)
        if cf:
            x = jnp.transpose(x, (0, 3, 1, 2))
        x = Conv(d, 3, name="patch_embed", **kw)(x)
        if self.use_mefc:
            x = mefc_cls(recompute=recompute, name="encoder_level0", **kw)(x)
        e1 = level(x, "encoder_level1")
        e2 = level(Resample(False, name="down1_2", **kw)(e1), "encoder_level2")
        e3 = level(Resample(False, name="down2_3", **kw)(e2), "encoder_level3")
        lat = level(Resample(False, name="down3_4", **kw)(e3), "latent")

        x = jnp.concatenate([Resample(True, name="up4_3", **kw)(lat), e3], axis=cax)
        x = Conv(4 * d, 1, use_bias=self.bias, name="reduce_chan_level3", **kw)(x)
        x = level(x, "decoder_level3")
        x = jnp.concatenate([Resample(True, name="up3_2", **kw)(x), e2], axis=cax)
        x = Conv(2 * d, 1, use_bias=self.bias, name="reduce_chan_level2", **kw)(x)
        x = level(x, "decoder_level2")
        x = jnp.concatenate([Resample(True, name="up2_1", **kw)(x), e1], axis=cax)
        x = level(x, "decoder_level1")
        if self.use_mefc:
            x = mefc_cls(recompute=recompute, name="refinement", **kw)(x)
        x = Conv(self.out_channels, 3, use_bias=self.bias, name="output", **kw)(x)
        if cf:
            x = jnp.transpose(x, (0, 2, 3, 1))
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # float64 stays float64
        return x.astype(out_dtype) + inp.astype(out_dtype)

    def _check_input(self, inp: jax.Array) -> None:
        if inp.ndim != 4:
            raise ValueError(f"DRSformer expects NHWC input, got shape {tuple(inp.shape)}")
        _, h, w, c = inp.shape
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"DRSformer input height and width must be multiples of {SIZE_MULTIPLE}, got "
                f"shape {tuple(inp.shape)} (pad the image first, e.g. with "
                f"drsformer_jax.inference.pad_to_multiple)")
        if c != self.inp_channels:
            raise ValueError(f"DRSformer expects {self.inp_channels} input channels, got shape "
                             f"{tuple(inp.shape)}")
        if self.out_channels != self.inp_channels:
            raise ValueError("the global residual needs out_channels == inp_channels")


# What `remat` may be: False / "none", True / "blocks".
REMAT = ("none", "blocks")


def remat_policy(remat: bool | str) -> Any:
    """module class -> the class with `remat`'s rematerialisation (see `DRSformer`)."""
    mode = {False: "none", True: "blocks"}.get(remat, remat)
    if mode not in REMAT:
        raise ValueError(f"remat must be one of {REMAT} (or a bool), got {remat!r}")
    return nn.remat if mode == "blocks" else (lambda cls: cls)


ARCH_FIELDS = ("inp_channels", "out_channels", "dim", "num_blocks", "heads",
               "ffn_expansion_factor", "bias", "layernorm_type", "use_mefc")


def model_config(model: DRSformer) -> dict[str, Any]:
    """Architecture fields of `model` (what a checkpoint must record to rebuild it)."""
    cfg = {f: getattr(model, f) for f in ARCH_FIELDS}
    cfg["num_blocks"], cfg["heads"] = list(cfg["num_blocks"]), list(cfg["heads"])
    return cfg


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# How the model runs, not what it is: not recorded in checkpoints.
RUNTIME_FIELDS = ("dtype", "remat", "conv_impl", "layout", "matmul_precision", "recompute")


def from_config(config: Mapping[str, Any], *, strict: bool = True,
                **overrides: Any) -> DRSformer:
    """The one model builder: a DRSformer from architecture and runtime fields.

    `config` is a checkpoint's model config (`model_config`) or a training config,
    whose model fields are top-level (ARCH_FIELDS, and RUNTIME_FIELDS with
    `dtype` a name in DTYPES). `strict`: other fields are an error (a checkpoint's
    config holds nothing else); a training config passes strict=False.
    `overrides` (dtype, remat, conv_impl, ...) win over the config's.
    """
    known = set(ARCH_FIELDS) | set(RUNTIME_FIELDS)
    unknown = sorted(set(config) - known) if strict else []
    if unknown:
        raise ValueError(f"unknown DRSformer config fields: {', '.join(unknown)}")
    fields = {k: config[k] for k in known if k in config}
    fields.update(overrides)
    for key in ("num_blocks", "heads"):
        if key in fields:
            fields[key] = tuple(int(v) for v in fields[key])
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {fields['dtype']!r}")
        fields["dtype"] = DTYPES[fields["dtype"]]
    return DRSformer(**fields)


def abstract_params(model: DRSformer) -> Any:
    """The shapes and dtypes of `model`'s parameters, computed without allocating them."""
    x = jax.ShapeDtypeStruct((1, SIZE_MULTIPLE, SIZE_MULTIPLE, model.inp_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def init_params(model: DRSformer, seed: int) -> dict[str, Any]:
    """Fresh parameters for `model`, sampled on the host with PyTorch's default rules.

    Each tensor of `abstract_params` (nothing is compiled) is filled by
    `initializers.initial_value`, which follows the same rules as the modules'
    initialisers (checked by tests). Deterministic in `seed` on every host, and
    about a second for the full model where a jitted `model.init` compiles for
    minutes on CPU.
    """
    shapes = {k: tuple(v.shape)
              for k, v in traverse_util.flatten_dict(abstract_params(model)).items()}
    rng = np.random.default_rng(seed)
    params = {path: jnp.asarray(initial_value(path, shapes, rng), model.param_dtype)
              for path in sorted(shapes)}
    return traverse_util.unflatten_dict(params)


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
