"""The client-side runner of a run: submit one task per output chunk, watch the scheduler, cancel, collect.

``execute(job, plan, client, ...)`` submits :func:`pipeline.worker.run_task_reporting` for each task not
yet done (resume state lives in the output), reports progress to its callbacks
(:mod:`pipeline.progress`), ends the run with one line (:class:`RunFailed`) when a task fails or the
scheduler stops answering, cancels the run's futures on every way out, and returns timings.  The cluster
(local or remote) comes from :mod:`pipeline.cluster`; what runs on the workers is :mod:`pipeline.worker`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from .errors import RunFailed, task_failure
from .plan import Plan
from .progress import Callback
from .task import Job
from .worker import run_task_reporting


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


def execute(job: Job, plan: Plan, client, *, done: np.ndarray | None = None, retries: int = 2,
            callbacks: Sequence[Callback] = (),
            scheduler_timeout: float = 60.0, scheduler: str = "the scheduler") -> dict:
    """Run every task not marked done; return timings.

    ``callbacks``: objects with ``on_start(total)``, ``on_task_done(result)`` and ``on_end()`` (and,
    optionally, ``on_plan(plan)``, called first)
    (:class:`pipeline.progress.Callback`); ``on_end`` is called on every way out, before an error goes up.
    Raises :class:`RunFailed` if a task fails after its retries or the scheduler stops answering for
    ``scheduler_timeout`` seconds.  On every way out (an error, Ctrl-C) the run's unfinished futures are
    cancelled before this returns."""
    from distributed import as_completed

    todo = [t for t in plan.tasks if done is None or not done[t.index]]
    # Keys unique to this execution: a scheduler keeps an existing key's task, so a second run of the same
    # job (another --out, or after --overwrite) must never share keys with one still known to it.
    token = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    callbacks = list(callbacks)
    for callback in callbacks:
        if hasattr(callback, "on_plan"):  # optional: callbacks written before it need not have it
            callback.on_plan(plan)
        callback.on_start(len(todo))
    futures, watch, results, finished = [], None, [], False
    try:
        for task in todo:
            futures.append(client.submit(run_task_reporting, job, task,
                                         key=f"kgrad-{job.fingerprint[:12]}-{token}-task-{task.index}",
                                         retries=retries, pure=False))
        watch = SchedulerWatch(client, scheduler, scheduler_timeout)
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
                for callback in callbacks:
                    callback.on_task_done(result)
        finished = True
    finally:
        try:
            if watch is not None:
                watch.stop()
            cancel(client, futures)
            for future in futures:
                future.release()
        finally:
            # Ends the progress line before an error or Ctrl-C goes up (its one line starts a new line).
            _end(callbacks, raise_errors=finished)
    elapsed = time.perf_counter() - started
    return {"tasks_run": len(results), "tasks_skipped": plan.n_tasks - len(todo),
            "execute_seconds": round(elapsed, 4),
            "task_seconds_total": round(sum(r["seconds"] for r in results), 4),
            "compute_seconds_total": round(sum(r["compute_seconds"] for r in results), 4),
            "worker_pids": sorted({r["pid"] for r in results})}


def map_on_workers(client, function, items: Sequence, *, name: str = "part", retries: int = 2,
                   scheduler_timeout: float = 60.0, scheduler: str = "the scheduler") -> list:
    """``[function(*item) for item in items]`` computed on the cluster's workers, one task per item, the
    results in the items' order (a client step's own work spread over the workers: the far field's
    spreading).  A failure is a :class:`RunFailed` line, as a task's; on every way out the futures are
    cancelled."""
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(function, *item, key=f"kgrad-{name}-{token}-{i}", retries=retries, pure=False)
               for i, item in enumerate(items)]
    watch = SchedulerWatch(client, scheduler, scheduler_timeout)
    try:
        while not all(future.done() for future in futures):
            watch.check()
            time.sleep(0.05)
        for future in futures:
            if future.status == "error":
                error = future.exception()
                raise task_failure(error) from error
        return client.gather(futures)
    finally:
        watch.stop()
        cancel(client, futures)
        for future in futures:
            future.release()


def _end(callbacks: list, raise_errors: bool) -> None:
    """Every callback's ``on_end``, even if one of them raises.  The first such error goes up after all
    ran, unless the run is already ending with an error of its own (``raise_errors`` False)."""
    error = None
    for callback in callbacks:
        try:
            callback.on_end()
        except Exception as exc:  # noqa: BLE001
            error = error or exc
    if error is not None and raise_errors:
        raise error
