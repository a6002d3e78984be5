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

import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from . import store
from .errors import RESTART_STEP, InputError, InputsChanged, NonFiniteResultError, RunEnded, RunFailed
from .finite import check_finite_result
from .gradients import TileShape
from .kernels import KernelSpec
from .plan import Plan, Task
from .text import count


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
        raise InputsChanged(f"{ref.describe()} changed since the run checked it, or is not the same file on "
                            f"every worker (fingerprint {found[:12]} != {expected[:12]})")


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


def run_task(job: Job, task: Task, rows_digest: str | None = None) -> dict:
    """Compute and store one output chunk: rows ``[task.start, task.stop)`` against all sources.

    ``rows_digest``: the client's digest of these query rows; the task refuses rows that differ (points
    rewritten during the run), so a run never mixes two versions of its inputs."""
    from .cache import enable_compilation_cache
    from .gradients import block_sums, enable_x64

    started = time.perf_counter()
    if job.pin_cores:
        _pin_to_core()
    enable_compilation_cache(job.cache_dir)
    enable_x64()
    prepared = _prepared_sources(job)
    queries = store.read_rows(job.points, task.start, task.stop)
    if queries.shape != (task.rows, len(job.center)):
        raise InputsChanged(f"worker read points of shape {queries.shape} for rows {task.start}:{task.stop} "
                            f"of {job.points.describe()}, expected {(task.rows, len(job.center))}; "
                            f"is the path shared by all workers?")
    if rows_digest is not None and store.rows_digest(queries) != rows_digest:
        raise InputsChanged(f"points rows {task.start}:{task.stop} of {job.points.describe()} changed since "
                            f"the run checked them, or differ on this worker")
    gradient = np.empty((task.rows, queries.shape[1]), dtype=job.dtype)
    value = np.empty(task.rows, dtype=job.dtype)
    computed = time.perf_counter()
    for start in range(0, task.rows, job.shape.rows):
        stop = min(start + job.shape.rows, task.rows)
        gradient[start:stop], value[start:stop] = block_sums(queries[start:stop], prepared, job.spec,
                                                             job.mode, job.dtype, job.shape)
    compute_seconds = time.perf_counter() - computed
    check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
    store.write_task(job.out, task.start, task.stop, task.index, gradient, value, job.out_options,
                     run_fingerprint=job.fingerprint, owner=job.lease_token)
    return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
            "compute_seconds": compute_seconds, "pid": os.getpid()}


def run_task_reporting(job: Job, task: Task, rows_digest: str | None = None) -> dict:
    """:func:`run_task`, with the failures that a retry cannot mend returned as ``{"failed": kind,
    "message": line}`` instead of raised: dask must not retry them (same inputs, same failure) and the
    worker must not log them (the client ends the run with the one line).  Anything else (a lost file
    system, a full disk) is raised, and dask retries it."""
    try:
        return run_task(job, task, rows_digest)
    except NonFiniteResultError as exc:
        return {"index": task.index, "failed": "nonfinite", "message": f"{exc}; the task's rows were not written",
                "step": "start it again with --dtype float64 and --overwrite"}
    except (InputsChanged, InputError, RunEnded) as exc:
        failure = task_failure(exc)
        return {"index": task.index, "failed": type(exc).__name__, "message": str(failure), "step": failure.step}


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
        print(f"\rkgrad: {self.done}/{count(self.total, 'task')} ({100 * self.done / self.total:.0f}%), "
              f"{rate / 1e9:.2f} G pairs/s, {left:.0f} s left   ", end="", file=self.stream, flush=True)
        if self.done >= self.total:
            print(file=self.stream, flush=True)


def quiet_dask_logs() -> None:
    """Keep dask's own log lines (reconnect attempts, worker errors) off stderr unless KGRAD_DEBUG is set:
    a run's outcome is kgrad's own lines."""
    import logging

    import distributed  # noqa: F401  (configures its loggers on import; set the levels after that)

    level = worker_log_level()
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(level)
    logging.getLogger("distributed").setLevel(level)


def worker_log_level() -> int:
    """Level of dask's own log lines that reach stderr: none (above CRITICAL) unless KGRAD_DEBUG is set, so
    a failing run ends in kgrad's one line instead of worker tracebacks."""
    import logging

    return logging.WARNING if os.environ.get("KGRAD_DEBUG") else logging.CRITICAL + 10


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Spawn the local workers with SIGINT ignored (an ignored signal stays ignored across exec): Ctrl-C
    in a terminal reaches the whole process group, and the client, not each worker, handles it (cancels
    the run, closes the cluster) -- otherwise every worker prints its own KeyboardInterrupt traceback."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
                          "distributed.worker.daemon": False}), _workers_ignore_ctrl_c():
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            host="127.0.0.1", dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
                            silence_logs=worker_log_level())


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
    from .errors import InputError, InputsChanged, RunEnded, RunFailed

    if os.path.isfile(scheduler):
        return _client(scheduler_file=scheduler, security=security, timeout="20s")
    if "://" not in scheduler and (os.sep in scheduler or scheduler.endswith(".json")):
        raise InputError(f"scheduler file {scheduler!r} does not exist; give 'local', a scheduler address "
                         f"(tcp://host:8786) or an existing scheduler file")
    return _client(scheduler, security=security, timeout="20s")


class SchedulerWatch:
    """Asks the scheduler for its identity every few seconds from a background thread; :meth:`check`
    raises :class:`RunFailed` once it has not answered for ``timeout`` seconds (frozen, not dead: a dead
    scheduler's closed connection fails the futures by itself)."""

    def __init__(self, client, address: str, timeout: float):
        import threading

        self.client, self.address, self.timeout = client, address, float(timeout)
        self.interval = max(0.2, min(5.0, self.timeout / 4))
        self.last_answer = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, name="kgrad-scheduler-watch", daemon=True)
        self._thread.start()

    def _probe(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.client.sync(self.client.scheduler.identity, callback_timeout=max(self.interval, 1.0))
            except Exception:  # noqa: BLE001 - a timeout or a closed comm: no answer either way
                continue
            self.last_answer = time.monotonic()

    def check(self) -> None:
        silent = time.monotonic() - self.last_answer
        if silent > self.timeout:
            raise RunFailed(f"the dask scheduler {self.address} has not answered for {silent:.0f} s "
                            f"(frozen or unreachable; --scheduler-timeout {self.timeout:g})")

    def stop(self) -> None:
        self._stop.set()


def cancel(client, futures, timeout: float = 5.0) -> None:
    """Cancel a run's futures on the scheduler, waiting at most ``timeout`` seconds for it to answer."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    try:
        client.sync(client._cancel, pending, callback_timeout=timeout)
    except Exception:  # noqa: BLE001 - scheduler gone or frozen: the lease still stops their writes
        pass


ENDED_STEP = "see who owns it now with 'kgrad inspect', then resume or start over"


def task_failure(exc: BaseException) -> RunFailed:
    """One line for a task that failed on a worker: the cause, in the user's terms."""
    if isinstance(exc, (InputsChanged, InputError)):
        return RunFailed(f"{exc}; the run stopped so as not to mix two versions of the data", RESTART_STEP)
    if isinstance(exc, RunEnded):
        return RunFailed(f"{exc} (another run took the output over?)", ENDED_STEP)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return RunFailed(f"a task could not read or write its data: {what}{where}")
    if type(exc).__name__ == "KilledWorker":
        return RunFailed(f"workers kept dying while running a task ({exc}); out of memory? give workers more "
                         f"memory (--memory-limit) or run fewer at once")
    if type(exc).__name__ in ("CancelledError", "FutureCancelledError"):
        return RunFailed("the run's tasks were cancelled on the cluster (scheduler restarted or lost?)")
    return RunFailed(f"a task failed on a worker: {type(exc).__name__}: {exc}")


def execute(job: Job, plan: Plan, client, *, done: np.ndarray | None = None, retries: int = 2,
            progress: bool = True, stream=None, rows_digests: tuple | None = None,
            scheduler_timeout: float = 60.0, scheduler: str = "the scheduler") -> dict:
    """Run every task not marked done; return timings.

    Raises :class:`RunFailed` if a task fails after its retries or the scheduler stops answering for
    ``scheduler_timeout`` seconds.  On every way out (an error, Ctrl-C) the run's unfinished futures are
    cancelled before this returns."""
    from distributed import as_completed

    todo = [t for t in plan.tasks if done is None or not done[t.index]]
    # Keys unique to this execution: a scheduler keeps an existing key's task, so a second run of the same
    # job (another --out, or after --overwrite) must never share keys with one still known to it.
    token = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    bar = Progress(total=len(todo), pairs_per_task=plan.rows_per_task * plan.n_sources,
                   stream=stream or sys.stderr, enabled=progress and len(todo) > 0)
    futures = [client.submit(run_task_reporting, job, task,
                             None if rows_digests is None else rows_digests[task.index],
                             key=f"kgrad-{job.fingerprint[:12]}-{token}-task-{task.index}",
                             retries=retries, pure=False) for task in todo]
    watch = SchedulerWatch(client, scheduler, scheduler_timeout)
    results = []
    try:
        # Results are gathered in the background (with_results): the loop itself never waits on the
        # scheduler, so it can notice one that has stopped answering.
        pending = as_completed(futures, with_results=True, raise_errors=False)
        while not pending.is_empty() or pending.has_ready():
            batch = pending.next_batch(block=False)
            if not batch:
                watch.check()
                time.sleep(0.05)
                continue
            for future, result in batch:
                if future.status == "error":
                    raise task_failure(result[1]) from result[1]
                if isinstance(result, BaseException):  # cancelled
                    raise task_failure(result) from result
                if "failed" in result:  # a deterministic failure, reported instead of raised
                    raise RunFailed(result["message"], result["step"])
                results.append(result)
                bar.update()
    finally:
        watch.stop()
        cancel(client, futures)
        for future in futures:
            future.release()
    elapsed = time.perf_counter() - started
    return {"tasks_run": len(results), "tasks_skipped": plan.n_tasks - len(todo),
            "execute_seconds": round(elapsed, 4),
            "task_seconds_total": round(sum(r["seconds"] for r in results), 4),
            "compute_seconds_total": round(sum(r["compute_seconds"] for r in results), 4),
            "worker_pids": sorted({r["pid"] for r in results})}
