"""Execution on dask.distributed: one task per output chunk, reduced in a fixed order inside the task.

``execute(job, plan, ...)`` submits :func:`run_task` for each task not yet done (resume state lives in
the output), shows progress, and returns timings.  ``scheduler="local"`` starts a ``LocalCluster`` bound
to loopback; anything else is an existing scheduler's address (``tcp://``, ``tls://``) or a scheduler
file.

Workers build their jitted functions lazily (one compile per process and tile shape, kept in the
persistent compilation cache), read their query rows and the sources from the input stores themselves,
write whole output chunks, and return only small dicts: no JAX arrays or jitted functions cross the wire.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from . import store
from .errors import InputError
from .gradients import TileShape
from .kernels import KernelSpec
from .plan import Plan, Task


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


# ----------------------------------------------------------------------------------------- worker side

_SOURCES: dict = {}


def _prepared_sources(job: Job):
    """Sources prepared once per worker process and run (keyed by the run's fingerprint)."""
    from .gradients import prepare_sources

    key = (job.fingerprint, job.dtype, job.shape)
    if key not in _SOURCES:
        _SOURCES.clear()
        ref = job.sources or job.points
        sources, fingerprint = store.load_input(ref, "sources")
        _check_same_data(ref, fingerprint, job.sources_fingerprint)
        weights = None
        if job.weights is not None:
            weights, fingerprint = store.load_input(job.weights, "weights")
            _check_same_data(job.weights, fingerprint, job.weights_fingerprint)
        _SOURCES[key] = prepare_sources(sources, weights, job.spec, job.dtype, job.shape,
                                        center=np.asarray(job.center)).to_device()
    return _SOURCES[key]


def _check_same_data(ref, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise RuntimeError(f"worker read different data at {ref.describe()} than the client validated "
                           f"(fingerprint {found[:12]} != {expected[:12]}); is the path shared by all workers?")


_PINNED = False


def _pin_to_core() -> None:
    """Pin every thread of this worker process to one core (local clusters with workers <= cores).

    XLA sizes its thread pool from the machine, not from dask; pinning stops two workers' pools from
    fighting over the same cores.  Threads started later inherit the mask of the thread that starts them.
    """
    global _PINNED
    if _PINNED or not hasattr(os, "sched_setaffinity"):
        return
    _PINNED = True
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except Exception:
        return
    cores = sorted(os.sched_getaffinity(0))
    core = {cores[index % len(cores)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:
            pass


def run_task(job: Job, task: Task) -> dict:
    """Compute and store one output chunk: rows ``[task.start, task.stop)`` against all sources."""
    from .cache import enable_compilation_cache
    from .gradients import block_sums, enable_x64, query_blocks

    started = time.perf_counter()
    if job.pin_cores:
        _pin_to_core()
    enable_compilation_cache(job.cache_dir)
    enable_x64()
    prepared = _prepared_sources(job)
    queries = store.read_rows(job.points, task.start, task.stop)
    if queries.shape != (task.rows, len(job.center)):
        raise RuntimeError(f"worker read points of shape {queries.shape} for rows {task.start}:{task.stop} of "
                           f"{job.points.describe()}, expected {(task.rows, len(job.center))}; "
                           f"is the path shared by all workers?")
    gradient = np.empty((task.rows, queries.shape[1]), dtype=job.dtype)
    value = np.empty(task.rows, dtype=job.dtype)
    computed = time.perf_counter()
    for rows in query_blocks(queries, job.spec, job.shape.rows):  # spatial order; written back in place
        gradient[rows], value[rows] = block_sums(queries[rows], prepared, job.spec, job.mode, job.dtype,
                                                 job.shape)
    compute_seconds = time.perf_counter() - computed
    store.write_task(job.out, task.start, task.stop, task.index, gradient, value, job.out_options,
                     run_fingerprint=job.fingerprint)
    return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
            "compute_seconds": compute_seconds, "pid": os.getpid()}


# ----------------------------------------------------------------------------------------- client side


@dataclass
class Progress:
    """Prints 'tasks done/total, pair rate, time left' to a stream at most once a second."""

    total: int
    pairs_per_task: float
    stream: object = field(default_factory=lambda: sys.stderr)
    enabled: bool = True
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def update(self, finished: int = 1) -> None:
        self.done += finished
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 1.0 and self.done < self.total):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done * self.pairs_per_task / elapsed
        left = (self.total - self.done) * elapsed / max(self.done, 1)
        print(f"\rkgrad: {self.done}/{self.total} tasks ({100 * self.done / self.total:.0f}%), "
              f"{rate / 1e9:.2f} G pairs/s, {left:.0f} s left   ", end="", file=self.stream, flush=True)
        if self.done >= self.total:
            print(file=self.stream, flush=True)


def local_cluster(workers: int, memory_limit: int | str = "auto", threads_per_worker: int = 1):
    """A LocalCluster on loopback only, with workers that keep XLA's large temporaries mapped.

    distributed's nanny sets MALLOC_TRIM_THRESHOLD_, which also pins glibc's mmap threshold at 128 KiB, so
    every multi-MB XLA temporary would be mapped and unmapped (page faults on every tile).  Raising both
    thresholds before the worker starts keeps them in the heap.
    """
    import dask
    from distributed import LocalCluster

    environ = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ,
                          "distributed.scheduler.allowed-failures": 5,
                          "distributed.worker.daemon": False}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            host="127.0.0.1", dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
                            silence_logs=40)


def _client(*args, **kwargs):
    """``distributed.Client(*args, **kwargs)``, cleaning up after a Client that fails to start.

    Such a Client is closed (and ``dask.config["scheduler"]`` restored) only by its ``__del__``.  Run later,
    inside another Client's start-up, that ``__del__`` waits on distributed's class-wide LoopRunner lock (a
    deadlock seen with distributed 2026.8), and until then dask.config says "dask.distributed".  So collect
    it now, before the error goes up.
    """
    import gc

    from distributed import Client

    try:
        return Client(*args, **kwargs)
    except Exception as exc:
        error = exc
    cause = error
    while cause is not None:  # tracebacks hold the failed Client's frames
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    gc.collect()
    raise error


def connect(scheduler: str, security=None):
    """A Client for an existing scheduler: ``tcp://host:port``, ``tls://...`` or a scheduler file.

    ``security`` None: distributed's configuration decides (``distributed.comm.tls.*``, e.g. from
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``).
    """
    from .errors import InputError

    if os.path.isfile(scheduler):
        return _client(scheduler_file=scheduler, security=security, timeout="20s")
    if "://" not in scheduler and (os.sep in scheduler or scheduler.endswith(".json")):
        raise InputError(f"scheduler file {scheduler!r} does not exist; give 'local', a scheduler address "
                         f"(tcp://host:8786) or an existing scheduler file")
    return _client(scheduler, security=security, timeout="20s")


def execute(job: Job, plan: Plan, client, *, done: np.ndarray | None = None, retries: int = 2,
            progress: bool = True, stream=None) -> dict:
    """Run every task not marked done; return timings.  Raises if a task fails after its retries."""
    from distributed import as_completed

    todo = [t for t in plan.tasks if done is None or not done[t.index]]
    # Keys unique to this execution: a scheduler keeps an existing key's task, so a second run of the same
    # job (another --out, or after --overwrite) must never share keys with one still known to it.
    token = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    bar = Progress(total=len(todo), pairs_per_task=plan.rows_per_task * plan.n_sources,
                   stream=stream or sys.stderr, enabled=progress and len(todo) > 0)
    futures = [client.submit(run_task, job, task, key=f"kgrad-{job.fingerprint[:12]}-{token}-task-{task.index}",
                             retries=retries, pure=False) for task in todo]
    results = []
    try:
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except InputError as exc:  # raised on a worker, after the output exists: not a usage error
                raise RuntimeError(f"a task failed on a worker: {exc}") from None
            bar.update()
    finally:
        for future in futures:
            future.release()
    elapsed = time.perf_counter() - started
    return {"tasks_run": len(results), "tasks_skipped": plan.n_tasks - len(todo),
            "execute_seconds": round(elapsed, 4),
            "task_seconds_total": round(sum(r["seconds"] for r in results), 4),
            "compute_seconds_total": round(sum(r["compute_seconds"] for r in results), 4),
            "worker_pids": sorted({r["pid"] for r in results})}
