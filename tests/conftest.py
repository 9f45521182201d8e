"""Shared test set-up: CPU only, compiled quickly and once per test worker, fixture paths."""

import os
from pathlib import Path

# Before JAX initialises: tests run on the CPU, as CI does.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# LLVM's optimisations off for the suite (and the processes it starts): a small model's
# programs compile in about half the time, and the tests check what the programs compute,
# not how fast. Tests of optimised code (fast math, the full model's step) ask for level 3.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

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


# Programs that compile faster than this are not kept: loading one costs more than that.
MIN_COMPILE_S = 1.0


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> Path:
    """This worker's persistent compilation cache, also the one of the processes its tests
    start: a program another test already compiled (same computation, shapes, options) is
    loaded instead of compiled again. Derain's default folder points there too."""
    folder = tmp_path_factory.getbasetemp() / "jax_cache"
    from drsformer_jax.inference.cache import CACHE_ENV

    os.environ.update({"JAX_COMPILATION_CACHE_DIR": str(folder), CACHE_ENV: str(folder),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_S),
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return folder


@pytest.fixture(autouse=True)
def _cache_on(compilation_cache):
    """Each test starts with the worker's cache on (a test before may have switched it)."""
    import jax

    from drsformer_jax.inference.cache import enable_compilation_cache

    if jax.config.jax_compilation_cache_dir != str(compilation_cache):
        enable_compilation_cache(compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
