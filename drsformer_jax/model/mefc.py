"""Mixture-of-experts feature compensator (MEFC, the release's `subnet`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drsformer_jax.model.convolution import Conv, DepthwiseConv, Layer, channel_axis
from drsformer_jax.model.initializers import torch_bias_init, torch_default_init

# The eight experts, in the release's order (op index j in the checkpoint).
EXPERTS = ("sep_conv_1x1", "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7",
           "dil_conv_3x3", "dil_conv_5x5", "dil_conv_7x7", "avg_pool_3x3")


def _kernel_size(expert: str) -> int:
    return int(expert[-1])


class Expert(Layer):
    """One operation of an MEFC step; output has the input's shape.

    sep kxk: depthwise kxk -> 1x1 -> ReLU -> depthwise kxk -> 1x1.
    dil kxk: depthwise kxk with dilation 2 -> 1x1.
    avg 3x3: mean over the window, padding excluded from the count.
    """

    kind: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, k = x.shape[channel_axis(self.channels_first)], _kernel_size(self.kind)
        kw = self.options()
        if self.kind.startswith("sep_conv"):
            x = DepthwiseConv(c, k, name="dw1", **kw)(x)
            x = nn.relu(Conv(c, 1, name="pw1", **kw)(x))
            x = DepthwiseConv(c, k, name="dw2", **kw)(x)
            return Conv(c, 1, name="pw2", **kw)(x)
        if self.kind.startswith("dil_conv"):
            x = DepthwiseConv(c, k, dilation=2, name="dw", **kw)(x)
            return Conv(c, 1, name="pw", **kw)(x)
        if self.kind == "avg_pool_3x3":
            return avg_pool_3x3(x, self.channels_first)
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
    x = ReLU(ReLU(1x1(concat_j w[:, s, j] * expert_j(x))) + x).
    """

    steps: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cf = self.channels_first
        b, c = x.shape[0], x.shape[channel_axis(cf)]
        num_ops = len(EXPERTS)
        hidden = 2 * self.steps * num_ops
        # The router is tiny; it runs in at least float32 whatever the computation dtype.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        dense = dict(kernel_init=torch_default_init, param_dtype=self.param_dtype, dtype=acc)
        y = jnp.mean(x.astype(acc), axis=(2, 3) if cf else (1, 2))
        y = nn.relu(nn.Dense(hidden, bias_init=torch_bias_init(c), name="router_fc1",
                             **dense)(y))
        y = nn.Dense(self.steps * num_ops, bias_init=torch_bias_init(hidden),
                     name="router_fc2", **dense)(y)
        weights = jax.nn.softmax(y.reshape(b, self.steps, num_ops), axis=-1)

        kw = self.options()
        x = nn.relu(Conv(c, 1, name="preprocess", **kw)(x))
        for s in range(self.steps):
            outs = []
            for j, kind in enumerate(EXPERTS):
                e = Expert(kind, name=f"step_{s}_{kind}", **kw)(x)
                outs.append(e * weights[:, s, j, None, None, None].astype(e.dtype))
            fused = nn.relu(Conv(c, 1, name=f"step_{s}_fuse", **kw)(
                jnp.concatenate(outs, axis=channel_axis(cf))))
            x = nn.relu(fused + x)
        return x
