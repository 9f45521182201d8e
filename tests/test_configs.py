"""Every shipped config loads and passes the trainer's checks."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drsformer_jax.train.config_checks import validate_config
from drsformer_jax.train.trainer import create_model

NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
               if p.stem != "__init__")


@pytest.mark.parametrize("name", NAMES)
def test_config_is_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    validate_config(config)
    assert create_model(config).dim == config.dim


def test_cpu_devices_is_applied_before_jax_starts_and_checked():
    from configs import synthetic

    root = Path(__file__).resolve().parents[1]
    # main.use_cpu_devices in a fresh process: JAX then has the config's CPU devices.
    code = ("import main; from configs import synthetic; import jax; "
            "main.use_cpu_devices(synthetic.get_config()); print(jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(synthetic.get_config().cpu_devices) == "2"
    config = synthetic.get_config()
    config.cpu_devices = -1
    with pytest.raises(Exception, match="cpu_devices must be >= 0"):
        validate_config(config)
