"""The convolution layers of DRSformer, with HWIO kernels, in either activation layout.

Activations are NHWC, or NCHW ("channels first") when a module's
`channels_first` is set; kernels are always HWIO, as stored in checkpoints. The
model picks its layout with `resolve_layout` (see `DRSformer.layout`): NCHW on
CPU, where the depthwise convolutions become stencils over contiguous H x W planes
(faster on XLA:CPU than over channel vectors, and the grouped convolutions'
channel pairs become whole planes), NHWC elsewhere.

Dense convolutions go through `Conv` (1x1 ones are matmuls, `pointwise`). Depthwise
and grouped convolutions (every group reads a few consecutive input channels and
writes one output channel) go through the single function `grouped_conv`, which
has two formulations with the same numbers up to float rounding:

- "xla": one `lax.conv_general_dilated` with `feature_group_count`: the plain
  formulation. Best on GPU, but XLA on CPU runs it through a very slow generic path.
- "shift": a sum of shifted multiply-adds, one per kernel tap and group member,
  fused by XLA into one loop over the output: the stencil engine of
  `cpu_stencils` (performance only; many times faster than "xla" on CPU).

"auto" picks per platform (`FORMULATIONS`: NCHW stencils on CPU, NHWC stencils on
TPU, where XLA:TPU expands `feature_group_count` convolutions into lane-padded
copies, XLA's grouped convolutions on GPU), for the platform the program is
compiled for when the caller names it (`DRSformer.for_platform`), else for JAX's
default backend.

Matmuls and dense convolutions run at the layers' `precision` (JAX's names:
"default", "high", "highest"; None follows `jax.default_matmul_precision`). On
CPU every one of them is float32; on accelerators "default" is bfloat16 passes
(TPU) or TF32 (recent NVIDIA GPUs), and "highest" is true float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from drsformer_jax.model.cpu_stencils import pad_spatial, stencil_grouped_conv
from drsformer_jax.model.initializers import torch_bias_init, torch_default_init

Dtype = Any
CONV_IMPLS = ("auto", "xla", "shift")
LAYOUTS = ("auto", "NHWC", "NCHW")
PRECISIONS = (None, "default", "high", "highest")


class Formulation(NamedTuple):
    conv_impl: str
    layout: str
    recompute: bool  # cheap activations recomputed in the backward pass (DRSformer.recompute)


# What "auto" means per platform, chosen from the compiled programs' memory and
# traffic (docs/accelerators.md); other platforms: "gpu". Recomputing cheap activations
# saves accelerator memory; on CPU it would cost train-step time.
FORMULATIONS = {"cpu": Formulation("shift", "NCHW", False),
                "tpu": Formulation("shift", "NHWC", True),
                "gpu": Formulation("xla", "NHWC", True)}


def formulation(platform: str | None = None) -> Formulation:
    """The formulation of `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return FORMULATIONS.get(platform, FORMULATIONS["gpu"])


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
    """Maps "auto" to the formulation of `platform` (default: JAX's default backend)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return formulation(platform).conv_impl if impl == "auto" else impl


def resolve_layout(layout: str, platform: str | None = None) -> str:
    """Maps "auto" to the activation layout of `platform` (default: JAX's default backend)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return formulation(platform).layout if layout == "auto" else layout


def resolve_recompute(recompute: bool | str, platform: str | None = None) -> bool:
    """Maps "auto" to whether `platform` recomputes cheap activations in the backward pass
    (`DRSformer.recompute`)."""
    if recompute not in ("auto", True, False):
        raise ValueError(f"recompute must be 'auto', True or False, got {recompute!r}")
    return formulation(platform).recompute if recompute == "auto" else bool(recompute)


def check_precision(precision: str | None) -> str | None:
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def channel_axis(channels_first: bool) -> int:
    return 1 if channels_first else -1


def _dimension_numbers(channels_first: bool) -> tuple[str, str, str]:
    return ("NCHW", "HWIO", "NCHW") if channels_first else ("NHWC", "HWIO", "NHWC")


def pointwise(x: jax.Array, kernel: jax.Array, channels_first: bool = False,
              precision: str | None = None) -> jax.Array:
    """1x1 convolution: a matmul over channels with a (C_in, C_out) kernel, or with an
    (N, C_in, C_out) kernel of each example's own.

    Channels first, each image is kernel^T (C_out x C_in) times its (C_in x H*W)
    plane matrix: one GEMM per image with no transposes (a plain einsum would
    make XLA:CPU transpose the activations twice).
    """
    per_example = kernel.ndim == 3
    if not channels_first:
        return jnp.einsum("nhwc,ncd->nhwd" if per_example else "nhwc,cd->nhwd", x, kernel,
                          precision=precision)
    n, c, h, w = x.shape
    kt = (jnp.swapaxes(kernel, 1, 2) if per_example
          else jnp.broadcast_to(kernel.T, (n, kernel.shape[1], c)))
    y = lax.dot_general(kt, x.reshape(n, c, h * w), (((2,), (1,)), ((0,), (0,))),
                        precision=precision)
    return y.reshape(n, kernel.shape[-1], h, w)


def grouped_conv(x: jax.Array, kernel: jax.Array, *, dilation: int = 1,
                 impl: str = "auto", channels_first: bool = False,
                 padding: int | None = None, precision: str | None = None) -> jax.Array:
    """Grouped convolution with zero padding and stride 1 ('same' by default).

    Args:
      x: (N, H, W, G * m) input, or (N, G * m, H, W) with `channels_first`.
      kernel: (kh, kw, m, G): output channel g reads input channels g*m .. g*m+m-1,
        PyTorch's `groups=G` layout for weight (G, m, kh, kw) transposed to HWIO.
        m = 1 is a depthwise convolution.
      dilation: kernel dilation.
      impl: "auto", "xla" or "shift" (see module docstring; "shift" is
        `cpu_stencils.stencil_grouped_conv`).
      channels_first: NCHW activations.
      padding: zeros added to each side of H and W (negative crops); default
        dilation * (k - 1) // 2, the 'same' padding.
      precision: of the "xla" convolution (the "shift" sums are exact products).
    """
    kh, kw, m, groups = kernel.shape
    cax = channel_axis(channels_first)
    if x.shape[cax] != groups * m:
        raise ValueError(f"grouped_conv: input has {x.shape[cax]} channels, kernel "
                         f"{tuple(kernel.shape)} expects {groups * m}")
    if padding is None:
        ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    else:
        ph = pw = padding
    if resolve_conv_impl(impl) == "xla":
        if min(ph, pw) < 0:
            x = pad_spatial(x, min(ph, 0), min(pw, 0), channels_first)
            ph, pw = max(ph, 0), max(pw, 0)
        return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=_dimension_numbers(channels_first), feature_group_count=groups,
            precision=precision)
    return stencil_grouped_conv(x, kernel, dilation, ph, pw, channels_first)


def _per_channel(v: jax.Array, channels_first: bool) -> jax.Array:
    """A (C,) vector shaped to broadcast against the activations."""
    return v[:, None, None] if channels_first else v


def _keyword(default: Any) -> Any:
    return dataclasses.field(default=default, kw_only=True)


class Layer(nn.Module):
    """What every layer of the network is told, as keyword-only fields.

    `channels_first`: NCHW activations (else NHWC); `conv_impl`: the formulation
    of depthwise / grouped convolutions (see `grouped_conv`); `dtype`: the
    computation dtype; `param_dtype`: the parameters'; `precision`: of matmuls and
    convolutions (see the module docstring). `options()` passes them on.
    """

    channels_first: bool = _keyword(False)
    conv_impl: str = _keyword("auto")
    dtype: Dtype = _keyword(jnp.float32)
    param_dtype: Dtype = _keyword(jnp.float32)
    precision: str | None = _keyword(None)

    def options(self) -> dict[str, Any]:
        return dict(channels_first=self.channels_first, conv_impl=self.conv_impl,
                    dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


def conv_kernel(module: nn.Module, kernel_size: int, inputs: int, features: int,
                dtype: Dtype) -> jax.Array:
    """The (k, k, inputs, features) HWIO kernel parameter "kernel" of `module`, with
    PyTorch's default initialisation: the one declaration of every convolution's kernel."""
    return module.param("kernel", torch_default_init,
                        (kernel_size, kernel_size, inputs, features), dtype)


class ConvKernel(Layer):
    """The kernel of a bias-free `Conv` (or of a depthwise `GroupedConv` with
    `inputs_per_group=1`), declared as those declare it but returned, not applied:
    for callers that fold it into a following linear map (MEFC does).

    Called with the number of input channels (1 for a depthwise kernel); returns the
    kernel in the computation dtype or float32, whichever is wider (folding is done
    in at least float32).
    """

    features: int
    kernel_size: int = 1

    @nn.compact
    def __call__(self, inputs: int) -> jax.Array:
        kernel = conv_kernel(self, self.kernel_size, inputs, self.features, self.param_dtype)
        return kernel.astype(jnp.promote_types(self.dtype, jnp.float32))


class Conv(Layer):
    """Dense 2-D convolution, stride 1, 'same' zero padding, HWIO kernel."""

    features: int
    kernel_size: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[channel_axis(self.channels_first)]
        kernel = conv_kernel(self, k, cin, self.features, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1:
            # A 1x1 convolution is a matmul over channels; XLA tiles dots better.
            y = pointwise(x, kernel[0, 0], self.channels_first, self.precision)
        else:
            p = (k - 1) // 2
            y = lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                         dimension_numbers=_dimension_numbers(self.channels_first),
                                         precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(cin * k * k), (self.features,),
                              self.param_dtype)
            y = y + _per_channel(bias.astype(self.dtype), self.channels_first)
        return y


class GroupedConv(Layer):
    """Depthwise (inputs_per_group=1) or grouped conv; see `grouped_conv`."""

    features: int
    kernel_size: int
    inputs_per_group: int = 1
    dilation: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, m = self.kernel_size, self.inputs_per_group
        kernel = conv_kernel(self, k, m, self.features, self.param_dtype)
        y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                         dilation=self.dilation, impl=self.conv_impl,
                         channels_first=self.channels_first, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(m * k * k), (self.features,),
                              self.param_dtype)
            y = y + _per_channel(bias.astype(self.dtype), self.channels_first)
        return y


DepthwiseConv = functools.partial(GroupedConv, inputs_per_group=1)
