"""Softmax and L2 normalisation written so that XLA compiles them to the same bits
whatever the number of devices.

XLA's algebraic simplifier re-associates chains of divisions, such as
`(g / norm) / norm` in the gradient of `x / norm`, and it does so differently
in a program partitioned over several devices than in a single-device one.
Those last-bit differences in gradients are amplified by Adam in the release's
recipe (gradients clipped to norm 0.01 sit near Adam's eps) until a 4-device run
drifts 1e-3 away from a 1-device run within ten steps. Multiplying by a
reciprocal leaves the simplifier nothing to re-associate: with the ordered
gradient sum of `train.loss_and_grads`, training is then bitwise the same on 1
or 4 devices. Both functions equal the textbook forms to an ulp or so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """exp(x - max) * (1 / sum): `jax.nn.softmax`, as a product (entries may be -inf)."""
    shift = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(x - shift)
    return e * (1.0 / jnp.sum(e, axis=axis, keepdims=True))


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along `axis` (PyTorch's F.normalize), as x * rsqrt(...)."""
    sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))
