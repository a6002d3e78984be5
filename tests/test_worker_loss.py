"""Worker loss on a real dask cluster (cluster/start-local-cluster.sh: a `dask scheduler` and a
`dask worker --nworkers 2` whose nannies restart a killed worker process).  A worker process killed with
SIGKILL in mid-run costs its task a rerun elsewhere; the run still exits 0 with the same bits.  A task
that runs twice (a rerun after a lost worker, or a duplicate) writes the same bytes.
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
from cluster_fixtures import (N_TASKS, assert_bit_identical, assert_complete, assert_no_leftovers,  # noqa: E402
                              count_done, group_members, kgrad, kill_group, poll, read_streams,
                              record, run_and_kill, run_args, start_kgrad)

pytest_plugins = ["cluster_fixtures"]


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def _restarted(client, killed_pid: int) -> bool:
    """Two workers again, none of them the killed process (a broadcast may still hit the dead one)."""
    try:
        pids = client.run(os.getpid, on_error="ignore")
    except Exception:
        return False
    return len(pids) == 2 and killed_pid not in pids.values()


def _busy_worker(client) -> str | None:
    """Address of a worker that holds a kgrad task (running or queued on it), if any."""
    for address, keys in client.processing().items():
        if any("kgrad-" in str(k) for k in keys):
            return address
    return None


@pytest.mark.slow
@pytest.mark.parametrize("kills", [1, 2])
def test_worker_killed_in_mid_run(dask_cli_cluster, job_inputs, undisturbed, tmp_path, kills):
    """SIGKILL a busy worker process `kills` times (after the nanny has restarted the previous one) while
    `kgrad run --scheduler FILE` runs; the run exits 0 and its output is bit-identical."""
    out = tmp_path / "out.zarr"
    with dask_cli_cluster.client() as client:
        client.wait_for_workers(2, timeout=60)
        pids = _worker_pids(client)
        assert set(pids.values()) <= set(group_members(dask_cli_cluster.worker_pgid)), "not the CLI's workers"
        proc = start_kgrad(run_args(job_inputs.points, out, scheduler=dask_cli_cluster.scheduler_file))
        victims, done_at_kill = [], []
        try:
            for k in range(kills):
                goal = 2 + 4 * k
                poll(lambda: count_done(out) >= goal or proc.poll() is not None, timeout=180,
                     what=f"{goal} tasks done")
                assert proc.poll() is None, "the run finished before the kill; use a larger KGRAD_RELIABILITY_N"
                address = poll(lambda: _busy_worker(client), timeout=30, what="a busy worker")
                pid = _worker_pids(client)[address]
                done_at_kill.append(count_done(out))
                os.kill(pid, signal.SIGKILL)
                victims.append(pid)
                # the nanny notices and starts a fresh worker process
                poll(lambda: _restarted(client, pid), timeout=60, interval=0.2,
                     what="the nanny to restart the worker")
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        assert_no_leftovers(proc)
        stderr = read_streams(proc)[1]
        assert proc.returncode == 0, stderr[-4000:]
        assert done_at_kill[-1] < N_TASKS
        pids_after = _worker_pids(client)
    assert not set(victims) & set(pids_after.values())
    timings = assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)
    compared = assert_bit_identical(out, undisturbed.out)
    record(f"worker_killed[{kills}]", faults_injected=kills, runs_survived=1, victims=victims,
           tasks_done_at_kills=done_at_kill, worker_pids_with_results=timings["worker_pids"],
           bytes_compared=compared, seconds=timings["total_seconds"],
           execute_seconds=timings["execute_seconds"], connect_seconds=timings["cluster_start_seconds"],
           stderr_tail=stderr.strip().splitlines()[-3:] if timings["total_seconds"] > 20 else None)


@pytest.mark.slow
def test_client_killed_then_resumed_on_the_same_cluster(dask_cli_cluster, job_inputs, undisturbed, tmp_path):
    """SIGKILL the `kgrad run --scheduler FILE` process (the client; the cluster lives on, and tasks that
    were running on it finish and write after the client is gone), then resume at once on the same
    cluster: exit 0, every task counted once (skipped or run), the same bits."""
    out = tmp_path / "out.zarr"
    killed = run_and_kill(run_args(job_inputs.points, out, scheduler=dask_cli_cluster.scheduler_file), out,
                          lambda t, done: done is not None and done.sum() >= 3)
    assert not killed.finished_first and 3 <= killed.done < N_TASKS
    assert killed.processes_killed == 1, "only the client: the cluster runs in its own process groups"
    result = kgrad(run_args(job_inputs.points, out, "--resume", scheduler=dask_cli_cluster.scheduler_file))
    assert result.returncode == 0, result.stderr[-3000:]
    timings = assert_complete(out)
    assert timings["tasks_skipped"] >= killed.done
    assert timings["tasks_skipped"] + timings["tasks_run"] == N_TASKS
    compared = assert_bit_identical(out, undisturbed.out)
    with dask_cli_cluster.client() as client:
        assert len(client.scheduler_info()["workers"]) == 2
    record("client_killed_resumed_on_cluster", faults_injected=1, runs_survived=1,
           tasks_done_at_kill=killed.done, tasks_skipped=timings["tasks_skipped"],
           tasks_rerun=timings["tasks_run"], bytes_compared=compared)


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
