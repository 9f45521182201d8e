"""Shared test set-up: CPU only, float32 matmuls at full precision, fixture paths."""

import os
from pathlib import Path

# Before JAX initialises: tests run on the CPU, as CI does.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def x64():
    """JAX's x64 mode on for one test, then restored."""
    import jax  # after JAX_PLATFORMS is set above

    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
