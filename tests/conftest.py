import os
from collections import Counter

import pytest

os.environ.setdefault("KGRAD_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


@pytest.hookimpl(tryfirst=True)  # before `-m slow` selects: the sampled-out cases are marked slow
def pytest_collection_modifyitems(config, items):
    """Without --runslow: skip the tests marked ``slow``, and of a test marked ``sampled(every)`` run only a sample
    of its parametrised cases: a case runs if it brings a value of one of its parameters that no earlier kept
    case brought, or while fewer than 1/every of the cases so far are kept (so each kernel, dtype, layout... is
    run at least once, and at least 1/every of the product). ``sampled(every, cover=(names))`` asks that only the
    named parameters' values all run. The selection depends on the collected order only: the same cases each run.
    With --runslow the sampled-out cases run too, marked ``slow`` (so that ``-m slow --runslow`` runs just what the
    default suite leaves out)."""
    runslow = config.getoption("--runslow")
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    sampled_out = pytest.mark.skip(reason="sampled out of the default suite: run with --runslow")
    seen: dict[tuple, set] = {}  # per test: the (parameter, value) pairs of the cases kept so far
    cases, kept_cases = Counter(), Counter()  # per test: its cases so far, and those kept
    for item in items:
        if "slow" in item.keywords:
            if not runslow:
                item.add_marker(skip)
            continue
        marker = item.get_closest_marker("sampled")
        if marker is None or not hasattr(item, "callspec"):
            continue
        every = marker.args[0] if marker.args else marker.kwargs.get("every", 3)
        key = (item.path, item.originalname)
        cover = marker.kwargs.get("cover")  # the parameters whose every value runs (default: all of them)
        values = {(name, repr(value)) for name, value in item.callspec.params.items()
                  if cover is None or name in cover}
        kept = seen.setdefault(key, set())
        cases[key] += 1
        if values - kept or kept_cases[key] * every < cases[key]:
            kept.update(values)
            kept_cases[key] += 1
        else:
            item.add_marker(pytest.mark.slow if runslow else sampled_out)


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache():
    """The test process compiles many tiles in process (pipeline.kernel_gradients): let it use JAX's persistent
    cache at KGRAD_CACHE_DIR as kgrad's workers do, so that a later session loads them instead of compiling.
    (Without this the cache was switched on part way through, by the first test that calls run_task.)"""
    from pipeline.cache import enable_compilation_cache

    enable_compilation_cache()
