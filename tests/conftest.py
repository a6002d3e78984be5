import os

import pytest

os.environ.setdefault("KGRAD_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache():
    """The test process compiles many tiles in process (pipeline.kernel_gradients): let it use JAX's persistent
    cache at KGRAD_CACHE_DIR as kgrad's workers do, so that a later session loads them instead of compiling.
    (Without this the cache was switched on part way through, by the first test that calls run_task.)"""
    from pipeline.cache import enable_compilation_cache

    enable_compilation_cache()
