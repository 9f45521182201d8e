"""Per-pixel LayerNorm over channels, as the release defines it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from drsformer_jax.model.convolution import Layer, channel_axis

LAYERNORM_TYPES = ("WithBias", "BiasFree")


def channel_mean(x: jax.Array, channels_first: bool) -> jax.Array:
    """Mean over the channel axis, kept as a size-1 axis.

    Channels first, a (1 x C) by (C x H*W) product with 1/C: XLA:CPU reduces over a
    non-minor axis much more slowly than it runs that matrix-vector product.
    HIGHEST precision: TPUs would otherwise round the float32 operands to bfloat16.
    """
    if not channels_first:
        return jnp.mean(x, axis=-1, keepdims=True)
    n, c, h, w = x.shape
    weights = jnp.full((n, 1, c), 1.0 / c, x.dtype)
    mean = jax.lax.dot_general(weights, x.reshape(n, c, h * w), (((2,), (1,)), ((0,), (0,))),
                               precision=jax.lax.Precision.HIGHEST)
    return mean.reshape(n, 1, h, w)


class LayerNorm(Layer):
    """LayerNorm over the channel axis of each pixel, eps 1e-5, biased variance.

    'WithBias': (x - mean) / sqrt(var + eps) * scale + bias.
    'BiasFree': x / sqrt(var + eps) * scale -- the variance is still taken about
    the mean, but the mean is not subtracted (the release's definition).
    Statistics are computed in at least float32 (float64 stays float64).
    The channel axis is the last (NHWC), or axis 1 with `channels_first` (NCHW);
    scale and bias are (C,) either way. `recompute`: the backward pass keeps only the
    input (in the computation dtype) and normalises it again, rather than keeping the
    float32 intermediates.
    """

    kind: str = "WithBias"
    epsilon: float = 1e-5
    recompute: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {self.kind!r}")
        c = x.shape[channel_axis(self.channels_first)]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = (None if self.kind == "BiasFree" else
                self.param("bias", nn.initializers.zeros, (c,), self.param_dtype))
        normalize = jax.checkpoint(self._normalize) if self.recompute else self._normalize
        return normalize(x, scale, bias)

    def _normalize(self, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
        acc = jnp.promote_types(self.dtype, jnp.float32)
        x32 = x.astype(acc)
        mean = channel_mean(x32, self.channels_first)
        var = channel_mean(jnp.square(x32 - mean), self.channels_first)
        inv = jax.lax.rsqrt(var + self.epsilon)
        shape = (-1, 1, 1) if self.channels_first else (-1,)
        scale = scale.astype(acc).reshape(shape)
        if bias is None:
            y = x32 * inv * scale
        else:
            y = (x32 - mean) * inv * scale + bias.astype(acc).reshape(shape)
        return y.astype(self.dtype)
