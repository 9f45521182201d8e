"""Training: state, optimizer and step (`trainer`), the loop (`loop`), metric logging.

`train_and_evaluate` is imported on first use: the train step (`trainer`) imports
without the input pipeline, ml-collections or TensorFlow (GPU benchmark hosts).
"""

from __future__ import annotations

import importlib
from typing import Any

from drsformer_jax.train.trainer import (
    CompiledStep,
    TrainingError,
    TrainState,
    create_learning_rate_fn,
    create_model,
    create_optimizer,
    create_train_state,
    make_train_step,
    train_compiler_options,
    train_step,
)

__all__ = ["CompiledStep", "TrainState", "TrainingError", "create_learning_rate_fn",
           "create_model", "create_optimizer", "create_train_state", "make_train_step",
           "train_and_evaluate", "train_compiler_options", "train_step"]


def __getattr__(name: str) -> Any:
    if name == "train_and_evaluate":
        return importlib.import_module("drsformer_jax.train.loop").train_and_evaluate
    raise AttributeError(f"module 'drsformer_jax.train' has no attribute {name!r}")
