"""Mixture-of-experts feature compensator (MEFC, the release's `subnet`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drsformer_jax.model.convolution import (
    Conv,
    ConvKernel,
    DepthwiseConv,
    Layer,
    channel_axis,
    pointwise,
)
from drsformer_jax.model.initializers import torch_bias_init, torch_default_init

# The eight experts, in the release's order (op index j in the checkpoint).
EXPERTS = ("sep_conv_1x1", "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7",
           "dil_conv_3x3", "dil_conv_5x5", "dil_conv_7x7", "avg_pool_3x3")


def _kernel_size(expert: str) -> int:
    return int(expert[-1])


class Expert(Layer):
    """One operation of an MEFC step, up to its last 1x1 convolution.

    sep kxk: depthwise kxk -> 1x1 -> ReLU -> depthwise kxk -> 1x1.
    dil kxk: depthwise kxk with dilation 2 -> 1x1.
    avg 3x3: mean over the window, padding excluded from the count.

    Returns (z, kernel): the operation's output is `pointwise(z, kernel)`, or z itself
    where kernel is None (the average pool). MEFC folds these kernels into the step's
    fuse convolution rather than applying them. In sep 1x1 the depthwise 1x1
    convolutions are per-channel scales, folded into the 1x1 kernels after them.
    """

    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cf = self.channels_first
        c, k = x.shape[channel_axis(cf)], _kernel_size(self.kind)
        kw = self.options()
        if self.kind == "sep_conv_1x1":
            scale1, pw1, scale2, pw2 = (
                ConvKernel(c, name=name, **kw)(1 if name.startswith("dw") else c)[0, 0]
                for name in ("dw1", "pw1", "dw2", "pw2"))
            z = nn.relu(pointwise(x.astype(self.dtype), (scale1.T * pw1).astype(self.dtype), cf,
                                  self.precision))
            return z, scale2.T * pw2
        if self.kind.startswith("sep_conv"):
            x = DepthwiseConv(c, k, name="dw1", **kw)(x)
            x = nn.relu(Conv(c, 1, name="pw1", **kw)(x))
            z = DepthwiseConv(c, k, name="dw2", **kw)(x)
            return z, ConvKernel(c, name="pw2", **kw)(c)[0, 0]
        if self.kind.startswith("dil_conv"):
            z = DepthwiseConv(c, k, dilation=2, name="dw", **kw)(x)
            return z, ConvKernel(c, name="pw", **kw)(c)[0, 0]
        if self.kind == "avg_pool_3x3":
            return avg_pool_3x3(x, cf), None
        raise ValueError(f"unknown MEFC expert {self.kind!r}")


def avg_pool_3x3(x: jax.Array, channels_first: bool = False) -> jax.Array:
    """3x3 mean, stride 1, zero padding 1 excluded from the count (PyTorch's
    count_include_pad=False): separable shifted sums times the reciprocal count,
    a constant computed here rather than by XLA."""
    hax, wax = (2, 3) if channels_first else (1, 2)
    h, w = x.shape[hax], x.shape[wax]

    def box3(t: jax.Array, axis: int) -> jax.Array:
        n = t.shape[axis]
        pad = [(0, 0)] * t.ndim
        pad[axis] = (1, 1)
        tp = jnp.pad(t, pad)
        return sum(jax.lax.slice_in_dim(tp, i, i + n, axis=axis) for i in range(3))

    def counts(n: int) -> np.ndarray:
        c = np.full(n, 3.0)
        c[0] -= 1
        c[-1] -= 1
        return c

    if isinstance(h, int) and isinstance(w, int):
        inv = 1.0 / np.outer(counts(h), counts(w))
        inv = jnp.asarray(inv if channels_first else inv[:, :, None], x.dtype)
    else:  # symbolic sizes (a shape-polymorphic export): the counts are box sums of ones
        ones = jnp.ones((1, h, w) if channels_first else (h, w, 1), x.dtype)
        inv = 1.0 / box3(box3(ones, hax - 1), wax - 1)
    return box3(box3(x, hax), wax) * inv


class MEFC(Layer):
    """Router + 4 steps of 8 experts (checkpoint prefixes `encoder_level0.`, `refinement.`).

    The router maps the global average of x to softmax weights over the experts
    for each step; x = ReLU(1x1(x)); then per step
    x = ReLU(ReLU(1x1(concat_j w[:, s, j] * expert_j(x))) + x), computed with the
    experts' last 1x1 kernels folded into that 1x1 (`fold_expert_kernels`).
    """

    steps: int = 4
    recompute: bool = False  # each step runs again in the backward pass, keeping only its input

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cf = self.channels_first
        b, c = x.shape[0], x.shape[channel_axis(cf)]
        num_ops = len(EXPERTS)
        hidden = 2 * self.steps * num_ops
        # The router is tiny; it runs in at least float32 whatever the computation dtype.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        dense = dict(kernel_init=torch_default_init, param_dtype=self.param_dtype, dtype=acc,
                     precision=self.precision)
        y = jnp.mean(x.astype(acc), axis=(2, 3) if cf else (1, 2))
        y = nn.relu(nn.Dense(hidden, bias_init=torch_bias_init(c), name="router_fc1",
                             **dense)(y))
        y = nn.Dense(self.steps * num_ops, bias_init=torch_bias_init(hidden),
                     name="router_fc2", **dense)(y)
        weights = jax.nn.softmax(y.reshape(b, self.steps, num_ops), axis=-1)

        x = nn.relu(Conv(c, 1, name="preprocess", **self.options())(x))
        for s in range(self.steps):
            def step(mdl: MEFC, x: jax.Array, w: jax.Array, s: int = s) -> jax.Array:
                return mdl._step(x, w, s)

            x = (nn.remat(step) if self.recompute else step)(self, x, weights[:, s])
        return x

    def _step(self, x: jax.Array, weights: jax.Array, s: int) -> jax.Array:
        """Step s: x = ReLU(ReLU(fuse(experts(x))) + x), with router weights (N, E)."""
        cf, kw = self.channels_first, self.options()
        c = x.shape[channel_axis(cf)]
        zs, kernels = zip(*(Expert(kind, name=f"step_{s}_{kind}", **kw)(x)
                            for kind in EXPERTS), strict=True)
        fuse = ConvKernel(c, name=f"step_{s}_fuse", **kw)(len(EXPERTS) * c)[0, 0]
        acc = jnp.promote_types(self.dtype, jnp.float32)
        kernel = fold_expert_kernels(fuse, kernels, weights, acc).astype(self.dtype)
        # A sum of per-expert products rather than one product of the concatenated
        # experts: no E*C-channel buffer (the largest of the train step on GPUs).
        blocks = jnp.split(kernel, len(zs), axis=1)
        fused = sum(pointwise(z, k, cf, self.precision)
                    for z, k in zip(zs, blocks, strict=True))
        return nn.relu(nn.relu(fused) + x)


def fold_expert_kernels(fuse: jax.Array, kernels: tuple[jax.Array | None, ...],
                        weights: jax.Array, dtype: Any) -> jax.Array:
    """The (N, E C, C) kernel of a step's fuse convolution with expert j's last 1x1
    kernel K_j and router weight w[:, j] folded in.

    The step computes fuse(concat_j w_j pointwise(z_j, K_j)); all of it is linear in the
    z_j, so it equals sum_j pointwise(z_j, w_j K_j F_j) with F_j expert j's block of
    the fuse kernel (K_j = I for the average pool): E products of C x C kernels per
    image instead of 2E - 1, and no weighted copies. Folded in `dtype` (at least
    float32), HIGHEST precision.
    """
    blocks = jnp.split(fuse.astype(dtype), len(kernels), axis=0)
    folded = jnp.stack([f if k is None else
                        jnp.matmul(k.astype(dtype), f, precision=jax.lax.Precision.HIGHEST)
                        for k, f in zip(kernels, blocks, strict=True)])
    n, (e, c, d) = weights.shape[0], folded.shape
    return (weights.astype(dtype)[:, :, None, None] * folded).reshape(n, e * c, d)
