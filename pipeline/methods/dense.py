"""The dense method: every pair (i, j) is computed; the results are exact up to the dtype's rounding.

Query rows are taken in the run's spatial order (:func:`pipeline.spatial.spatial_order`), so each block of
consecutive rows is compact whatever the input's row order, and the rate does not depend on it.  Each task
computes a range of that order against all M sources, which every worker process reads once per run and
keeps prepared (:func:`prepared_sources`); the rows are cut into blocks as the tasks cut them
(:func:`pipeline.blocks.compute_rows`), so the Python API gives the same bits as ``kgrad run`` on any
number of workers.  On a cluster the client's steps are those of :mod:`pipeline.methods.in_order`: the
sorted points into ``OUT/order/`` before the tasks, the results back in input order after them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .. import store
from ..blocks import compute_rows
from ..finite import check_finite_result
from ..plan import Task, make_plan, with_pruning
from ..sources import prepare_sources
from ..spatial import in_input_order, spatial_order
from ..task import Job, check_lease, check_same_data, start_task
from .base import ClientRun, Planned, PlanRequest
from .in_order import InOrderData, InSpatialOrder, task_copy
from .pruned import PRUNED


@dataclass(frozen=True)
class DenseLayout:
    """A dense run's fixed data: the spatial order of its points."""

    point_order: np.ndarray  # (N,) int64: input row of each position in spatial order


class Dense(InSpatialOrder):
    name = "dense"

    def plan(self, request: PlanRequest) -> Planned:
        (n, dim), m = request.points.shape, request.sources.shape[0]
        plan = with_pruning(make_plan(n, m, dim, **request.plan_options), request.tolerance, None)
        order = PRUNED.point_order(request)  # the same call where weights cannot break ties (pruned planned first)
        if order is None or (request.sources_are_points and request.weights is not None):
            order = spatial_order(request.points, request.spec.lengthscale)
        return Planned(plan, DenseLayout(order))

    def compute(self, problem, request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        prepared = prepare_sources(request.sources, request.weights, problem.spec, problem.dtype, problem.shape,
                                   center=np.asarray(problem.center))
        order = problem.layout.point_order
        # Rows in spatial order, grouped as a cluster run's tasks group them: the same bits as `kgrad run`.
        g, v = compute_rows(np.asarray(request.points)[order], prepared, problem.spec, problem.mode, problem.dtype,
                            problem.shape, chunk=problem.plan.rows_per_task, threads=threads)
        return in_input_order(g, order), in_input_order(v, order), problem.plan.pairs

    def job_data(self, request: PlanRequest, planned: Planned) -> InOrderData:
        return InOrderData()

    def copy_contents(self, run: ClientRun) -> dict:
        """The points in spatial order (the tasks read the sources and weights from the inputs)."""
        order = run.layout.point_order
        return dict(point_index=order, points=np.asarray(run.points)[order], source_index=None, sources=None,
                    weights=None, tiles=None)

    def run_task(self, job: Job, task: Task) -> dict:
        """Compute and store one task: rows ``[task.start, task.stop)`` of the points in spatial order (read
        from the run's sorted copy) against all sources."""
        started = time.perf_counter()
        start_task(job)
        prepared = prepared_sources(job)
        copy = task_copy(job)
        queries = copy.read("points", task.start, task.stop)
        computed = time.perf_counter()
        gradient, value = compute_rows(queries, prepared, job.spec, job.mode, job.dtype, job.shape)
        compute_seconds = time.perf_counter() - computed
        check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
        still_owner = check_lease(job)
        pairs = task.rows * prepared.count
        copy.write_task(task.start, task.stop, task.index, gradient, value, pairs, job.output_id,
                        before_done=still_owner)
        return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
                "compute_seconds": compute_seconds, "pid": os.getpid(), "pairs": pairs}


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
