"""Shared test set-up: CPU only, compiled quickly and once per test worker, fixture paths."""

import os
from pathlib import Path

# Before JAX initialises: tests run on the CPU, as CI does.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite (and the processes it starts) compiles for speed of compilation: LLVM's
# optimisations off and XLA:CPU's older fusion emitters, which compile a small model's
# programs in about a third of the time; the tests check what the programs compute, not
# how fast. The test of the CPU compiler options asks for the users' compiler (users_cpu).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
     "--xla_cpu_use_fusion_emitters=false"]).strip()
USERS_CPU = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# The slowest files first: the workers (`-n 2 --dist loadfile`) take files in collection
# order, so the long ones start at once rather than last, when the other worker is idle.
SLOWEST_FILES = ("test_train.py", "test_train_parity.py", "test_full_model_step.py",
                 "test_model.py", "test_parity.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # xdist orders files by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files' order kept


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


@pytest.fixture
def users_cpu() -> dict:
    """Compiler options that undo the suite's XLA_FLAGS: XLA:CPU as users' programs get it."""
    return dict(USERS_CPU)
