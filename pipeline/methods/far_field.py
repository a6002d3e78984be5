"""The far-field method (``tolerance > 0``; rbf, rational_quadratic, imq, matern12/32/52; D <= 3): sources spread
onto a regular grid, summed node to node, interpolated back at each query (:mod:`pipeline.proxies`,
:mod:`pipeline.grid_sums`, :mod:`pipeline.scale_mixtures`).  A Matern kernel is split
(:mod:`pipeline.matern_split`): its smooth part goes on the grid, and its short-range part is summed over the
pairs closer than a radius (numpy, float64, in the same tasks), the precision of the split chosen by projected
time.

Guarantee, per query j (on top of the dtype's rounding), the pruned method's:
``|g^_j - g_j| <= EPS * S * gmax`` and ``|v^_j - v_j| <= EPS * S * kmax`` with ``S = sum_i |w_i|``; ``g^``
is the exact gradient of ``v^``.  The cost is near-linear whatever the lengthscale: ``M p^D`` terms to
spread the sources, one small matrix product per dimension over the grid (rbf; an FFT convolution for the
two other kernels), ``N p^D (D + 1)`` terms to
interpolate, so it pays most where the pruned method pays least (lengthscales of a few percent of the
data's range and more).

Plan: for each grid order ``p`` (nodes per dimension of a stencil) the largest spacing whose rigorous bound
(:func:`pipeline.grid_sums.total_error`) is within EPS, then the order of least projected time over a grid
of at most :data:`GRID_MAX_NODES` nodes covering the points and sources (:data:`FFT_MAX_PADDED` FFT entries
for the kernels summed by FFT).  It declines, saying why, for kernels that are not Gaussian scale mixtures
(no bound derived), D > 3, data spanning too many lengthscales for such a grid (or an FFT whose rounding
bound leaves no room), and where it would not be faster than the pruned (or dense) method.

On a cluster the sources are spread by tasks on the workers, one per part of about
:data:`pipeline.proxies.SPREAD_PART_SOURCES` sources in the spreading order, and the client adds the parts in
order (the bits of the in-process sum, however many workers), sums the grid (numpy, float64, the FFT in
longdouble; once; a resumed run whose sorted copy is whole does not redo either) and writes the node sums into
the sorted copy ``OUT/order/grid``; each task reads its rows of the sorted points and the box of nodes their stencils touch.  Each query's
result depends on its own stencil only, so the bits do not depend on how rows are grouped into tasks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ..finite import check_finite_result
from ..grid_sums import (MIN_TOLERANCE, fft_entries, fft_rounding, box_range, interpolate, node_sums, spacing_for,
                         total_error)
from ..kept_tiles import block_boxes, tile_index_of
from ..matern_split import NEAR_SHARE, NU, TruncatedMatern, near_sums, split_for
from ..plan import Task, make_plan, project, task_rows, with_pruning
from ..proxies import GRID_MAX_NODES, ORDERS, Grid, make_grid, spread
from ..pruning import INDEX_TILE, TileIndex, box_distance, kernel_bounds
from ..scale_mixtures import GaussianMixture, mixture_for
from ..spatial import column_bounds, in_input_order, spatial_order, tile_rows
from ..task import Job, check_lease, start_task
from .base import ClientRun, Planned, PlanRequest
from .in_order import InOrderData, InSpatialOrder, task_copy
from .pruned import PRUNED, read_sorted_sources, source_chunk, tile_index_cached

MAX_DIM = 3  # the grid's nodes grow as (extent / spacing)^D
# Measured costs on the 2-core machine (numpy, float64, one core; N = 10^5, D = 3, p = 10): seconds per
# (source, node) term of the spreading, per (query, node) term of the interpolation (the value and the D
# gradient components together), and per multiply-add of the grid's matrix products.
SPREAD_SECONDS = 14e-9
INTERPOLATE_SECONDS = 8e-9
# Spreading of at least this many (source, node) terms (about 3 s of one core) is done by tasks on the run's
# workers; below, shipping the parts costs more than it saves (the GP field at 10^6, 6e7 terms: 0.3-0.7 s
# slower on the workers).  The bits are the same either way (pipeline.proxies.spread).
SPREAD_ON_WORKERS_TERMS = 2e8
NODE_SUM_SECONDS = 6e-11
GAIN_NEEDED = 0.8  # used only where its projected time is below this fraction of the next method's
# Nodes along one dimension at most: the node sums hold one (n x n) matrix per dimension.
MAX_NODES_PER_DIM = 4096
# Kernels summed by FFT (not products over dimensions): seconds per padded entry and level (log2 of the
# padded size) of the three real transforms, and at most this many padded entries (a few float64 arrays of
# that size are held at once).
FFT_SECONDS = 1.5e-8
FFT_MAX_PADDED = 1 << 26
# Matern kernels (pipeline.matern_split): the precisions T (lengthscales^-2) the plan chooses the split from,
# the seconds per close pair summed with the short-range part (numpy, float64, one core), and the sample
# that estimates how many pairs are closer than the cut-off radius.
SPLIT_THRESHOLDS = tuple(float(4 ** k) for k in range(1, 8))  # 4 .. 16384
NEAR_PAIR_SECONDS = 2e-7
NEAR_SAMPLE_QUERIES = 2000
NEAR_SAMPLE_SOURCES = 200_000
NEAR_BLOCK_ROWS = 256  # task rows whose bounding box selects the source tiles of their close pairs
# A task's fixed cost (reading its rows and box of nodes, writing its results, the scheduler) is about 17 ms
# on the 2-core machine, and interpolating a row costs p^D x 8 ns: tasks get rows for at least this many
# projected seconds (GP field at 10^6, p = 8: 62 tasks of 16384 rows 5.90 s, 16 of 65536 rows 5.27 s, medians
# of 3), but at most N / MIN_TASKS rows (pipeline.plan.task_rows).
TASK_SECONDS = 0.05


@dataclass(frozen=True)
class FarFieldLayout:
    """A far-field run's fixed data: the points' spatial order, the grid and what the plan projected."""

    point_order: np.ndarray  # (N,) int64
    grid: Grid
    kernel: GaussianMixture | TruncatedMatern
    bound: tuple  # (value, gradient): the chain's rigorous bound per unit of S (kmax, gmax units)
    near: "NearPart | None" = None  # Matern kernels: the close pairs' short-range part


@dataclass(frozen=True)
class NearPart:
    """The short-range part of a split Matern kernel (:mod:`pipeline.matern_split`): the pairs closer than
    ``radius`` lengthscales, found through the tile index of the sources in spatial order."""

    radius: float
    source_order: np.ndarray | None  # (M,) int64; None: the points are the sources (point_order)
    index: TileIndex
    estimated_pairs: float


@dataclass(frozen=True)
class FarFieldData(InOrderData):
    """What the tasks need beyond the :class:`Job`: the grid (origin, step, order, shape)."""

    grid: Grid = None
    kernel: GaussianMixture | TruncatedMatern = None
    radius: float = 0.0  # > 0: Matern kernels' close pairs (pipeline.matern_split), read from the sorted sources
    separate_sources: bool = False  # OUT/order/sources (else the sorted points are the sources)


def node_sum_seconds(grid: Grid, kernel: GaussianMixture) -> float:
    """Projected seconds of :func:`pipeline.grid_sums.node_sums` on one core."""
    if kernel.separable:
        return grid.n_nodes * sum(grid.shape) * NODE_SUM_SECONDS
    padded = fft_entries(grid.shape)
    return padded * np.log2(padded) * FFT_SECONDS


def projected_seconds(n: int, m: int, grid: Grid, kernel: GaussianMixture,
                      parallel: int, near_pairs: float = 0.0) -> tuple[float, float]:
    """(seconds before the tasks: spreading and node sums on one core (on a cluster the spreading is shared by
    the workers: an upper bound), task seconds: interpolation and close pairs over ``parallel`` workers)."""
    stencil = grid.stencil_size
    client = m * stencil * SPREAD_SECONDS + node_sum_seconds(grid, kernel)
    return client, (n * stencil * INTERPOLATE_SECONDS + near_pairs * NEAR_PAIR_SECONDS) / max(1, parallel)


def far_field_task_rows(n: int, grid: Grid, near_pairs: float, multiple: int, default: int) -> int:
    """Rows per task (:func:`pipeline.plan.task_rows`): enough for :data:`TASK_SECONDS` of projected
    interpolation and close pairs."""
    per_row = grid.stencil_size * INTERPOLATE_SECONDS + near_pairs / max(n, 1) * NEAR_PAIR_SECONDS
    return task_rows(n, per_row, TASK_SECONDS, multiple, default)


def near_pair_counter(points: np.ndarray, point_order: np.ndarray, sources: np.ndarray, source_order: np.ndarray,
                      lengthscale: np.ndarray):
    """A function ``radius -> estimated pairs`` (query, source) closer than ``radius`` lengthscales: counted for
    :data:`NEAR_SAMPLE_QUERIES` queries against every k-th source (at most :data:`NEAR_SAMPLE_SOURCES`) and
    scaled up.  Evenly spaced rows of the spatial orders: the estimate, and so the plan, depends neither on
    chance nor on the input's row order."""
    from scipy.spatial import cKDTree

    n, m = len(points), len(sources)
    picked = point_order[np.linspace(0, n - 1, min(n, NEAR_SAMPLE_QUERIES)).astype(np.int64)]
    queries = np.asarray(points[picked], np.float64) / lengthscale
    step = max(1, -(-m // NEAR_SAMPLE_SOURCES))
    kept = np.asarray(sources[source_order[::step]], np.float64) / lengthscale
    tree = cKDTree(kept)
    scale = (n / len(queries)) * (m / len(kept))

    def pairs(radius: float) -> float:
        return float(tree.query_ball_point(queries, radius, return_length=True).sum()) * scale

    return pairs


def choose_split(lower: np.ndarray, upper: np.ndarray, lengthscale: np.ndarray, n: int, m: int,
                 tolerance: float, spec, count_pairs) -> tuple[Grid, float, TruncatedMatern, float, float] | str:
    """A Matern kernel split at the precision of :data:`SPLIT_THRESHOLDS` of least projected work (one worker):
    its smooth part's grid (within ``(1 - NEAR_SHARE) tolerance``) and node rounding, the split kernel, the
    close pairs' radius (their cut-off within ``NEAR_SHARE tolerance``) and the estimated close pairs; or why
    there is none."""
    best, why = None, None
    for threshold in SPLIT_THRESHOLDS:
        kernel = split_for(spec.name, spec.variance, threshold)
        found = choose_grid(lower, upper, lengthscale, n, m, tolerance * (1.0 - NEAR_SHARE), kernel)
        if isinstance(found, str):
            why = why or found
            continue
        radius = kernel.near_radius(tolerance * NEAR_SHARE)
        pairs = count_pairs(radius)
        seconds = sum(projected_seconds(n, m, found[0], kernel, 1, pairs))
        if best is None or seconds < best[0]:
            best = (seconds, (found[0], found[1], kernel, radius, pairs))
    if best is None:
        return (f"{why} (the smooth part of {spec.name}, split at every precision from {SPLIT_THRESHOLDS[0]:g} to "
                f"{SPLIT_THRESHOLDS[-1]:g} per lengthscale^2, gets {1 - NEAR_SHARE:g} of the tolerance)")
    return best[1]


def grid_for(order: int, lower: np.ndarray, upper: np.ndarray, lengthscale: np.ndarray, kernel: GaussianMixture,
             tolerance: float) -> tuple[Grid, float] | str:
    """The grid of ``order`` with the largest spacing whose whole-chain bound is within ``tolerance`` and its
    node sums' extra rounding (FFT kernels: the spacing is found again with twice the first grid's FFT
    rounding counted, and kept if the finer grid's own rounding is within that), or why there is none."""
    dim = len(lower)
    spacing = spacing_for(order, dim, tolerance, kernel)
    if spacing is None:
        return "no spacing meets the bound"
    grid = make_grid(lower, upper, lengthscale, order, spacing)
    if kernel.separable or too_large(grid, kernel):  # (too large: choose_grid skips it, naming its size)
        return grid, 0.0
    allowance = 2.0 * fft_rounding(grid, kernel)
    first = grid
    spacing = spacing_for(order, dim, tolerance, kernel, allowance)
    if spacing is not None:
        grid = make_grid(lower, upper, lengthscale, order, spacing)
        rounding = fft_rounding(grid, kernel)
        if rounding <= allowance:
            return grid, rounding
    return (f"the FFT's rounding over a grid of {first.n_nodes:.3g} nodes ({allowance / 2:.2g} S' kmax at each node, "
            f"amplified by the interpolation's derivative) leaves no room for the interpolation within the bound")


def too_large(grid: Grid, kernel: GaussianMixture) -> bool:
    if grid.n_nodes > GRID_MAX_NODES or max(grid.shape) > MAX_NODES_PER_DIM:
        return True
    return not kernel.separable and fft_entries(grid.shape) > FFT_MAX_PADDED


def choose_grid(lower: np.ndarray, upper: np.ndarray, lengthscale: np.ndarray, n: int, m: int,
                tolerance: float, kernel: GaussianMixture) -> tuple[Grid, float] | str:
    """The grid of least projected work (one worker: the choice, and so the bits, do not depend on the
    cluster) whose bound is within ``tolerance``, with its node sums' extra rounding, or why there is none."""
    best, smallest, why = None, None, "no grid meets the bound"
    for order in ORDERS:
        found = grid_for(order, lower, upper, lengthscale, kernel, tolerance)
        if isinstance(found, str):
            why = found if "FFT" in found else why
            continue
        grid = found[0]
        smallest = grid if smallest is None or grid.n_nodes < smallest.n_nodes else smallest
        if too_large(grid, kernel):
            continue
        seconds = sum(projected_seconds(n, m, grid, kernel, 1))
        if best is None or seconds < best[0]:
            best = (seconds, found)
    if best is None:
        limits = (f"at most {GRID_MAX_NODES:.3g}, and {MAX_NODES_PER_DIM} along a dimension" if kernel.separable else
                  f"at most {FFT_MAX_PADDED:.3g} entries in its FFT for {kernel.name}")
        size = why if smallest is None else (
            f"its grid would need at least {smallest.n_nodes:.3g} nodes ({' x '.join(map(str, smallest.shape))}) over "
            f"the data's box ({limits})")
        return f"no far field: {size}: the data span too many lengthscales at tolerance {tolerance:g}"
    return best[1]


class FarField(InSpatialOrder):
    name = "far_field"
    workers_use_jax = False  # interpolation and close pairs in numpy

    def plan(self, request: PlanRequest) -> Planned | str:
        spec, tolerance = request.spec, request.tolerance
        if tolerance <= 0:
            return "no tolerance was given: the run is exact"
        (n, dim), m = request.points.shape, request.sources.shape[0]
        split = spec.name in NU  # a Matern kernel: its smooth part on the grid, its short-range part by pairs
        kernel = None if split else mixture_for(spec)
        if isinstance(kernel, str):
            return kernel
        if request.mode != "auto":
            return f"no far field in mode {request.mode!r}: that mode asks for the tiles' autodiff"
        if dim > MAX_DIM:
            return f"no far field in D={dim}: its grid pays in D <= {MAX_DIM} only"
        if tolerance < MIN_TOLERANCE:
            return (f"no far field below tolerance {MIN_TOLERANCE:g}: the float64 rounding of its grid sums is "
                    f"bounded only above that")
        plan = make_plan(n, m, dim, pruned=True, **request.plan_options)
        lengthscale = np.asarray(spec.lengthscale, np.float64)
        points = np.asarray(request.points, np.float64)
        sources = points if request.sources_are_points else np.asarray(request.sources, np.float64)
        (lower, upper), (source_lower, source_upper) = column_bounds(points), column_bounds(sources)
        lower, upper = np.minimum(lower, source_lower), np.maximum(upper, source_upper)
        near_pairs, radius, point_order = 0.0, 0.0, None
        if split:  # the spatial orders first: the close pairs' sample is taken in them
            point_order = self._point_order(request)
            weights = None if request.weights is None else np.asarray(request.weights, np.float64)
            source_order = None if request.sources_are_points else spatial_order(sources, spec.lengthscale,
                                                                                 weights)
            x_order = point_order if source_order is None else source_order
            found = choose_split(lower, upper, lengthscale, n, m, tolerance, spec,
                                 near_pair_counter(points, point_order, sources, x_order, lengthscale))
            if isinstance(found, str):
                return found
            grid, rounding, kernel, radius, near_pairs = found
        else:
            found = choose_grid(lower, upper, lengthscale, n, m, tolerance, kernel)
            if isinstance(found, str):
                return found
            grid, rounding = found
        if request.plan_options.get("rows_per_task") is None:
            rows = far_field_task_rows(n, grid, near_pairs, plan.rows, plan.rows_per_task)
            plan = make_plan(n, m, dim, pruned=True, **{**request.plan_options, "rows_per_task": rows})
        client, tasks = projected_seconds(n, m, grid, kernel, plan.parallel, near_pairs)
        if not request.forced(self.name):
            baseline = PRUNED.plan(request)
            other = baseline.plan if isinstance(baseline, Planned) else None
            name = "pruning"
            if other is None:  # the dense method's projection
                other = with_pruning(make_plan(n, m, dim, **request.plan_options), tolerance, None)
                name = "computing every pair"
            # Compared as one worker's work, so that the choice does not depend on the cluster (the API and
            # `kgrad run` on any number of workers choose alike).
            other_seconds = project(other).compute_seconds * other.parallel
            work = sum(projected_seconds(n, m, grid, kernel, 1, near_pairs))
            if work >= GAIN_NEEDED * other_seconds:
                return (f"the far field would take about {work:.3g} s of one core against {other_seconds:.3g} s for "
                        f"{name}, so it is not used")
        stencil = grid.stencil_size
        close = f" and {near_pairs / 1e9:.3g} G close pairs" if split else ""
        terms = (f"{m * stencil / 1e9:.3g} G spreading terms and {grid.n_nodes:.3g} grid nodes before the tasks "
                 f"({client:.3g} s on one core) + {n * stencil / 1e9:.3g} G interpolation terms{close} / "
                 f"{plan.parallel} worker{'s' if plan.parallel != 1 else ''} ({tasks:.3g} s)")
        plan = dataclasses.replace(plan, tolerance=tolerance, estimated_pairs=int(n * stencil + near_pairs),
                                   estimated_seconds=client + tasks, method_cost=(client + tasks, terms))
        if point_order is None:
            point_order = self._point_order(request)
        bound = total_error(grid.order, grid.spacing, dim, kernel, rounding)
        near = None
        if split:
            index = tile_index_of(sources, x_order, None if weights is None else weights[x_order], lengthscale,
                                  INDEX_TILE)
            near = NearPart(radius, source_order, index, near_pairs)
            bound = tuple(b + e for b, e in zip(bound, kernel.cut_off_error(radius)))
        layout = FarFieldLayout(point_order, grid, kernel, bound, near)
        weight_sum = float(m if request.weights is None else np.abs(np.asarray(request.weights, np.float64)).sum())
        return Planned(plan, layout, kernel_bounds(spec).error_bounds(tolerance, weight_sum))

    def _point_order(self, request: PlanRequest) -> np.ndarray:
        """The points' spatial order: the pruned method's (it plans first unless this method is forced, and
        computes the order declined or not), else as it would compute it."""
        order = None
        if not request.forced(self.name):
            PRUNED.plan(request)  # kept for the comparison below: planned once
            order = PRUNED.point_order(request)
        if order is None:
            order = spatial_order(request.points, request.spec.lengthscale,
                                  request.weights if request.sources_are_points else None)
        return order

    def describe(self, planned: Planned) -> str:
        layout: FarFieldLayout = planned.layout
        grid = layout.grid
        e_v, e_g = layout.bound
        sums = "matrix products" if layout.kernel.separable else "an FFT convolution"
        what = "sources"
        close = ""
        if layout.near is not None:
            what = f"the kernel's smooth part (precisions up to {layout.kernel.threshold:g} / lengthscale^2): sources"
            close = (f"; its short-range part summed over the pairs closer than {layout.near.radius:.3g} "
                     f"lengthscales (about {layout.near.estimated_pairs:.3g})")
        return (f"{what} spread on a grid of {' x '.join(map(str, grid.shape))} nodes, {grid.spacing:.3g} "
                f"lengthscales apart, {grid.order} per dimension per point, summed by {sums}{close}; bound "
                f"{e_v:.2g} S kmax (v), {e_g:.2g} S gmax (g)")

    def compute(self, problem, request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        layout: FarFieldLayout = problem.layout
        sources = request.points if request.sources_are_points else request.sources
        sums = grid_node_sums(sources, request.weights, layout)
        order = layout.point_order
        queries = np.asarray(request.points)[order]
        g, v = interpolate(queries, sums, layout.grid)
        pairs = len(queries) * layout.grid.stencil_size
        near = layout.near
        if near is not None:  # every sorted source, in the order the tasks read them
            x_order = order if near.source_order is None else near.source_order
            weights = None if request.weights is None else np.asarray(request.weights, np.float64)[x_order]
            g_near, v_near, close = near_sums(queries, np.asarray(sources)[x_order], weights, layout.kernel,
                                              request.spec.lengthscale, near.radius)
            g, v, pairs = g + g_near, v + v_near, pairs + close
        g, v = g.astype(problem.dtype), v.astype(problem.dtype)
        return in_input_order(g, order), in_input_order(v, order), int(pairs)

    def job_data(self, request: PlanRequest, planned: Planned) -> FarFieldData:
        layout: FarFieldLayout = planned.layout
        if layout.near is None:
            return FarFieldData(grid=layout.grid, kernel=layout.kernel)
        return FarFieldData(grid=layout.grid, kernel=layout.kernel, radius=layout.near.radius,
                            separate_sources=not request.sources_are_points, copy_chunk=source_chunk())

    def copy_contents(self, run: ClientRun) -> dict:
        """The points in spatial order and the grid's node sums (spread and summed here, once)."""
        layout: FarFieldLayout = run.layout
        order = layout.point_order
        sources = run.points if run.sources is None else run.sources
        terms = len(sources) * layout.grid.stencil_size
        on_workers = run.map_on_workers if terms >= SPREAD_ON_WORKERS_TERMS else None  # the same bits either way
        sums = grid_node_sums(sources, run.weights, layout, on_workers)
        contents = dict(point_index=order, points=np.asarray(run.points)[order], source_index=None, sources=None,
                        weights=None, tiles=None, grid=sums.reshape(layout.grid.shape))
        near = layout.near
        if near is not None:  # the sources in spatial order and their tile index, for the close pairs
            x_order = order if near.source_order is None else near.source_order
            if near.source_order is not None:
                contents.update(source_index=x_order, sources=np.asarray(run.sources)[x_order])
            if run.weights is not None:
                contents["weights"] = np.asarray(run.weights, np.float64)[x_order]
            contents["tiles"] = near.index.as_array()
        return contents

    def run_task(self, job: Job, task: Task) -> dict:
        """Rows ``[task.start, task.stop)`` of the sorted points, interpolated from the node sums their
        stencils touch (read from the run's sorted copy)."""
        started = time.perf_counter()
        start_task(job)
        grid = job.data.grid
        copy = task_copy(job)
        queries = copy.read("points", task.start, task.stop)
        lower, upper = box_range(queries, grid)
        sums = copy.read_box("grid", lower, upper)
        computed = time.perf_counter()
        g, v = interpolate(queries, sums, grid, lower)
        pairs = task.rows * grid.stencil_size
        if job.data.radius > 0:
            sources, weights = close_sources(job, copy, queries)
            g_near, v_near, close = near_sums(queries, sources, weights, job.data.kernel, job.spec.lengthscale,
                                              job.data.radius)
            g, v, pairs = g + g_near, v + v_near, pairs + close
        gradient, value = g.astype(job.dtype), v.astype(job.dtype)
        compute_seconds = time.perf_counter() - computed
        check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
        still_owner = check_lease(job)
        copy.write_task(task.start, task.stop, task.index, gradient, value, pairs, job.output_id,
                        before_done=still_owner)
        return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
                "compute_seconds": compute_seconds, "pid": os.getpid(), "pairs": pairs,
                "nodes_read": int(np.prod(upper - lower))}


def close_sources(job: Job, copy, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The sorted sources (and weights) of the tiles within the close pairs' radius of some block of
    :data:`NEAR_BLOCK_ROWS` of ``queries``, ascending in the sorted order (what :func:`near_sums` needs)."""
    index = tile_index_cached(job.data, copy)
    radius = job.data.radius
    lower, upper = block_boxes(queries, job.spec, NEAR_BLOCK_ROWS)
    task_lower, task_upper = lower.min(axis=0), upper.max(axis=0)
    candidates = np.flatnonzero(box_distance(task_lower, task_upper, index.lower, index.upper) <= radius * (1.0 + 1e-9))
    keep = np.zeros(len(candidates), bool)
    for start in range(0, len(lower), 64):  # (blocks x candidate tiles) distances, 64 blocks at a time
        near = box_distance(lower[start:start + 64, None], upper[start:start + 64, None],
                            index.lower[candidates][None], index.upper[candidates][None]) <= radius * (1.0 + 1e-9)
        keep |= near.any(axis=0)
    rows = tile_rows(candidates[keep], index.counts, INDEX_TILE)
    return read_sorted_sources(job.data, copy, rows, queries.shape[1])


def grid_node_sums(sources: np.ndarray, weights: np.ndarray | None, layout: FarFieldLayout,
                   map_parts=None) -> np.ndarray:
    """The node sums ``U`` of a run (flat, float64): its sources spread on the layout's grid (in parts on the
    run's workers with ``map_parts``, :func:`pipeline.proxies.spread`: the same bits), summed node to node
    with its kernel.  The one place both the in-process run and the cluster's client compute them."""
    return node_sums(spread(sources, weights, layout.grid, map_parts), layout.grid, layout.kernel)


FAR_FIELD = FarField()
