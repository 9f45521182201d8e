"""Per-pixel LayerNorm over channels, as the release defines it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from drsformer_jax.convolution import channel_axis

LAYERNORM_TYPES = ("WithBias", "BiasFree")


class LayerNorm(nn.Module):
    """LayerNorm over the last (channel) axis with eps 1e-5 and biased variance.

    'WithBias': (x - mean) / sqrt(var + eps) * scale + bias.
    'BiasFree': x / sqrt(var + eps) * scale -- the variance is still taken about
    the mean, but the mean is not subtracted (the release's definition).
    Statistics are computed in float32 whatever the computation dtype.
    `channels_first`: NCHW input, normalised over axis 1.
    """

    kind: str = "WithBias"
    epsilon: float = 1e-5
    channels_first: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {self.kind!r}")
        axis = channel_axis(self.channels_first)
        c = x.shape[axis]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axis, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=axis, keepdims=True)
        inv = jax.lax.rsqrt(var + self.epsilon)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        shape = (c, 1, 1) if self.channels_first else (c,)
        scale = scale.astype(jnp.float32).reshape(shape)
        if self.kind == "BiasFree":
            y = x32 * inv * scale
        else:
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            y = (x32 - mean) * inv * scale + bias.astype(jnp.float32).reshape(shape)
        return y.astype(self.dtype)
