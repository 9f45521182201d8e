"""PyTorch's default parameter initialisation, cheap to run on the host.

On XLA:CPU every `jax.random` draw (and every `fold_in`) compiles to its own
large program: initialising the ~900 DRSformer tensors under `jit` spends minutes
compiling. `init_params` therefore never runs
them: it takes the shapes from `jax.eval_shape` and samples every tensor with
NumPy by the same rules. The initialisers below are what the modules declare (and
what a plain `model.init` uses); they also sample on the host when the key is
concrete, which keeps an eager `model.init` tolerable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _host_seed(key: jax.Array) -> list[int] | None:
    """The key's bits as a NumPy seed, or None when the key is traced."""
    if isinstance(key, jax.core.Tracer):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).astype(np.uint64).ravel().tolist()


def uniform(bound: float) -> Any:
    """Initializer for U(-bound, bound)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        seed = _host_seed(key)
        if seed is None:
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        values = np.random.default_rng(seed).uniform(-bound, bound, size=tuple(shape))
        return jnp.asarray(values, dtype)

    return init


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """PyTorch's Conv2d / Linear weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).

    Kernels are HWIO or (in, out): fan_in is the product of all but the last axis.
    """
    fan_in = int(np.prod(shape[:-1]))
    return uniform(1.0 / max(fan_in, 1) ** 0.5)(key, shape, dtype)


def torch_bias_init(fan_in: int) -> Any:
    """PyTorch's Conv2d / Linear bias init: U(+-1/sqrt(fan_in)) of the layer's kernel."""
    return uniform(1.0 / max(fan_in, 1) ** 0.5)


def initial_value(path: tuple[str, ...], shapes: dict[tuple[str, ...], tuple[int, ...]],
                  rng: np.random.Generator) -> np.ndarray:
    """PyTorch's initial value for the DRSformer parameter at `path`."""
    leaf, parent, shape = path[-1], path[-2] if len(path) > 1 else "", shapes[path]
    if leaf in ("scale", "temperature"):
        return np.ones(shape, np.float32)
    if leaf.startswith("attn") and leaf[4:].isdigit():
        return np.full(shape, 0.2, np.float32)
    if leaf == "bias" and parent.startswith("norm"):
        return np.zeros(shape, np.float32)
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
    elif leaf == "bias":
        fan_in = int(np.prod(shapes[path[:-1] + ("kernel",)][:-1]))
    else:
        raise ValueError(f"no initialisation rule for parameter {'/'.join(path)}")
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)
