"""The dense method: every pair (i, j) is computed; the results are exact up to the dtype's rounding.

Each task is one output chunk: query rows ``[start, stop)`` against all M sources, which every worker
process reads once per run and keeps prepared (:func:`prepared_sources`).  Rows are grouped as the tasks
group them and cut into compact blocks (:func:`pipeline.blocks.compute_rows`), so the Python API gives the
same bits as ``kgrad run`` on any number of workers.  No client step is needed around the tasks: each task
writes its chunk of the output in input order and marks itself done there.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import store
from ..blocks import compute_rows
from ..errors import InputsChanged
from ..finite import check_finite_result
from ..output import OutputGroup
from ..plan import Plan, Task, make_plan, with_pruning
from ..sources import prepare_sources
from ..task import Job, MethodData, check_lease, check_same_data, start_task
from .base import ClientRun, Planned, PlanRequest, RunTasks


class Dense:
    name = "dense"

    def plan(self, request: PlanRequest) -> Planned:
        (n, dim), m = request.points.shape, request.sources.shape[0]
        return Planned(with_pruning(make_plan(n, m, dim, **request.plan_options), request.tolerance, None))

    def compute(self, problem, request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        prepared = prepare_sources(request.sources, request.weights, problem.spec, problem.dtype, problem.shape,
                                   center=np.asarray(problem.center))
        # Rows grouped as a cluster run's tasks group them: the same bits as `kgrad run`.
        g, v = compute_rows(request.points, prepared, problem.spec, problem.mode, problem.dtype, problem.shape,
                            chunk=problem.plan.rows_per_task, threads=threads)
        return g, v, problem.plan.pairs

    def job_data(self, request: PlanRequest, planned: Planned) -> MethodData:
        return MethodData()

    def needs_row_digests(self) -> bool:
        return True

    def run_tasks(self, run: ClientRun, execute: RunTasks) -> tuple[dict, int]:
        return execute(run.job, done=run.done), run.plan.pairs

    def finish(self, run: ClientRun, timings: dict) -> None:
        return None  # each task wrote its own rows in input order

    def done_tasks(self, output: OutputGroup, fingerprint: str, plan: Plan) -> np.ndarray:
        return output.done_tasks()

    def run_task(self, job: Job, task: Task, rows_digest: str | None = None) -> dict:
        """Compute and store one output chunk: rows ``[task.start, task.stop)`` against all sources.

        ``rows_digest``: the client's digest of these query rows; the task refuses rows that differ (points
        rewritten during the run), so a run never mixes two versions of its inputs."""
        started = time.perf_counter()
        start_task(job)
        prepared = prepared_sources(job)
        queries = store.read_rows(job.points, task.start, task.stop)
        if queries.shape != (task.rows, len(job.center)):
            raise InputsChanged(f"worker read points of shape {queries.shape} for rows {task.start}:{task.stop} "
                                f"of {job.points.describe()}, expected {(task.rows, len(job.center))}; "
                                f"is the path shared by all workers?")
        if rows_digest is not None and store.rows_digest(queries) != rows_digest:
            raise InputsChanged(f"points rows {task.start}:{task.stop} of {job.points.describe()} changed since "
                                f"the run checked them, or differ on this worker")
        computed = time.perf_counter()
        gradient, value = compute_rows(queries, prepared, job.spec, job.mode, job.dtype, job.shape)
        compute_seconds = time.perf_counter() - computed
        check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
        still_owner = check_lease(job)
        OutputGroup(job.out, job.out_options).write_task(task.start, task.stop, task.index, gradient, value,
                                                         job.output_id or None, before_done=still_owner)
        return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
                "compute_seconds": compute_seconds, "pid": os.getpid()}


DENSE = Dense()

_SOURCES: dict = {}  # this worker process's prepared sources: one run's at a time


def prepared_sources(job: Job):
    """Sources prepared once per worker process and run (keyed by the run's fingerprint)."""
    key = (job.fingerprint, job.dtype, job.shape)
    if key not in _SOURCES:
        _SOURCES.clear()
        ref = job.sources or job.points
        sources, fingerprint = store.load_input(ref, "sources")
        check_same_data(ref, fingerprint, job.sources_fingerprint)
        weights = None
        if job.weights is not None:
            weights, fingerprint = store.load_input(job.weights, "weights")
            check_same_data(job.weights, fingerprint, job.weights_fingerprint)
        _SOURCES[key] = prepare_sources(sources, weights, job.spec, job.dtype, job.shape,
                                        center=np.asarray(job.center)).to_device()
    return _SOURCES[key]
