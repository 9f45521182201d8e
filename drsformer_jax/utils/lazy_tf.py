"""The one place TensorFlow is imported (see the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any


@functools.cache
def import_tf() -> Any:
    """TensorFlow, imported on first use with GPUs and TPUs hidden from it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF only reads and augments images here; its oneDNN kernels would only add a banner.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        # RuntimeError / ValueError: TF was already started elsewhere, or no such type.
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], kind)
    return tf
