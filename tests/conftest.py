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
    _check_cluster_modules(items)


# The test modules that use the session's dask CLI cluster (cluster_fixtures.dask_cli_cluster; the method x
# executor tests of methods.py ask for it by name): under pytest-xdist they all run in one test process, so that
# the cluster is started once, not once per process (pytest_xdist_make_scheduler).
DASK_CLI_CLUSTER_MODULES = {"test_cli.py", "test_dashboard.py", "test_guarantees.py", "test_local_cluster_security.py",
                            "test_loopback.py", "test_pruning_cli.py", "test_readme.py", "test_worker_loss.py"}


def _check_cluster_modules(items) -> None:
    """Keep DASK_CLI_CLUSTER_MODULES true: a module that uses the cluster and is not listed is an error."""
    uses = {item.path.name for item in items if "dask_cli_cluster" in getattr(item, "fixturenames", ())
            or "methods" in getattr(getattr(item, "module", None), "pytest_plugins", ())}
    if uses - DASK_CLI_CLUSTER_MODULES:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(uses - DASK_CLI_CLUSTER_MODULES)} to "
                                f"DASK_CLI_CLUSTER_MODULES (they use the dask CLI cluster)")


def pytest_xdist_make_scheduler(config, log):
    """Each test module in one test process (its module fixtures made once, as ``--dist loadfile``), the modules
    of DASK_CLI_CLUSTER_MODULES all in the same one."""
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "dask-cli-cluster" if os.path.basename(path) in DASK_CLI_CLUSTER_MODULES else path

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _persistent_compilation_cache():
    """The test process compiles many tiles in process (pipeline.kernel_gradients): let it use JAX's persistent
    cache at KGRAD_CACHE_DIR as kgrad's workers do, so that a later session loads them instead of compiling.
    (Without this the cache was switched on part way through, by the first test that calls run_task.)"""
    from pipeline.cache import enable_compilation_cache

    enable_compilation_cache()
