"""Fault injection in one place: kill a `kgrad run` (SIGKILL to its process group) at a moment, or kill worker
processes under it (of kgrad's own local cluster, or of a dask CLI cluster) while it runs.

The process helpers (start_kgrad, kill_group, poll, run_and_kill, ...) are those of cluster_fixtures.py; this
module adds what the guarantee tests (test_guarantees.py) and the method-specific tests share.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import (RUN_TIMEOUT, assert_no_leftovers, group_members, kill_group, poll,  # noqa: E402
                              read_streams, start_kgrad)

Progress = Callable[[object], "np.ndarray | None"]  # output path -> the run's task flags (None: not there yet)


def tasks_done(progress: Progress, out) -> int:
    flags = progress(out)
    return 0 if flags is None else int(flags.sum())


# ------------------------------------------------------------------------------------------ worker processes


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def local_worker_pids(kgrad_pid: int) -> list[int]:
    """The worker processes of a `kgrad run`'s own local cluster: its children started by its nannies
    (multiprocessing spawn; not the resource tracker), live ones only."""
    pids = []
    for pid in group_members(kgrad_pid):
        fields = _stat(pid)
        if fields and int(fields[1]) == kgrad_pid and "spawn_main" in _cmdline(pid):
            pids.append(pid)
    return sorted(pids)


def cluster_worker_pids(client) -> dict[str, int]:
    """address -> pid of each worker of a dask cluster (a worker that is restarting may be missing)."""
    return client.run(os.getpid, on_error="ignore")


def busy_cluster_worker(client) -> str | None:
    """Address of a worker that holds a kgrad task (running or queued on it), if any."""
    for address, keys in client.processing().items():
        if any("kgrad-" in str(k) for k in keys):
            return address
    return None


def cluster_restored(client, n_workers: int, killed: set[int]) -> bool:
    """``n_workers`` workers again, none of them a killed process (a broadcast may still hit a dead one)."""
    try:
        pids = client.run(os.getpid, on_error="ignore")
    except Exception:  # noqa: BLE001 - the cluster is busy replacing a worker
        return False
    return len(pids) == n_workers and not killed & set(pids.values())


@dataclass
class WorkerKills:
    """What :func:`run_with_worker_kills` did."""

    victims: list[int] = field(default_factory=list)  # the worker pids killed, in order
    done_at_kills: list[int] = field(default_factory=list)  # tasks done at each kill
    returncode: int | None = None
    stderr: str = ""


def run_with_worker_kills(args, out, progress: Progress, *, kills: int = 1, cluster=None, first_after: int = 2,
                          rng: random.Random | None = None, timeout: float = RUN_TIMEOUT) -> WorkerKills:
    """Start `kgrad ARGS` and SIGKILL a worker process ``kills`` times while it runs: the first once
    ``first_after`` tasks are done (``progress``), each next once one more task is done.

    ``cluster``: a :class:`cluster_fixtures.DaskCluster` the run uses (``--scheduler FILE``): a busy worker of
    it is killed (its nanny restarts it), and this returns once the cluster has all its workers back.  Without
    it the run uses its own local cluster, and one of that cluster's worker processes is killed.

    The run must still be running at each kill (else AssertionError: the job is too small to be hit);
    it is waited for to the end (nothing of it may outlive it)."""
    rng = rng or random.Random(0)
    result = WorkerKills()
    client = None
    if cluster is not None:
        client = cluster.client()
        client.wait_for_workers(cluster.nworkers, timeout=60)
    try:
        proc = start_kgrad(args)
        try:
            goal = first_after
            for _ in range(kills):
                poll(lambda: tasks_done(progress, out) >= goal or proc.poll() is not None, timeout=timeout,
                     interval=0.01, what=f"{goal} tasks done")
                assert proc.poll() is None, f"the run finished before kill {len(result.victims) + 1}; use a larger job"
                if client is not None:
                    address = poll(lambda: busy_cluster_worker(client), timeout=30, what="a busy worker")
                    victim = cluster_worker_pids(client)[address]
                else:
                    victim = rng.choice(poll(lambda: local_worker_pids(proc.pid), timeout=30,
                                             what="a worker of kgrad's local cluster"))
                done = tasks_done(progress, out)
                os.kill(victim, signal.SIGKILL)
                result.victims.append(victim)
                result.done_at_kills.append(done)
                goal = done + 1
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        assert_no_leftovers(proc)
        result.returncode, result.stderr = proc.returncode, read_streams(proc)[1]
        if client is not None:  # the next test gets the whole cluster back
            poll(lambda: cluster_restored(client, cluster.nworkers, set(result.victims)), timeout=90, interval=0.2,
                 what="the nannies to restart the killed workers")
    finally:
        if client is not None:
            client.close()
    return result


# ------------------------------------------------------------------------------------------ killing a run at a step


def kill_self_at(cls_module: str, cls: str, method: str, when: str, cli_args, *, env=None,
                 timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `kgrad CLI_ARGS` in a process that SIGKILLs its own process group (workers included) right
    ``when`` ("before" or "after") ``cls_module.cls.method`` is called: a real kill -9 at an exact step of the
    client, which polling from outside cannot hit (such steps take milliseconds)."""
    from cluster_fixtures import PYTHON, kgrad_env

    return subprocess.run([PYTHON, "-c", _KILL_AT, cls_module, cls, method, when, *map(str, cli_args)],
                          env=env or kgrad_env(), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


_KILL_AT = """
import importlib, os, signal, sys

module, cls, name, when = sys.argv[1:5]
target = getattr(importlib.import_module(module), cls)
original = getattr(target, name)

def wrapped(*args, **kwargs):
    if when == "before":
        os.killpg(0, signal.SIGKILL)
    result = original(*args, **kwargs)
    os.killpg(0, signal.SIGKILL)
    return result

setattr(target, name, wrapped)
from pipeline.cli import main
sys.exit(main(sys.argv[5:]))
"""
