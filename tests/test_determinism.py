"""Determinism: the same inputs give the same bits whatever runs them: 1, 2 or 4 local workers (with 4 > 2
cores the workers are not pinned), the dask CLI cluster, a run resumed with another worker count, and the
in-process API `pipeline.kernel_gradients`.  Compared with np.array_equal and byte for byte on disk.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import (N_TASKS, assert_bit_identical, assert_complete, kgrad, read_result,  # noqa: E402
                              record, run_and_kill, run_args)

pytest_plugins = ["cluster_fixtures"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 4])
def test_same_bits_for_any_local_worker_count(job_inputs, undisturbed, tmp_path, workers):
    """The undisturbed run (2 workers) is the reference; 1 and 4 give the same bytes."""
    out = tmp_path / "out.zarr"
    result = kgrad(run_args(job_inputs.points, out, workers=workers))
    assert result.returncode == 0, result.stderr[-3000:]
    timings = assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)
    assert len(timings["worker_pids"]) <= workers
    compared = assert_bit_identical(out, undisturbed.out)
    record(f"same_bits_workers[{workers}]", bytes_compared=compared, seconds=timings["total_seconds"],
           worker_pids=len(timings["worker_pids"]))


@pytest.mark.slow
def test_same_bits_on_the_dask_cli_cluster(dask_cli_cluster, job_inputs, undisturbed, tmp_path):
    out = tmp_path / "out.zarr"
    result = kgrad(run_args(job_inputs.points, out, scheduler=dask_cli_cluster.scheduler_file))
    assert result.returncode == 0, result.stderr[-3000:]
    timings = assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)
    compared = assert_bit_identical(out, undisturbed.out)
    record("same_bits_dask_cli", bytes_compared=compared, seconds=timings["total_seconds"])


@pytest.mark.slow
def test_same_bits_after_resume_with_another_worker_count(job_inputs, undisturbed, tmp_path):
    """Killed on 1 worker (SIGKILL to the process group) after a third of the tasks; resumed on 4."""
    out = tmp_path / "out.zarr"
    killed = run_and_kill(run_args(job_inputs.points, out, workers=1), out,
                          lambda t, done: done is not None and done.sum() >= N_TASKS // 3)
    assert not killed.finished_first and N_TASKS // 3 <= killed.done < N_TASKS
    result = kgrad(run_args(job_inputs.points, out, "--resume", workers=4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete(out, tasks_run=N_TASKS - killed.done, tasks_skipped=killed.done)
    compared = assert_bit_identical(out, undisturbed.out)
    record("same_bits_after_resume_1_to_4_workers", faults_injected=1, runs_survived=1,
           tasks_done_before=killed.done, bytes_compared=compared)


@pytest.mark.slow
def test_in_process_api_equals_the_cli(job_inputs, undisturbed):
    """pipeline.kernel_gradients on the same array: same dtype, same bits as the CLI's output."""
    from pipeline import kernel_gradients

    g, v = kernel_gradients(job_inputs.array, kernel="rbf", lengthscale=0.5, dtype="float32", return_value=True)
    g_cli, v_cli = read_result(undisturbed.out)
    assert g.dtype == g_cli.dtype == np.float32 and v.dtype == v_cli.dtype == np.float32
    assert g.shape == g_cli.shape and v.shape == v_cli.shape
    assert np.array_equal(g, g_cli), f"{int((g != g_cli).any(1).sum())} rows differ"
    assert np.array_equal(v, v_cli), f"{int((v != v_cli).sum())} values differ"
    assert g.tobytes() == g_cli.tobytes() and v.tobytes() == v_cli.tobytes()
    record("api_equals_cli", bytes_compared=g.nbytes + v.nbytes)


@pytest.mark.slow
def test_repeated_runs_are_identical(job_inputs, undisturbed, tmp_path):
    """The same command twice on the same cluster size: same bytes (no run-to-run noise)."""
    out = tmp_path / "again.zarr"
    result = kgrad(run_args(job_inputs.points, out, workers=2))
    assert result.returncode == 0, result.stderr[-3000:]
    record("repeat_run", bytes_compared=assert_bit_identical(out, undisturbed.out))


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
