"""Determinism of the in-process API across its threads: one query block per core at a time, 1 or 4 threads give
the same bits, a caller's per-thread x64 switch holds in every block, an error in one block is raised.

The same bits across executors (in process, kgrad's local cluster with 1, 2 or 4 workers, the dask CLI cluster),
for every computation method, and after a resume with another worker count: test_guarantees.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest


@pytest.mark.parametrize("kernel", ["rbf", "matern32", "periodic"])
def test_in_process_api_same_bits_on_one_thread_or_several(kernel, monkeypatch):
    """kernel_gradients runs one query block per core at a time; 1 or 4 threads give the same bits."""
    from pipeline import api, kernel_gradients

    rng = np.random.default_rng(5)
    points = rng.normal(size=(3000, 3))  # several query blocks (1024 rows; 128 for the generic path)
    results = {}
    for cores in (1, 4):
        monkeypatch.setattr(api, "usable_cores", lambda cores=cores: cores)
        results[cores] = kernel_gradients(points, kernel=kernel, lengthscale=0.7, return_value=True)
    for a, b in zip(results[1], results[4]):
        assert a.tobytes() == b.tobytes()


def test_in_process_api_threads_follow_a_callers_per_thread_x64(monkeypatch):
    """Inside ``with jax.enable_x64(True)`` (a per-thread switch) float64 stays float64 in every block."""
    import jax

    from pipeline import api, kernel_gradients
    from reference import reference_gradients, relative_error

    monkeypatch.setattr(api, "usable_cores", lambda: 4)
    points = np.random.default_rng(6).normal(size=(2100, 3))
    ref, _ = reference_gradients(points, None, None, "rbf", 1.0, 1.0)
    with jax.enable_x64(True):
        g = kernel_gradients(points, dtype="float64")
    assert g.dtype == np.float64 and relative_error(g, ref) < 1e-12


def test_in_process_api_error_in_one_block_is_raised(monkeypatch):
    """A failing block raises in the caller; blocks not yet started are cancelled."""
    from pipeline import api, blocks, kernel_gradients

    calls = []

    def failing(queries, *args, **kwargs):
        calls.append(len(queries))
        time.sleep(0.05)
        raise RuntimeError("block failed")

    monkeypatch.setattr(api, "usable_cores", lambda: 2)
    monkeypatch.setattr(blocks, "block_sums", failing)
    with pytest.raises(RuntimeError, match="block failed"):
        kernel_gradients(np.zeros((64 * 1024, 3)))
    assert 1 <= len(calls) < 64
