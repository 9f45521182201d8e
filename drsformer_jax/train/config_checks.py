"""Checks of a training config before anything is compiled or written.

Each raises `TrainingError` with one line naming the field and, where there is one,
the override that fixes it.
"""

from __future__ import annotations

from typing import Any

from drsformer_jax.evaluation import metrics
from drsformer_jax.model.drsformer import SIZE_MULTIPLE, DRSformer, model_config


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a bad configuration)."""


def validate_config(config: Any) -> None:
    """The training config's cheap checks, before anything is compiled or written."""
    positive = ("global_batch_size", "crop_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "lr_cosine_steps")
    problems = [f"{name} must be > 0, got {config[name]}" for name in positive
                if int(config[name]) <= 0]
    problems += [f"{name} must be >= 0, got {config[name]}"
                 for name in ("num_train_steps", "lr_constant_steps", "learning_rate",
                              "min_learning_rate", "weight_decay", "grad_clip_norm",
                              "cpu_devices")
                 if float(config[name]) < 0]
    if int(config.crop_size) % SIZE_MULTIPLE:
        problems.append(f"crop_size must be a multiple of {SIZE_MULTIPLE}, got "
                        f"{config.crop_size}")
    if str(config.eval_protocol) not in metrics.PROTOCOLS:
        problems.append(f"eval_protocol must be one of {', '.join(metrics.PROTOCOLS)}, got "
                        f"{config.eval_protocol!r}")
    if problems:
        raise TrainingError("config: " + "; ".join(problems))


def architecture_mismatch(recorded: dict[str, Any], model: DRSformer) -> str | None:
    """None when a checkpoint's model config is `model`'s; else which fields differ,
    with the command-line overrides that would make them equal."""
    mine = model_config(model)
    differ = [k for k in mine if k in recorded and _normal(recorded[k]) != _normal(mine[k])]
    differ += [k for k in recorded if k not in mine]
    if not differ:
        return None
    had = ", ".join(f"{k}={_normal(recorded.get(k))}" for k in differ)
    now = ", ".join(f"{k}={_normal(mine.get(k))}" for k in differ)
    fix = " ".join(f"--config.{k}={_flag(recorded[k])}" for k in differ if k in mine)
    return f"{had} (this config: {now}); to match it, add {fix}"


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _flag(value: Any) -> str:
    return f"({','.join(str(v) for v in value)})" if isinstance(value, list | tuple) else str(
        value)


def check_batch_splits(config: Any, devices: int) -> None:
    """TrainingError unless the global batch is a multiple of the device count; it names
    the smallest batch that is and the learning rate scaled with it (the linear rule)."""
    batch = int(config.global_batch_size)
    if batch % devices == 0:
        return
    valid = -(-batch // devices) * devices
    lr = float(config.learning_rate) * valid / batch
    raise TrainingError(
        f"global_batch_size {batch} does not split over the {devices} devices: the smallest "
        f"that does is --config.global_batch_size={valid}; with the usual linear scaling "
        f"of the learning rate, --config.learning_rate={lr:.3g}")
