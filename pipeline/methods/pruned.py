"""The pruned method (``tolerance > 0`` on a kernel whose profile decays to 0): each query block skips the
far sources whose summed contribution the per-query bound allows, and computes the rest.

Guarantee, per query j (on top of the dtype's rounding): ``|g^_j - g_j| <= EPS * S * gmax`` and
``|v^_j - v_j| <= EPS * S * kmax`` with ``S = sum_i |w_i|`` (:mod:`pipeline.pruning`).

Plan: the points and sources are put in spatial order and the sources indexed in tiles
(:func:`pipeline.kept_tiles.make_layout`); a sample of query blocks estimates the pairs left.  The method
declines (the run computes every pair) where the kernel does not decay, or where more than
:data:`DENSE_ABOVE` of the pairs would be left.

On a cluster the run works in the spatial order (:mod:`pipeline.methods.in_order`): its sorted copy in
``OUT/order/`` also holds the sorted sources, their weights and the tile index, and each task reads only
the source chunks holding the tiles its blocks keep.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..finite import check_finite_result
from ..kept_tiles import (Layout, SourceTiles, blocks_to_compute, compute_blocks, compute_in_memory,
                          make_layout)
from ..output import SpatialCopy
from ..plan import PRUNED_HELD_SOURCES, PRUNED_SLOWDOWN, Task, make_plan, pair_seconds, task_rows, with_pruning
from ..pruning import INDEX_TILE, SUPER_TILES, Budget, TileIndex, kernel_bounds, prunes
from ..sources import PreparedSources
from ..spatial import tile_rows
from ..task import Job, check_lease, start_task
from .base import ClientRun, Planned, PlanRequest
from .in_order import COPY_CHUNK, InOrderData, InSpatialOrder, check_copy, task_copy

# Above this estimated share of the N x M pairs a pruned run computes everything the dense way instead
# (its bigger tiles are faster than gathering nearly every tile; the bound then holds trivially).
DENSE_ABOVE = 1.0 / PRUNED_SLOWDOWN  # where the pruned run's estimated time reaches the dense run's
# Tasks get rows for at least this many projected seconds (pipeline.plan.task_rows): a pruned task's own
# cost (its rows, the super-tile level over all blocks, the source chunks it reads, preparing the sources its
# blocks need, its writes) is about 20-30 ms, and neighbouring tasks prepare the sources between them twice.
# Clustered data at 10^6 points (EPS 1e-9): 62 tasks of 16384 rows 7.79 s end to end, 31 of 32768 7.20 s,
# 16 of 65536 7.15 s (medians of 3, alternating); at 10^7: 611 tasks of 16384 rows 84.7 s (execute 58.2 s),
# 153 of 65536 76.5 s (53.4 s).  The projection per pair (pipeline.plan.pair_seconds) is about 1.5x the
# measured cost there, so this asks for about 0.7 s of measured work.
TASK_SECONDS = 1.0
MAX_TASK_BLOCKS = 128  # ... and at most this many blocks (a task's selection holds blocks x super-tiles flags)


@dataclass(frozen=True)
class SortedLayout(InOrderData):
    """What the tasks of a pruned run need beyond the :class:`Job`: the budget and the whole sources' facts
    (count, box, whether weights may cancel) from the plan's :class:`~pipeline.kept_tiles.Layout`, and the
    sorted copy's id (:class:`~pipeline.methods.in_order.InOrderData`)."""

    budget: Budget = None  # in units of the kernel's profile (pipeline.pruning)
    sources: PreparedSources = None  # no data: count, bounding box (input units), may_cancel
    separate_sources: bool = False  # OUT/order/sources (else the sorted points are the sources)


def source_chunk() -> int:
    """Rows per chunk of the sorted copy: whole super-tiles of the index, at least COPY_CHUNK rows."""
    return INDEX_TILE * SUPER_TILES * max(1, COPY_CHUNK // (INDEX_TILE * SUPER_TILES))


class Pruned(InSpatialOrder):
    name = "pruned"

    def plan(self, request: PlanRequest) -> Planned | str:
        """The plan (or why not); the last request's answer is kept, as the far-field method asks first."""
        last = self._last
        if last is not None and last[0] is request:
            return last[1]
        answer = self._plan(request)
        self._last = (request, answer)
        return answer

    _last = None  # (request, answer) of the last plan
    _order = None  # (request, the points' spatial order) of the last plan that computed one

    def forget(self) -> None:
        """Drop the kept answer (and the request's arrays it holds): called once a method is chosen."""
        self._last = None
        self._order = None

    def point_order(self, request: PlanRequest) -> np.ndarray | None:
        """The points' spatial order this method computed when it planned ``request`` (declined or not;
        None if it computed none): ``spatial_order(points, lengthscale, weights if the sources are the points
        else None)``, which the other methods in spatial order need too (about 0.4 s per 10^6 points).  Its
        own run refines it (:func:`~pipeline.spatial.compact_order`)."""
        kept = self._order
        return kept[1] if kept is not None and kept[0] is request else None

    def _plan(self, request: PlanRequest) -> Planned | str:
        spec, mode = request.spec, request.mode
        if request.tolerance <= 0:
            return "no tolerance was given: the run is exact"
        if not prunes(spec, mode):
            why = (f"mode={mode} computes every pair" if mode != "auto" else
                   f"kernel {spec.name} does not decay to 0 with distance, so nothing can be skipped")
            return f"{why}: the run is exact"
        bounds = kernel_bounds(spec)
        if bounds is None:
            return f"kernel {spec.describe()} has no usable tail bound: the run is exact"
        (n, dim), m = request.points.shape, request.sources.shape[0]
        plan = make_plan(n, m, dim, pruned=True, **request.plan_options)
        layout = make_layout(request.points, None if request.sources_are_points else request.sources,
                             request.weights, spec, request.tolerance, bounds, plan.rows)
        self._order = (request, layout.spatial_order)
        share = layout.estimated_pairs / max(plan.pairs, 1)
        if share > DENSE_ABOVE and not request.forced(self.name):
            return (f"pruning would skip only {1 - share:.0%} of the pairs at this tolerance, so every pair is "
                    f"computed (faster with the dense tiles; the bound holds exactly)")
        if request.plan_options.get("rows_per_task") is None:
            per_row = pair_seconds(plan.formulation, dim, plan.dtype, pruned=True) * layout.estimated_pairs / n
            rows = min(task_rows(n, per_row, TASK_SECONDS, plan.rows, plan.rows_per_task),
                       max(plan.rows_per_task, MAX_TASK_BLOCKS * plan.rows))
            if rows != plan.rows_per_task:
                try:
                    plan = make_plan(n, m, dim, pruned=True, **{**request.plan_options, "rows_per_task": rows})
                except InputError:  # bigger tasks do not fit the workers' memory: the default ones did
                    pass
        return Planned(with_pruning(plan, request.tolerance, layout.estimated_pairs), layout, layout.error_bounds)

    def compute(self, problem, request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        # Blocks in the run's spatial order: the same bits as `kgrad run --tolerance`.
        return compute_in_memory(request.points, None if request.sources_are_points else request.sources,
                                 request.weights, problem.layout, problem.spec, problem.mode, problem.dtype,
                                 problem.shape, np.asarray(problem.center), threads)

    def job_data(self, request: PlanRequest, planned: Planned) -> SortedLayout:
        layout: Layout = planned.layout
        return SortedLayout(budget=layout.budget, sources=layout.meta,
                            separate_sources=not request.sources_are_points, copy_chunk=source_chunk())

    def copy_contents(self, run: ClientRun) -> dict:
        """The points in spatial order; the sources (if not the points) and weights in theirs; the tile index."""
        layout: Layout = run.layout
        separate = run.sources is not None
        source_order = layout.source_order if separate else layout.point_order
        weights = None if run.weights is None else np.asarray(run.weights, np.float64)[source_order]
        return dict(point_index=layout.point_order, points=np.asarray(run.points)[layout.point_order],
                    source_index=source_order if separate else None,
                    sources=np.asarray(run.sources)[source_order] if separate else None, weights=weights,
                    tiles=layout.index.as_array())

    def run_task(self, job: Job, task: Task) -> dict:
        """Compute and store one task: rows ``[task.start, task.stop)`` of the points in spatial order, each
        block against the source tiles it keeps, read from the run's sorted copy."""
        started = time.perf_counter()
        start_task(job)
        layout: SortedLayout = job.data
        copy = task_copy(job)
        queries = copy.read("points", task.start, task.stop)
        index = tile_index_cached(layout, copy)
        bounds = kernel_bounds(job.spec)
        computed = time.perf_counter()
        selection = blocks_to_compute(queries, job.spec, job.shape.rows, index, bounds, layout.budget)
        needed = np.unique(np.concatenate(selection.kept)) if selection.kept else np.zeros(0, np.int64)
        tiles = _source_tiles(job, copy, index, needed)
        check_copy(job, copy)  # still the copy it started reading (its caches are keyed by the copy's id)
        gradient, value, pairs = compute_blocks(queries, selection, tiles, index.counts, bounds, layout.budget,
                                                job.spec, job.mode, job.dtype, job.shape)
        compute_seconds = time.perf_counter() - computed
        check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
        still_owner = check_lease(job)
        copy.write_task(task.start, task.stop, task.index, gradient, value, pairs, job.output_id,
                        before_done=still_owner)
        return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
                "compute_seconds": compute_seconds, "pid": os.getpid(), "pairs": pairs,
                "tiles_held": int(len(needed))}


PRUNED = Pruned()


# ------------------------------------------------------------------------------------ on the workers

_INDEX: dict = {}  # copy id -> the tile index of the run's sorted sources
_CHUNKS: collections.OrderedDict = collections.OrderedDict()  # (copy id, chunk) -> (source rows, weights or None)
_LOCK = threading.Lock()  # the caches are shared by a worker's threads


def tile_index_cached(layout: SortedLayout, copy: SpatialCopy) -> TileIndex:
    with _LOCK:
        found = _INDEX.get(layout.copy_id)
    if found is None:
        found = TileIndex.from_array(copy.read("tiles"))
        with _LOCK:
            _INDEX.clear()
            _INDEX[layout.copy_id] = found
    return found


READ_RUN = 32  # chunks read at once by a worker (the read's rows are held twice while the chunks are cut)


def _source_rows(layout: SortedLayout, copy: SpatialCopy, chunks: np.ndarray) -> dict:
    """The sorted sources' chunks ``chunks`` (ascending chunk numbers) as {chunk: (rows, weights or None)},
    from this process's cache or the copy: the chunks not cached are read a run of up to :data:`READ_RUN`
    consecutive chunks at a time (one read each, the arrays opened once).  The cache keeps at most
    :data:`pipeline.plan.PRUNED_HELD_SOURCES` rows beyond what one task needs."""
    name = "sources" if layout.separate_sources else "points"
    size = layout.copy_chunk
    found, missing = {}, []
    for chunk in (int(c) for c in chunks):
        key = (layout.copy_id, chunk)
        with _LOCK:
            cached = _CHUNKS.get(key)
            if cached is not None:
                _CHUNKS.move_to_end(key)
        if cached is None:
            missing.append(chunk)
        else:
            found[chunk] = cached
    if missing:
        arrays = copy.arrays(name, "weights")
        missing = np.asarray(missing, np.int64)
        breaks = np.flatnonzero((np.diff(missing) != 1) | (np.arange(1, len(missing)) % READ_RUN == 0)) + 1
        for run in np.split(missing, breaks):  # runs of consecutive chunks, READ_RUN at most (bounded copies)
            start, stop = int(run[0]) * size, (int(run[-1]) + 1) * size
            rows = np.asarray(arrays[name][start:stop])
            weights = None if arrays["weights"] is None else np.asarray(arrays["weights"][start:stop])
            for k, chunk in enumerate(int(c) for c in run):
                part = slice(k * size, (k + 1) * size)  # copies: a cached chunk holds its own rows only
                cached = (rows[part].copy(), None if weights is None else weights[part].copy())
                with _LOCK:
                    _CHUNKS[(layout.copy_id, chunk)] = cached
                found[chunk] = cached
    with _LOCK:
        while len(_CHUNKS) * size > PRUNED_HELD_SOURCES and len(_CHUNKS) > len(found):
            _CHUNKS.popitem(last=False)
    return found


def read_sorted_sources(layout: InOrderData, copy: SpatialCopy, rows: np.ndarray,
                        dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``rows`` (ascending) of the run's sorted sources (``dim`` columns) and their weights (None: unit
    weights), through this process's chunk cache.  ``layout``: a method's task data with ``separate_sources``
    (else the sorted points are the sources), ``copy_chunk`` and ``copy_id``."""
    size = layout.copy_chunk
    needed = np.unique(rows // size)
    chunks = _source_rows(layout, copy, needed)
    # rows are ascending: each chunk's rows are one run of them, picked from that chunk alone
    cuts = np.searchsorted(rows, needed * size)
    runs = [(chunks[c], rows[a:z] - c * size) for c, a, z in zip(needed, cuts, np.append(cuts[1:], len(rows)))]
    sources = np.concatenate([chunk[0][at] for chunk, at in runs]) if runs else np.zeros((0, dim))
    weights = None
    if runs and runs[0][0][1] is not None:  # weighted run (else unit weights)
        weights = np.concatenate([chunk[1][at] for chunk, at in runs])
    return sources, weights


def _source_tiles(job: Job, copy: SpatialCopy, index: TileIndex, tiles: np.ndarray) -> SourceTiles:
    """The prepared source tiles ``tiles`` (global ids, ascending) for this task."""
    layout: SortedLayout = job.data
    rows = tile_rows(tiles, index.counts, INDEX_TILE)  # rows of the sorted sources, ascending
    sources, weights = read_sorted_sources(layout, copy, rows, len(job.center))
    return SourceTiles.build(tiles, sources, weights, job.spec, job.dtype, INDEX_TILE, np.asarray(job.center),
                             layout.sources)
