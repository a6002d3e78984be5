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
import time
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


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _started(pid: int) -> int:
    """The process's start time (clock ticks after boot); a process gone counts as the newest."""
    fields = _stat(pid)
    return int(fields[19]) if fields else 2**63


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


class KillMissed(AssertionError):
    """The run ended before a kill could land (a busy machine can finish a small job between polls): the
    fault was not injected, so the caller may run it again."""


def run_with_worker_kills(args, out, progress: Progress, *, kills: int = 1, cluster=None, first_after: int = 2,
                          rng: random.Random | None = None, timeout: float = RUN_TIMEOUT) -> WorkerKills:
    """Start `kgrad ARGS` and, once ``first_after`` of its tasks are done (``progress``), SIGKILL ``kills``
    worker processes one right after the other (2: both workers of a 2-worker cluster, every task in flight
    lost until the nannies have restarted them).

    ``cluster``: a :class:`cluster_fixtures.DaskCluster` the run uses (``--scheduler FILE``): a worker busy
    with a kgrad task is killed first, and this returns once the cluster has all its workers back.  Without it
    the run uses its own local cluster, and its worker processes are killed (the first drawn with ``rng``).

    The workers are frozen (SIGSTOP) from the moment ``first_after`` tasks are seen done until the kills have
    landed, so a job whose tasks take milliseconds is still hit in mid-run; the survivors are thawed
    (SIGCONT) after.  The run must still be running at each kill (else :class:`KillMissed`: the whole job
    ended between two polls); it is waited for to the end (nothing of it may outlive it)."""
    rng = rng or random.Random(0)
    result = WorkerKills()
    client = None
    if cluster is not None:
        client = cluster.client()
        client.wait_for_workers(cluster.nworkers, timeout=60)
    frozen: list[int] = []
    try:
        cluster_pids = cluster_worker_pids(client) if client is not None else {}  # asked while they answer
        proc = start_kgrad(args)
        try:
            poll(lambda: tasks_done(progress, out) >= first_after or proc.poll() is not None, timeout=timeout,
                 interval=0.01, what=f"{first_after} tasks done")
            frozen = _freeze_workers(proc, client, cluster_pids)
            for _ in range(kills):
                if proc.poll() is not None:
                    raise KillMissed(f"the run finished before kill {len(result.victims) + 1}; use a larger job")
                if client is None:
                    victim = _local_victim(proc, result.victims, rng)
                else:
                    victim, frozen = _cluster_victim(client, proc, cluster_pids, result.victims, frozen)
                result.done_at_kills.append(tasks_done(progress, out))
                os.kill(victim, signal.SIGKILL)
                result.victims.append(victim)
                poll(lambda: not _alive(victim), timeout=10, what=f"worker {victim} to die")  # a fault made
            _thaw(frozen)
            proc.wait(timeout=timeout)
        finally:
            _thaw(frozen)
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


def _freeze_workers(proc, client, cluster_pids: dict[str, int]) -> list[int]:
    """SIGSTOP every worker process of the run (its local cluster's, or the dask cluster's): no task can end
    while victims are chosen.  Returns the pids stopped."""
    pids = list(cluster_pids.values()) if client is not None else local_worker_pids(proc.pid)
    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        stopped.append(pid)
    return stopped


def _thaw(pids: list[int]) -> None:
    """SIGCONT the frozen workers that are still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _local_victim(proc, victims: list[int], rng: random.Random) -> int:
    """A worker process of the run's local cluster not killed yet (not one a nanny is restarting)."""
    pids = poll(lambda: [p for p in local_worker_pids(proc.pid) if p not in victims], timeout=30,
                what="a worker of kgrad's local cluster")
    return rng.choice(pids) if not victims else min(pids, key=_started)


def _cluster_victim(client, proc, cluster_pids: dict[str, int], victims: list[int],
                    frozen: list[int]) -> tuple[int, list[int]]:
    """A worker process of the dask cluster not killed yet: first one the scheduler says holds a kgrad task;
    then any.  Where none holds one at the freeze (between two tasks), the workers are thawed a moment and
    frozen again until one does.  Returns the victim and the pids now frozen."""
    if victims:
        pids = [pid for pid in cluster_pids.values() if pid not in victims]
        assert pids, "no worker left to kill"
        return pids[0], frozen
    while (address := busy_cluster_worker(client)) is None:
        if proc.poll() is not None:
            raise KillMissed("the run finished before the kill; use a larger job")
        _thaw(frozen)
        time.sleep(0.005)
        frozen = _freeze_workers(proc, client, cluster_pids)
    return cluster_pids[address], frozen


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
