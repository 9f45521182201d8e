"""Convolutions of DRSformer, in NHWC with HWIO kernels.

Dense convolutions go through `Conv`. Depthwise and grouped convolutions (every
group reads a few consecutive input channels and writes one output channel) go
through the single function `grouped_conv`, which has several formulations:

- "xla": one `lax.conv_general_dilated` with `feature_group_count`. Best on
  GPU/TPU, but XLA on CPU runs it through a very slow generic path.
- "shift": a sum of shifted multiply-adds, one per kernel tap and group member.
  Memory-bound but ~10x faster than "xla" on CPU.

"auto" picks by backend. Both give the same numbers up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from drsformer_jax.initializers import torch_bias_init, torch_default_init

Dtype = Any
CONV_IMPLS = ("auto", "xla", "shift")

def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to the fastest formulation for the default backend."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "shift" if jax.default_backend() == "cpu" else "xla"


def grouped_conv(x: jax.Array, kernel: jax.Array, *, dilation: int = 1,
                 impl: str = "auto") -> jax.Array:
    """Grouped convolution with 'same' zero padding and stride 1.

    Args:
      x: (N, H, W, G * m) input.
      kernel: (kh, kw, m, G): output channel g reads input channels g*m .. g*m+m-1,
        PyTorch's `groups=G` layout for weight (G, m, kh, kw) transposed to HWIO.
        m = 1 is a depthwise convolution.
      dilation: kernel dilation; padding is dilation * (k - 1) // 2 per side.
      impl: "auto", "xla" or "shift" (see module docstring).
    """
    kh, kw, m, groups = kernel.shape
    if x.shape[-1] != groups * m:
        raise ValueError(f"grouped_conv: input has {x.shape[-1]} channels, kernel "
                         f"{tuple(kernel.shape)} expects {groups * m}")
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    if resolve_conv_impl(impl) == "xla":
        return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
    return _shifted_grouped_conv(x, kernel, dilation, ph, pw)


def _shifted_grouped_conv(x: jax.Array, kernel: jax.Array, dilation: int, ph: int,
                          pw: int) -> jax.Array:
    kh, kw, m, groups = kernel.shape
    # Input channel g*m + r meets kernel[..., r, g]: interleave the (small) kernel so one
    # depthwise conv covers every input channel, then sum each group's m outputs. This
    # avoids strided channel slices of the (large) input.
    per_channel = jnp.transpose(kernel, (0, 1, 3, 2)).reshape(kh, kw, groups * m)
    y = _shifted_depthwise(x, per_channel, dilation, ph, pw)
    return y if m == 1 else y.reshape(*y.shape[:-1], groups, m).sum(axis=-1)


def _shift_sum(x: jax.Array, kernel: jax.Array, dilation: int, ph: int, pw: int) -> jax.Array:
    """sum over taps (i, j) of pad(x)[i*d : i*d + H, j*d : j*d + W] * kernel[i, j]."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :]
            term = tap * kernel[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_depthwise(x: jax.Array, kernel: jax.Array, dilation: int, ph: int,
                       pw: int) -> jax.Array:
    """Depthwise conv, kernel (kh, kw, C), as shifted multiply-adds."""
    return _shift_sum(x, kernel, dilation, ph, pw)


def _shifted_depthwise_fwd(x, kernel, dilation, ph, pw):
    return _shift_sum(x, kernel, dilation, ph, pw), (x, kernel)


def _shifted_depthwise_bwd(dilation, ph, pw, residuals, g):
    # Written out because autodiff of the pads and slices is 1.4x slower on CPU:
    # the input gradient is the same shifted sum with the flipped kernel, the
    # kernel gradient one reduction per tap.
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1], x.shape[2]
    dx = _shift_sum(g, kernel[::-1, ::-1], dilation, dilation * (kh - 1) - ph,
                    dilation * (kw - 1) - pw)
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    dk = jnp.stack([
        jnp.sum(xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :] * g,
                axis=(0, 1, 2)) for i in range(kh) for j in range(kw)])
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


class Conv(nn.Module):
    """Dense 2-D convolution, stride 1, 'same' zero padding, HWIO kernel."""

    features: int
    kernel_size: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", torch_default_init, (k, k, cin, self.features),
                            self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1:
            # A 1x1 convolution is a matmul over channels; XLA tiles dots better.
            y = jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
        else:
            p = (k - 1) // 2
            y = lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(cin * k * k), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class GroupedConv(nn.Module):
    """Depthwise (inputs_per_group=1) or grouped conv; see `grouped_conv`."""

    features: int
    kernel_size: int
    inputs_per_group: int = 1
    dilation: int = 1
    use_bias: bool = False
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, m = self.kernel_size, self.inputs_per_group
        kernel = self.param("kernel", torch_default_init, (k, k, m, self.features),
                            self.param_dtype)
        y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                         dilation=self.dilation, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", torch_bias_init(m * k * k), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


DepthwiseConv = functools.partial(GroupedConv, inputs_per_group=1)
