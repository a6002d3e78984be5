"""What every task of a run shares, whatever its computation method (:mod:`pipeline.methods`).

A :class:`Job` is all a worker needs for any task of a run: where the inputs live, the kernel, the tile
shape, where to write, and the run's lease and output id, plus the method's own small typed value
(:class:`MethodData`).  Every task starts the same way (:func:`start_task`: core pinning, the compilation
cache, JAX's x64 switch), checks the lease before it marks itself done (:func:`check_lease`), and checks
that the data it read are the data the run checked (:func:`check_same_data`).  The client's own writes into
an output are checked against the lease and the run's fingerprint the same way (:func:`still_owned`).

This module sits below the methods: they import it, it imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from . import lease, store
from .cache import enable_compilation_cache
from .errors import ENDED_STEP, InputsChanged, RunEnded, RunFailed
from .kernels import KernelSpec
from .lazy_jax import imported
from .precision import enable_x64
from .tiles import TileShape


@dataclass(frozen=True)
class MethodData:
    """What one method's tasks need beyond the :class:`Job` (small, picklable).  A method that needs more
    subclasses it (e.g. :class:`pipeline.methods.pruned.SortedLayout`)."""


@dataclass(frozen=True)
class Job:
    """All a worker needs for any task of a run (small, picklable, immutable)."""

    points: store.InputRef
    sources: store.InputRef | None  # None: the points are the sources
    weights: store.InputRef | None  # None: unit weights
    spec: KernelSpec
    mode: str
    dtype: str
    shape: TileShape
    center: tuple[float, ...]
    out: str
    out_options: tuple = ()
    fingerprint: str = ""
    sources_fingerprint: str | None = None  # checked by each worker after it reads the sources
    weights_fingerprint: str | None = None
    pin_cores: bool = False
    cache_dir: str | None = None
    lease_token: str | None = None  # the run's lease on ``out``: tasks write only while the run holds it
    output_id: str = ""  # the output's id: tasks write only into its arrays (pipeline/fenced.py)
    method: str = "dense"  # the name of the run's method in pipeline.methods.METHODS
    data: MethodData = MethodData()  # the method's own part of the job

    def replace_data(self, **changes) -> "Job":
        """The job with fields of its method's data changed (e.g. the sorted copy's id)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))


def start_task(job: Job) -> None:
    """What every task does first: pin the worker to its core (local clusters), use the compilation cache,
    and turn on JAX's x64 switch (float64 tiles and sums).  A background import of JAX is waited for first,
    so that the threads it starts are pinned too."""
    imported()
    if job.pin_cores:
        pin_to_core()
    enable_compilation_cache(job.cache_dir)
    enable_x64()


def check_same_data(ref: store.InputRef, found: str, expected: str | None) -> None:
    """Raise :class:`InputsChanged` unless the fingerprint ``found`` of data just read is the one the run
    checked (``expected``; None: nothing to compare)."""
    if expected is not None and found != expected:
        raise InputsChanged(f"{ref.describe()} changed since the run checked it, or is not the same file on "
                            f"every worker (fingerprint {found[:12]} != {expected[:12]})")


def check_lease(job: Job):
    """Check that the task's run still holds the output's lease (raises :class:`RunEnded`), and return the
    check, to be made again right before the task is marked done: a run that lost the output (ended, taken
    over) never writes there.  None for a job without a lease."""
    if job.lease_token is None:
        return None
    still_owner = functools.partial(lease.check_owner, job.out, job.lease_token, job.out_options)
    still_owner()
    return still_owner


def still_owned(job: Job, attributes: dict) -> None:
    """For the client's own writes: raise :class:`RunFailed` (the run has ended) unless the run still holds
    the output's lease and the output's ``attributes`` still name this run's fingerprint (a job without a
    lease, made in process by a tool that owns the output, checks the fingerprint only)."""
    try:
        if job.lease_token is not None:
            lease.check_owner(job.out, job.lease_token, job.out_options)
        if attributes.get("run_fingerprint") != job.fingerprint:
            raise RunEnded(f"output {job.out!r} now holds another run's data")
    except RunEnded as exc:
        raise RunFailed(str(exc), ENDED_STEP) from exc


_PINNED = False


def pin_to_core() -> None:
    """Pin every thread of this worker process to one core (local clusters with workers <= cores).

    XLA sizes its thread pool from the machine, not from dask; pinning stops two workers' pools from
    fighting over the same cores.  Threads started later inherit the mask of the thread that starts them.
    A worker whose name is not its index (a dask-CLI worker) pins to the first usable core."""
    global _PINNED
    if _PINNED or not hasattr(os, "sched_setaffinity"):
        return
    _PINNED = True
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not inside a dask worker (a task called directly): nothing to pin
        return
    index = int(name) if str(name).isdigit() else 0
    cores = sorted(os.sched_getaffinity(0))
    core = {cores[index % len(cores)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:  # the thread ended meanwhile
            pass
