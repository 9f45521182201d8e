"""Mixed-scale feed-forward network (MSFN)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from drsformer_jax.model.convolution import (
    Conv,
    DepthwiseConv,
    GroupedConv,
    Layer,
    channel_axis,
)


def hidden_features(dim: int, ffn_expansion_factor: float) -> int:
    """The release's hidden width: Python int() of dim * factor (48 * 2.66 -> 127)."""
    return int(dim * ffn_expansion_factor)


class MixedScaleFeedForward(Layer):
    """MSFN of the release (checkpoint prefix `ffn.`).

    project_in to 2h channels; depthwise 3x3 and 5x5 branches (ReLU); each branch
    split in halves (a, b); x1 = ReLU(grouped 3x3 over [a3, a5]),
    x2 = ReLU(grouped 5x5 over [b3, b5]), where the grouped convs have h groups of
    two consecutive input channels -- with h odd, one group reads the last
    channel of a3 and the first of a5, which is what the weights were trained
    with; project_out on [x1, x2].

    `recompute`: project_in and the branches (everything before project_out) run
    again in the backward pass instead of keeping their activations, so that only
    the input and [x1, x2] are kept: dim + 2h channels instead of about 10h.
    """

    dim: int
    ffn_expansion_factor: float = 2.66
    use_bias: bool = False
    recompute: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = (nn.remat(MixedScaleFeedForward._expand) if self.recompute
             else MixedScaleFeedForward._expand)(self, x)
        return Conv(self.dim, 1, name="project_out", **self._conv_options())(x)

    def _conv_options(self) -> dict:
        return dict(use_bias=self.use_bias, **self.options())

    def _expand(self, x: jax.Array) -> jax.Array:
        """The input (dim channels) -> project_in (2h) -> [x1, x2] (2h channels)."""
        h, kw = hidden_features(self.dim, self.ffn_expansion_factor), self._conv_options()
        cax = channel_axis(self.channels_first)
        x = Conv(2 * h, 1, name="project_in", **kw)(x)
        d3 = nn.relu(DepthwiseConv(2 * h, 3, name="dwconv3x3", **kw)(x))
        d5 = nn.relu(DepthwiseConv(2 * h, 5, name="dwconv5x5", **kw)(x))
        a3, b3 = jnp.split(d3, 2, axis=cax)
        a5, b5 = jnp.split(d5, 2, axis=cax)
        x1 = GroupedConv(h, 3, inputs_per_group=2, name="dwconv3x3_1",
                         **kw)(jnp.concatenate([a3, a5], axis=cax))
        x2 = GroupedConv(h, 5, inputs_per_group=2, name="dwconv5x5_1",
                         **kw)(jnp.concatenate([b3, b5], axis=cax))
        return jnp.concatenate([nn.relu(x1), nn.relu(x2)], axis=cax)
