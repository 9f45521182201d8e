"""DRSformer (CVPR 2023) image deraining in JAX / Flax.

    model, variables = drsformer_jax.load("converted/")
    restored = model.apply(variables, rainy)   # NHWC float32 in [0, 1]

Submodules are imported lazily so that `import drsformer_jax` stays cheap and
never pulls in TensorFlow (only the input pipeline uses it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DRSformer": ("drsformer_jax.models", "DRSformer"),
    "load": ("drsformer_jax.checkpoint", "load"),
    "save": ("drsformer_jax.checkpoint", "save"),
}

__all__ = ["DRSformer", "load", "save", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'drsformer_jax' has no attribute {name!r}")
