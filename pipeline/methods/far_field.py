"""The far-field method (``tolerance > 0``, rbf, D <= 3): the sources replaced by proxy sources on a regular
grid (:mod:`pipeline.proxies`), then pruned as any other sources, under the same per-query bound.

Guarantee, per query j (on top of the dtype's rounding), as for the pruned method:
``|g^_j - g_j| <= EPS * S * gmax`` and ``|v^_j - v_j| <= EPS * S * kmax`` with ``S = sum_i |w_i|``.  The
budget is split: the grid's interpolation error spends at most :data:`INTERPOLATION_SHARE` of it (the
spacing is chosen so that the rigorous bound of :func:`pipeline.proxies.interpolation_error` stays
within it), and pruning the proxies spends the rest (the pruned method's budget, with the proxies' own
``S' = sum_n |W_n|``).  ``g^`` is the exact gradient of the approximated ``v^``.

Plan: for each grid order (nodes per dimension of a source's stencil) the largest spacing within the
bound, then the order of least projected cost (the proxies' weights, ``M p^D`` terms, plus the pairs of
queries and proxies within reach); the proxies are computed (float64, once, by the client) and put in
spatial order and tiles like any sources.  The method declines, saying why, where the kernel has no
interpolation bound here (every kernel but rbf), where D > 3, where the grid would be too large, or where
it would not be faster than pruning the sources themselves (:data:`GAIN_NEEDED`).

On a cluster the run is the pruned method's, on the proxies: the sorted copy ``OUT/order/`` holds them as
its sources, with their weights and tile index, and each task reads the proxy chunks its blocks keep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..kept_tiles import Layout, compute_in_memory, make_layout
from ..plan import PRUNED_SLOWDOWN, make_plan, with_pruning
from ..proxies import (GRID_MAX_NODES, ORDERS, Grid, interpolation_error, lebesgue_constant, make_grid,
                       proxy_weights, spacing_for)
from ..pruning import kernel_bounds
from .base import ClientRun, Planned, PlanRequest
from .pruned import PRUNED, Pruned, SortedLayout, source_chunk

INTERPOLATION_SHARE = 0.5  # of the per-query budget, for the grid's interpolation error (the rest: pruning)
MAX_DIM = 3  # the grid's nodes within a query's reach grow as (reach / spacing)^D
# The proxies' weights cost about this many pair evaluations per (source, node) term (numpy bincount
# against the pruned tiles' pair rate; measured on the 2-core machine).
TERM_COST_PAIRS = 2.5
# Accept the far field only if its projected cost (pairs of queries and proxies, plus the weights' terms)
# is below this fraction of the pruned method's pairs (or of the dense run's, at the pruned per-pair cost).
GAIN_NEEDED = 0.8


@dataclass(frozen=True)
class FarFieldLayout(Layout):
    """The pruned method's layout built on the proxies (their spatial order is ``source_order``), with the
    proxies, the grid and the true sources' weight sum ``S`` that the guarantee is stated in."""

    proxies: np.ndarray = dataclasses.field(repr=False, default=None)  # (K, D) float64, input units
    proxy_weights: np.ndarray = dataclasses.field(repr=False, default=None)  # (K,) float64
    grid: Grid = None
    source_weight_sum: float = 0.0  # S of the true sources
    run_tolerance: float = 0.0  # the run's EPS (``tolerance`` is the proxies' pruning tolerance)
    interpolation: tuple = (0.0, 0.0)  # (E_v, E_g): the grid's bound, per unit of S

    @property
    def error_bounds(self) -> dict:
        return self.bounds.error_bounds(self.run_tolerance, self.source_weight_sum)


def reach(tolerance: float, dim: int, order: int) -> float:
    """Distance (lengthscales) beyond which pruning skips a query's proxies (rbf, roughly: the value tail
    ``exp(-r^2 / 2)`` of the proxies' weight ``<= Lambda^D S`` within the pruning's share of the budget)."""
    share = (1.0 - INTERPOLATION_SHARE) * tolerance / lebesgue_constant(order) ** dim
    return math.sqrt(2.0 * math.log(1.0 / share))


def choose_order(n: int, m: int, dim: int, extent: np.ndarray, tolerance: float) -> tuple[int, float, float]:
    """The grid order and spacing of least projected cost: ``(order, spacing, projected pairs)``.

    ``extent``: the sources' bounding box (lengthscales per dimension).  Cost: ``TERM_COST_PAIRS M p^D``
    for the weights, plus per query the proxies within :func:`reach` (a ball, at most the grid's nodes)."""
    best = None
    for order in ORDERS:
        spacing = spacing_for(order, dim, INTERPOLATION_SHARE * tolerance)
        nodes = float(np.prod(np.floor(extent / spacing) + order))
        radius = reach(tolerance, dim, order) + 0.5  # a query block's own size, roughly
        ball = math.pi ** (dim / 2) / math.gamma(dim / 2 + 1) * (radius / spacing) ** dim
        cost = TERM_COST_PAIRS * m * order ** dim + n * min(ball, nodes, m * order ** dim)
        if best is None or cost < best[2]:
            best = (order, spacing, cost)
    return best


class FarField(Pruned):
    name = "far_field"

    def plan(self, request: PlanRequest) -> Planned | str:
        spec, tolerance = request.spec, request.tolerance
        if tolerance <= 0:
            return "no tolerance was given: the run is exact"
        (n, dim), m = request.points.shape, request.sources.shape[0]
        if spec.name != "rbf" or request.mode != "auto" or spec.kernel.user:
            return (f"no far field for kernel {spec.describe()}: a rigorous interpolation bound is derived for "
                    f"rbf only")
        if dim > MAX_DIM:
            return f"no far field in D={dim}: its grid pays in D <= {MAX_DIM} only"
        bounds = kernel_bounds(spec)
        baseline = None if request.forced(self.name) else PRUNED.plan(request)
        base_pairs = (baseline.plan.pairs_to_compute if isinstance(baseline, Planned)
                      else n * m / PRUNED_SLOWDOWN)  # dense pairs, at the pruned per-pair cost
        sources = np.asarray(request.sources, np.float64)
        lengthscale = np.asarray(spec.lengthscale, np.float64)
        lower, upper = sources.min(axis=0), sources.max(axis=0)
        order, spacing, _ = choose_order(n, m, dim, (upper - lower) / lengthscale, tolerance)
        grid = make_grid(lower, upper, lengthscale, order, spacing)
        terms = m * order ** dim
        if grid.n_nodes > GRID_MAX_NODES:
            return (f"no far field: its grid ({order} nodes per dimension at {spacing:.3g} lengthscales) would "
                    f"have {grid.n_nodes:.3g} nodes over the sources' box, more than {GRID_MAX_NODES:.3g}")
        forced = request.forced(self.name)
        if TERM_COST_PAIRS * terms >= GAIN_NEEDED * base_pairs and not forced:
            return self._slower(TERM_COST_PAIRS * terms, base_pairs, baseline)
        proxies, weights = proxy_weights(sources, request.weights, grid)
        source_sum = float(m if request.weights is None else np.abs(np.asarray(request.weights, np.float64)).sum())
        proxy_sum = float(np.abs(weights).sum())
        if len(weights) == 0 or proxy_sum == 0.0:
            return "no far field: the sources' weights are all zero"
        interpolation = interpolation_error(order, spacing, dim)
        pruning_tolerance = (1.0 - INTERPOLATION_SHARE) * tolerance * source_sum / proxy_sum
        plan = make_plan(n, m, dim, pruned=True, **request.plan_options)
        layout = make_layout(request.points, proxies, weights, spec, pruning_tolerance, bounds, plan.rows)
        cost = layout.estimated_pairs + TERM_COST_PAIRS * terms
        if cost >= GAIN_NEEDED * base_pairs and not forced:
            return self._slower(cost, base_pairs, baseline)
        signed = bool(request.weights is not None and len(request.weights)
                      and np.min(request.weights) < 0 < np.max(request.weights))
        meta = dataclasses.replace(layout.meta, may_cancel=signed)  # the proxies' signs come from I, not w
        layout = FarFieldLayout(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(Layout)} | {"meta": meta},
                                proxies=proxies, proxy_weights=weights, grid=grid, source_weight_sum=source_sum,
                                run_tolerance=tolerance, interpolation=interpolation)
        return Planned(with_pruning(plan, tolerance, layout.estimated_pairs), layout, layout.error_bounds)

    @staticmethod
    def _slower(cost: float, base_pairs: float, baseline) -> str:
        other = "pruning" if isinstance(baseline, Planned) else "computing every pair"
        return (f"the far field would cost about {cost / 1e9:.3g} G pair evaluations against {base_pairs / 1e9:.3g} G "
                f"for {other}, so it is not used")

    def describe(self, planned: Planned) -> str:
        layout: FarFieldLayout = planned.layout
        e_v, e_g = layout.interpolation
        return (f"{len(layout.proxy_weights)} proxy sources on a grid of {layout.grid.order} nodes per dimension "
                f"per source, {layout.grid.spacing:.3g} lengthscales apart; interpolation bound {e_v:.2g} (v), "
                f"{e_g:.2g} (g) of the tolerance's {layout.run_tolerance:g}, the rest for pruning the proxies")

    def compute(self, problem, request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        layout: FarFieldLayout = problem.layout
        return compute_in_memory(request.points, layout.proxies, layout.proxy_weights, layout, problem.spec,
                                 problem.mode, problem.dtype, problem.shape, np.asarray(problem.center), threads)

    def job_data(self, request: PlanRequest, planned: Planned) -> SortedLayout:
        layout: FarFieldLayout = planned.layout
        return SortedLayout(budget=layout.budget, sources=layout.meta, separate_sources=True,
                            copy_chunk=source_chunk())

    def copy_contents(self, run: ClientRun) -> dict:
        """The points in spatial order; the proxies and their weights in theirs; the proxies' tile index."""
        layout: FarFieldLayout = run.layout
        order = layout.source_order
        return dict(point_index=layout.point_order, points=np.asarray(run.points)[layout.point_order],
                    source_index=order, sources=layout.proxies[order], weights=layout.proxy_weights[order],
                    tiles=layout.index.as_array())


FAR_FIELD = FarField()
