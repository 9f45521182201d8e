"""Training: state, optimizer and step (`trainer`), the loop (`loop`), metric logging."""

from drsformer_jax.train.loop import train_and_evaluate
from drsformer_jax.train.trainer import (
    CompiledStep,
    TrainingError,
    TrainState,
    create_learning_rate_fn,
    create_model,
    create_optimizer,
    create_train_state,
    make_train_step,
    train_step,
)

__all__ = ["CompiledStep", "TrainState", "TrainingError", "create_learning_rate_fn",
           "create_model", "create_optimizer", "create_train_state", "make_train_step",
           "train_and_evaluate", "train_step"]
