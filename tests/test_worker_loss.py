"""Worker loss, the situations of one method or one cluster: a task that runs twice (a rerun after a lost
worker, or a duplicate) writes the same bytes; relative paths with an external scheduler; the dask CLI cluster
of cluster_fixtures.py (cluster/start-local-cluster.sh: a `dask scheduler` and a `dask worker --nworkers 2`
whose nannies restart a killed worker process) is what the tests take it for.

A worker process SIGKILLed in mid-run (once or twice; kgrad's own local cluster or the dask CLI cluster), and the
client killed and resumed at once on the same cluster, for every computation method: test_guarantees.py (the
kill loop: faults.run_with_worker_kills).
"""

from __future__ import annotations

import os
import signal
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.cluster import WORKER_ENVIRONMENT

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import (assert_bit_identical, group_members, kgrad, record,  # noqa: E402
                              run_args)

pytest_plugins = ["cluster_fixtures"]


@pytest.fixture
def prepared_output(job_inputs, tmp_path):
    """The standard job prepared in this process, its output and sorted copy created as a run would, and
    the job its tasks get."""
    import dataclasses

    import run_steps
    from pipeline.workflow import RunConfig, prepare

    out = tmp_path / "out.zarr"
    prepared = prepare(RunConfig(points=str(job_inputs.points), out=str(out), lengthscale=0.5,
                                 rows_per_task=2048, workers=2))
    return dataclasses.replace(prepared, job=run_steps.start(prepared)), out


def _task_files(out, index: int) -> dict[str, bytes]:
    """The chunk files one task writes (its sorted results, in the run's sorted copy)."""
    names = (f"order/gradient/c/{index}/0", f"order/value/c/{index}")
    return {name: (out / name).read_bytes() for name in names if (out / name).is_file()}


@pytest.mark.slow  # its fixture is a whole 50000-point run; the default suite kills a worker in test_guarantees.py
def test_task_run_twice_writes_same_bytes(prepared_output, undisturbed):
    """run_task twice (a rerun after a lost worker): the chunk files are rewritten (new inodes) with the
    same bytes; with every other task run and the results put back in input order, the output is the
    CLI run's, bit for bit."""
    from pipeline.methods.dense import DENSE

    prepared, out = prepared_output
    tasks = [prepared.plan.tasks[1], prepared.plan.tasks[-1]]  # a whole chunk and the ragged last one
    first, inodes = {}, {}
    for task in tasks:
        DENSE.run_task(prepared.job, task)
        first[task.index] = _task_files(out, task.index)
        assert len(first[task.index]) == 2
        inodes[task.index] = {k: os.stat(out / k).st_ino for k in first[task.index]}
    time.sleep(0.01)
    compared = 0
    for task in tasks:
        DENSE.run_task(prepared.job, task)
        again = _task_files(out, task.index)
        assert again == first[task.index], f"task {task.index} wrote different bytes the second time"
        assert all(os.stat(out / k).st_ino != inodes[task.index][k] for k in again), "not rewritten"
        compared += 2 * sum(len(b) for b in again.values())
    import run_steps

    for task in prepared.plan.tasks:
        if task not in tasks:
            DENSE.run_task(prepared.job, task)
    run_steps.finish(prepared, prepared.job)
    compared += assert_bit_identical(out, undisturbed.out)
    record("task_run_twice", tasks=[t.index for t in tasks], bytes_compared=compared)


@pytest.mark.slow  # as above
def test_task_run_concurrently_twice_writes_same_bytes(prepared_output, undisturbed):
    """Two copies of one task writing at the same time (a duplicate while the first still runs) leave
    one whole, correct chunk: each chunk file is replaced atomically."""
    from pipeline.methods.dense import DENSE

    prepared, out = prepared_output
    task = prepared.plan.tasks[2]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: DENSE.run_task(prepared.job, task), range(2)))
    assert [r["index"] for r in results] == [task.index] * 2
    files = _task_files(out, task.index)
    assert len(files) == 2
    DENSE.run_task(prepared.job, task)
    assert _task_files(out, task.index) == files, "a duplicate left other bytes than a single run"
    from pipeline.output import OutputGroup

    assert DENSE.done_tasks(OutputGroup(str(out)), prepared.job.fingerprint, prepared.plan).sum() == 1


@pytest.mark.slow
def test_relative_paths_with_an_external_scheduler(dask_cli_cluster, job_inputs, undisturbed, tmp_path):
    """`kgrad run --points rel.npy --out rel.zarr --scheduler FILE` run from a directory other than the
    one the workers were started in: the paths mean what they mean to the user (the client's cwd).
    (Regression: workers used to resolve them in their own working directory, exit 2, output left behind.)"""
    shutil.copyfile(job_inputs.points, tmp_path / "points.npy")
    args = run_args("points.npy", "out.zarr", scheduler=dask_cli_cluster.scheduler_file)
    result = kgrad(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bit_identical(tmp_path / "out.zarr", undisturbed.out)


def test_dask_cli_cluster_fixture_is_real(dask_cli_cluster):
    """The fixture's cluster: a scheduler and 2 single-threaded workers on loopback, in their own process
    groups, with kgrad's worker environment (the malloc thresholds raised) in the worker processes."""
    with dask_cli_cluster.client() as client:
        info = client.scheduler_info()
        assert info["address"].startswith("tls://127.0.0.1:")  # TLS only (start-local-cluster.sh)
        workers = info["workers"]
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
        assert all(a.startswith("tls://127.0.0.1:") for a in workers)
        env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENVIRONMENT})
        pids = client.run(os.getpid)
    assert env and all(e == WORKER_ENVIRONMENT for e in env.values()), env
    assert set(pids.values()) <= set(group_members(dask_cli_cluster.worker_pgid))
    assert dask_cli_cluster.scheduler_pid in group_members(dask_cli_cluster.scheduler_pid)


@pytest.mark.slow
def test_start_and_stop_scripts(tmp_path):
    """start-local-cluster.sh returns once the workers are connected; stop-local-cluster.sh leaves no
    process of either group behind, also when a worker process was SIGKILLed meanwhile."""
    from cluster_fixtures import start_cluster, stop_cluster

    cluster = start_cluster(tmp_path / "state", 1)
    groups = [cluster.scheduler_pid, cluster.worker_pgid]
    try:
        assert cluster.scheduler_file.exists()
        with cluster.client() as client:
            assert len(client.scheduler_info()["workers"]) == 1
            victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
    finally:
        stop_cluster(cluster)
    assert all(not group_members(g) for g in groups)
    assert not (tmp_path / "state" / "scheduler.pid").exists()
    assert np.all([not (tmp_path / "state" / n).exists() for n in ("worker.pid", "scheduler.json")])
