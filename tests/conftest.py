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
