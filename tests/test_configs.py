"""Every shipped config loads and passes the trainer's checks."""

import importlib
from pathlib import Path

import pytest

from drsformer_jax.train.trainer import create_model, validate_config

NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
               if p.stem != "__init__")


@pytest.mark.parametrize("name", NAMES)
def test_config_is_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config)
    assert create_model(config).dim == config.dim


def test_fine_tuning_config_starts_from_weights_at_a_lower_rate():
    from configs import default, finetune

    config = finetune.get_config()
    assert config.init_from and config.learning_rate < default.get_config().learning_rate
    assert config.lr_constant_steps + config.lr_cosine_steps == config.num_train_steps
