"""Error-bounded pruning (``kernel_gradients(..., tolerance=EPS)``, ``pipeline.pruning``, ``pipeline.methods.pruned``).

The contract, per query j (``S = sum_i |w_i|``; ``kmax = max k``, ``gmax = max |grad_q k|`` over all pairs, i.e.
``variance * f(0)`` and ``variance * sup |f'(r)| / l_min`` for a radial profile ``f`` of r in lengthscales):

    |g^_j - g_j| <= EPS * S * gmax          |v^_j - v_j| <= EPS * S * kmax

on top of the dtype's own rounding.  Everything is checked in float64 against the independent numpy oracle
(``reference.py``), allowing the bound plus a rounding slack of ``SLACK * max|g_ref|`` (``SLACK = 1e-10``, the
float64 accuracy of the dense path), never more.  ``kmax`` and ``gmax`` are computed here from numpy formulas of
the profiles (:func:`profile`), never taken from the module's tables; the bound the run reports
(``layout.error_bounds``) must agree with them.

* the bound on adversarial layouts (tight cluster, integer grids, exact duplicates, a far outlier, mixed-sign
  weights, ARD, data 1e6 from the origin, queries != sources, D = 1 and D = 5), every pruning kernel, three
  tolerances; pruned results also against the dense kgrad run, and where the run falls back to every pair,
  the dense run's bits;
* a layout built to sit *at* the bound (90% of it by construction, over two super-tiles);
* hypothesis: random layouts, weights, kernel parameters and tolerances in [1e-12, 1e-2];
* units of ``pipeline.pruning``: ``kernel_bounds`` (kmax, gmax, tails), ``select_tiles`` (never over budget)
  and tolerance validation;
* kernels and modes that do not prune: a tolerance gives the same bits as none;
* determinism: the same call twice, and permuted input rows.

Sizes: at most 1536 rows per case, so that the oracle stays cheap; the pruned tiles are 256 x 256 whatever N,
so compiled functions are shared.  The full layout x kernel product is ``slow``; the default suite runs one or
two kernels per layout (every kernel at least once).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import reference_gradients

import pipeline  # noqa: E402  (an import error must fail, never skip)
from pipeline.errors import InputError
from pipeline.kernels import make_spec
from pipeline.plan import PRUNED_TILES
from pipeline.problem import make_problem
import pipeline.methods.pruned  # noqa: E402
from pipeline.kept_tiles import compute_in_memory
from pipeline.pruning import (FAR_SHARE, LEVEL_ONE_SHARE, LEVEL_TWO_SHARE, SHRINK, SUPER_TILES, TABLE_MAX, TABLE_MIN, Budget,
                              TileIndex, box_distance, kernel_bounds, point_box_distance, prunes, select_sources,
                              select_sources_of_blocks, select_tiles, tile_index)

# The default suite runs a sample of each parametrised test (each parameter value at least once); --runslow all.
pytestmark = pytest.mark.sampled(4)

@pytest.fixture(autouse=True)
def prune_small_problems(monkeypatch, request):
    """These layouts are small (a few thousand points), so pruning often leaves more of the pairs than
    pipeline.methods.pruned.DENSE_ABOVE, where a real run computes every pair the dense way instead.  The bound is
    what is tested here, so the pruned path runs up to 95% of the pairs (a run with nothing to prune still
    falls back); the fallback itself is tested with the real threshold."""
    if "real_threshold" not in request.keywords:
        monkeypatch.setattr(pipeline.methods.pruned, "DENSE_ABOVE", 0.95)

kernel_gradients = pipeline.kernel_gradients

PRUNING = ("rbf", "matern12", "matern32", "matern52", "rational_quadratic", "imq")
HEAVY = ("rational_quadratic", "imq")  # power-law tails: need data spread over far more lengthscales
PARAMS = {"rational_quadratic": {"alpha": 0.7}, "imq": {"c": 1.3, "beta": 0.8}}
SLACK = 1e-10  # float64 rounding allowance, times max |g_ref| (max |v_ref|): the dense path's float64 accuracy
TILE = PRUNED_TILES[1]  # sources per tile of a pruned run (256)
SQRT3, SQRT5 = math.sqrt(3.0), math.sqrt(5.0)


# --- the kernels' profiles, written here from the formulas (numpy, float64) ------------------------------------


def profile(kernel, r, params=None):
    """(f(r), |f'(r)|) at variance 1, r the distance in lengthscales (array)."""
    p = {**{"alpha": 1.0, "c": 1.0, "beta": 0.5}, **(params or {})}
    r = np.asarray(r, np.float64)
    if kernel == "rbf":
        f = np.exp(-0.5 * r * r)
        return f, r * f
    if kernel == "matern12":
        f = np.exp(-r)
        return f, f
    if kernel == "matern32":
        e = np.exp(-SQRT3 * r)
        return (1.0 + SQRT3 * r) * e, 3.0 * r * e
    if kernel == "matern52":
        e = np.exp(-SQRT5 * r)
        return (1.0 + SQRT5 * r + 5.0 * r * r / 3.0) * e, (5.0 / 3.0) * r * (1.0 + SQRT5 * r) * e
    if kernel == "rational_quadratic":
        a = p["alpha"]
        base = 1.0 + r * r / (2.0 * a)
        return base ** -a, r * base ** (-a - 1.0)
    if kernel == "imq":
        c, b = p["c"], p["beta"]
        base = c * c + r * r
        return base ** -b, 2.0 * b * r * base ** (-b - 1.0)
    raise ValueError(kernel)


_GRID = np.concatenate([[0.0], np.geomspace(1e-12, 1e9, 200_001)])


def kernel_maxima(kernel, params=None):
    """(kmax, sup |f'|) at variance 1: f(0), and |f'| maximised on a dense grid refined around its peak."""
    slope = profile(kernel, _GRID, params)[1]
    i = int(np.argmax(slope))
    fine = np.linspace(_GRID[max(i - 1, 0)], _GRID[min(i + 1, len(_GRID) - 1)], 20_001)
    return float(profile(kernel, 0.0, params)[0]), float(max(slope.max(), profile(kernel, fine, params)[1].max()))


def contract_bounds(kernel, params, tolerance, weights, n_sources, lengthscale, variance=1.0):
    """(gradient bound, value bound) of the contract, from the numpy profiles."""
    weight_sum = float(np.abs(weights).sum()) if weights is not None else float(n_sources)
    kmax, slope_max = kernel_maxima(kernel, params)
    l_min = float(np.min(lengthscale))
    return tolerance * weight_sum * variance * slope_max / l_min, tolerance * weight_sum * variance * kmax


# --- running one case -------------------------------------------------------------------------------------------


def as_2d(a):
    a = np.asarray(a)
    return a[:, None] if a.ndim == 1 else a


def make(q, x, w, kernel, lengthscale, tolerance, variance=1.0, method="auto"):
    """The problem kgrad solves for these inputs (float64): its layout says whether and how it prunes."""
    q2 = as_2d(q)
    return make_problem(q2, q2 if x is None else as_2d(x), kernel=kernel, lengthscale=lengthscale,
                        variance=variance, params=PARAMS.get(kernel, {}), dtype="float64", tolerance=tolerance,
                        weights=None if w is None else np.asarray(w, np.float64), sources_are_points=x is None,
                        method=method)


def run(q, x, w, kernel, lengthscale, tolerance, variance=1.0, dtype="float64", method="auto"):
    g, v = kernel_gradients(q, x, w, kernel=kernel, lengthscale=lengthscale, variance=variance, dtype=dtype,
                            tolerance=tolerance, return_value=True, method=method, **PARAMS.get(kernel, {}))
    return as_2d(g), v


def row_norms(g):
    return np.linalg.norm(as_2d(g), axis=1)


def check_within(label, g, v, g_ref, v_ref, bound_g, bound_v):
    """Per query: |g - g_ref| <= bound_g + SLACK max|g_ref|, |v - v_ref| <= bound_v + SLACK max|v_ref|.
    Returns the errors as fractions of the bounds."""
    err_g = float(row_norms(g - g_ref).max())
    err_v = float(np.abs(v - v_ref).max())
    slack_g = SLACK * float(row_norms(g_ref).max())
    slack_v = SLACK * float(np.abs(v_ref).max())
    assert err_g <= bound_g + slack_g, (f"{label}: gradient error {err_g:.6e} > bound {bound_g:.6e} "
                                        f"(+ rounding {slack_g:.1e}): {err_g / bound_g:.4g} x the bound")
    assert err_v <= bound_v + slack_v, (f"{label}: value error {err_v:.6e} > bound {bound_v:.6e} "
                                        f"(+ rounding {slack_v:.1e}): {err_v / bound_v:.4g} x the bound")
    return err_g / bound_g, err_v / bound_v


def check_reported_bounds(problem, bound_g, bound_v):
    """The bound the run reports is the contract's (to the resolution of the module's table: its sup |f'| is
    read on a grid, so it may be a little below the true sup, never above)."""
    reported = problem.layout.error_bounds
    assert bound_v * (1 - 1e-12) <= reported["value"] <= bound_v * (1 + 1e-12), (reported, bound_v)
    assert bound_g * (1 - 2e-4) <= reported["gradient"] <= bound_g * (1 + 1e-9), (reported, bound_g)


# --- 1. adversarial layouts -------------------------------------------------------------------------------------
# Each returns (points, sources or None, weights, lengthscale); coordinates in the points' units.  Clusters of
# TILE points (one tile each) at distances spread geometrically over many lengthscales, so pruning happens.


def _directions(rng, n, dim):
    u = rng.normal(size=(n, dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _clusters(rng, n, dim, near=8.0, far=1e5, width=1.0, per=TILE):
    centres = _directions(rng, n, dim) * np.geomspace(near, far, n)[:, None]
    return (centres[:, None, :] + width * rng.normal(size=(n, per, dim))).reshape(-1, dim)


def tight_cluster_plus_far(kernel):
    """One tile's worth of points within 1e-7 lengthscales of each other, and five clusters up to 1e5 away."""
    rng = np.random.default_rng(1)
    tight = 0.5 + 1e-7 * rng.normal(size=(TILE, 2))
    pts = np.concatenate([tight, _clusters(rng, 5, 2)])
    return pts, None, rng.uniform(0.5, 1.5, len(pts)), 1.0


def integer_grid_1d(kernel):
    """1536 integers: tile and block boxes end exactly on grid points, 4 (heavy tails: 100) lengthscales apart."""
    return np.arange(1536.0), None, None, (0.01 if kernel in HEAVY else 0.25)


def integer_grid_2d(kernel):
    """A 64 x 32 integer grid (Morton tiles are 16 x 16 squares whose borders are grid lines), chequered
    weights 1 and 0.25."""
    grid = np.stack(np.meshgrid(np.arange(64.0), np.arange(32.0), indexing="ij"), -1).reshape(-1, 2)
    return grid, None, np.where(grid.sum(1) % 2 == 0, 1.0, 0.25), (0.01 if kernel in HEAVY else 0.2)


def duplicates(kernel):
    """Exact duplicates: 512, 256, 256, 128 and 256 copies of five points 0 to 6e4 lengthscales apart (tiles of
    one repeated point, and two tiles with the same box), a cluster; weights -1, 0.5 and 2.  (Heavy tails:
    lengthscale 0.1.)"""
    rng = np.random.default_rng(3)
    spots = _directions(rng, 5, 2) * np.array([0.0, 6.0, 60.0, 600.0, 6e4])[:, None]
    copies = np.repeat(spots, [512, 256, 256, 128, 256], axis=0)
    pts = np.concatenate([copies, _clusters(rng, 1, 2, 3e3, 3e3, per=128)])
    return pts, None, rng.choice([-1.0, 0.5, 2.0], len(pts)), (0.1 if kernel in HEAVY else 1.0)


def far_outlier(kernel):
    """Six clusters within 300 lengthscales, one point 1e6 away: the last tile's box (and the Morton grid's cell)
    is huge.  (Heavy tails: lengthscale 0.1.)"""
    rng = np.random.default_rng(4)
    pts = np.concatenate([_clusters(rng, 6, 2, 8.0, 300.0, per=250), [[1e6, -1e6]]])
    return pts, None, rng.uniform(0.5, 1.5, len(pts)), (0.1 if kernel in HEAVY else 1.0)


def mixed_weights(kernel):
    """Normal weights, every 7th multiplied by -50 (sums cancel), D = 3."""
    rng = np.random.default_rng(5)
    pts = _clusters(rng, 6, 3, width=1.5)
    w = rng.normal(size=len(pts))
    w[::7] *= -50.0
    return pts, None, w, 1.0


def ard(kernel):
    """ARD lengthscales 1e-3, 1, 1e3 on clusters laid out in lengthscales (the bound uses the smallest)."""
    rng = np.random.default_rng(6)
    ls = np.array([1e-3, 1.0, 1e3])
    return _clusters(rng, 6, 3) * ls, None, rng.uniform(-0.5, 1.5, 6 * TILE), ls


def offset_1e6(kernel):
    """Clusters 2e6 lengthscales from the origin, normal weights."""
    rng = np.random.default_rng(7)
    return 1e6 + 0.5 * _clusters(rng, 6, 2, far=1e4), None, rng.normal(size=6 * TILE), 0.5


def separate(kernel):
    """Queries != sources: four query clusters near four of six source clusters, one far from all of them."""
    rng = np.random.default_rng(8)
    centres = _directions(rng, 6, 2) * np.geomspace(8.0, 1e5, 6)[:, None]
    src = (centres[:, None, :] + rng.normal(size=(6, TILE, 2))).reshape(-1, 2)
    q = np.concatenate([(centres[:4, None, :] + 2.0 * rng.normal(size=(4, TILE, 2))).reshape(-1, 2),
                        3e5 + rng.normal(size=(TILE, 2))])
    return q, src, rng.uniform(-1.0, 1.0, len(src)), 1.0


def d1_clusters(kernel):
    """D = 1 (points given as a vector): clusters on both sides of the origin, weights in [-1, 2]."""
    rng = np.random.default_rng(9)
    centres = np.geomspace(8.0, 1e5, 6) * rng.choice([-1.0, 1.0], 6)
    return (centres[:, None] + rng.normal(size=(6, TILE))).reshape(-1), None, rng.uniform(-1.0, 2.0, 6 * TILE), 1.0


def d5_clusters(kernel):
    """D = 5, ARD lengthscales 0.5 to 2."""
    rng = np.random.default_rng(10)
    return _clusters(rng, 6, 5), None, rng.uniform(0.5, 1.5, 6 * TILE), [0.5, 1.0, 2.0, 1.0, 1.5]


LAYOUTS = {f.__name__: f for f in (tight_cluster_plus_far, integer_grid_1d, integer_grid_2d, duplicates, far_outlier,
                                   mixed_weights, ard, offset_1e6, separate, d1_clusters, d5_clusters)}
# The default suite: one kernel per layout, every kernel at least once; the rest is slow (--runslow).
DEFAULT_CASES = {
    ("tight_cluster_plus_far", "rbf"), ("integer_grid_1d", "matern12"),
    ("integer_grid_2d", "imq"), ("duplicates", "rational_quadratic"), ("far_outlier", "matern12"),
    ("mixed_weights", "matern32"), ("ard", "rational_quadratic"), ("offset_1e6", "matern52"), ("separate", "rbf"),
    ("d1_clusters", "imq"), ("d5_clusters", "matern32"),
}
# BUG (dense float64 path, not pruning; see test_float64_near_duplicates_far_from_the_sources_centre): matern12
# on the tight cluster is off by 3e-5 x max|g| at every tolerance, tolerance 0 included.
KNOWN_FLOAT64_BUG = {("tight_cluster_plus_far", "matern12")}
TOLERANCES = (1e-3, 1e-6, 1e-9)


def _layout_cases():
    for layout in LAYOUTS:
        for kernel in PRUNING:
            marks = [] if (layout, kernel) in DEFAULT_CASES else [pytest.mark.slow]
            if (layout, kernel) in KNOWN_FLOAT64_BUG:
                marks.append(pytest.mark.xfail(strict=True, reason="BUG: dense float64 path, matern12 on a "
                                                                   "1e-7-wide cluster far from the sources' centre"))
            yield pytest.param(layout, kernel, marks=marks, id=f"{layout}-{kernel}")


@pytest.mark.parametrize("layout,kernel", list(_layout_cases()))
def test_bound_on_adversarial_layouts(layout, kernel):
    """Tolerances 1e-3, 1e-6, 1e-9: the bound against the oracle and against the dense kgrad run; at 1e-3 the
    run prunes (fewer pairs, counted exactly), and where it does not prune it gives the dense run's bits."""
    q, x, w, ls = LAYOUTS[layout](kernel)
    params = PARAMS.get(kernel, {})
    g_ref, v_ref = reference_gradients(q, x, w, kernel, ls, 1.0, **params)
    g_ref = as_2d(g_ref)
    g_dense, v_dense = run(q, x, w, kernel, ls, 0.0)
    n, m = len(q), len(q if x is None else x)
    for tolerance in TOLERANCES:
        label = f"{layout} {kernel} tolerance={tolerance:g}"
        problem = make(q, x, w, kernel, ls, tolerance)
        g, v = run(q, x, w, kernel, ls, tolerance)
        if tolerance == TOLERANCES[0]:
            assert problem.pruned, f"{label}: not pruned ({problem.plan.exact_reason})"
        if not problem.pruned:  # every pair, the dense way: the same bits as no tolerance
            assert problem.plan.exact_reason
            assert np.array_equal(g, g_dense) and np.array_equal(v, v_dense), label
            continue
        assert problem.layout.estimated_pairs <= pipeline.methods.pruned.DENSE_ABOVE * n * m
        bound_g, bound_v = contract_bounds(kernel, params, tolerance, w, m, ls)
        check_reported_bounds(problem, bound_g, bound_v)
        check_within(f"{label} vs oracle", g, v, g_ref, v_ref, bound_g, bound_v)
        check_within(f"{label} vs dense kgrad", g, v, g_dense, v_dense, bound_g, bound_v)
        if tolerance == TOLERANCES[0]:  # the pairs computed, exactly; the in-memory path gives the API's bits
            g2, v2, pairs = compute_in_memory(as_2d(q), None if x is None else as_2d(x), w, problem.layout,
                                              problem.spec, "auto", "float64", problem.shape,
                                              np.asarray(problem.center))
            assert 0 < pairs < n * m, (label, pairs, n * m)
            assert np.array_equal(g2, g) and np.array_equal(v2, v), label


# --- 1b. a layout at the bound ------------------------------------------------------------------------------------


def _tail_radius(kernel, params, level):
    """The radius beyond the peak of |f'| where max(f / kmax, |f'| / sup|f'|) = level (bisection in log r)."""
    kmax, slope_max = kernel_maxima(kernel, params)

    def tail(r):
        f, slope = profile(kernel, r, params)
        return max(f / kmax, slope / slope_max)

    lo, hi = 3.0, 1e10  # every profile here has its slope peak below 3 lengthscales
    assert tail(lo) > level > tail(hi)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if tail(mid) > level else (lo, mid)
    return hi


def _at_the_bound(kernel, tolerance, dim, sign):
    """Queries: TILE points in a box whose corner is the origin.  Sources, along the axis of the smallest
    lengthscale, |w| = 1: one tile at the origin; SUPER_TILES - 1 tiles of one point at d2, then SUPER_TILES
    tiles of one point at d1 (a second super-tile).  Measured by max(f / kmax, |f'| / sup|f'|), the far group
    costs 40% of the budget EPS * S and the near group 50%: a correct run may skip both (and does: only the
    tile at the origin is computed), and then errs at the origin by 90% of the bound on the side (value or
    gradient) that limits the skipping."""
    params = PARAMS.get(kernel, {})
    ls = np.array([0.5, 2.0, 3.0][:dim])
    axis = np.zeros(dim)
    axis[0] = ls[0]
    d1 = _tail_radius(kernel, params, 0.8 * tolerance)
    d2 = _tail_radius(kernel, params, tolerance * SUPER_TILES / (SUPER_TILES - 1))
    assert d2 < d1  # so that Morton order puts the near tiles in the first super-tile
    rng = np.random.default_rng(11)
    q = -rng.uniform(0.0, 1.0, (TILE, dim)) * ls
    q[0] = 0.0  # the query nearest every skipped tile
    spots = np.stack([np.zeros(dim), d2 * axis, d1 * axis])
    counts = np.array([TILE, (SUPER_TILES - 1) * TILE, SUPER_TILES * TILE])
    spot_w = np.array([1.0, sign, sign])
    return q, np.repeat(spots, counts, axis=0), np.repeat(spot_w, counts), ls, (spots, counts * spot_w)


@pytest.mark.parametrize("dim,sign,variance", [(1, 1.0, 1.0), (3, -1.0, 0.3)], ids=["D1", "D3-ARD-negative"])
@pytest.mark.parametrize("tolerance", [1e-2, 1e-9])
@pytest.mark.parametrize("kernel", PRUNING)
def test_bound_is_kept_at_the_bound(kernel, tolerance, dim, sign, variance):
    q, x, w, ls, (spots, spot_weights) = _at_the_bound(kernel, tolerance, dim, sign)
    params = PARAMS.get(kernel, {})
    problem = make(q, x, w, kernel, ls, tolerance, variance, method="pruned")  # in 1-D the far field may be cheaper
    assert problem.pruned, problem.plan.exact_reason
    g, v = run(q, x, w, kernel, ls, tolerance, variance, method="pruned")
    g2, v2, pairs = compute_in_memory(q, x, w, problem.layout, problem.spec, "auto", "float64", problem.shape,
                                      np.asarray(problem.center))
    assert pairs == TILE * TILE  # only the sources at the origin are computed
    assert np.array_equal(as_2d(g2), g) and np.array_equal(v2, v)
    # the oracle on the distinct source points with their summed weights (the same sums, exactly)
    g_ref, v_ref = reference_gradients(q, spots, spot_weights, kernel, ls, variance, **params)
    bound_g, bound_v = contract_bounds(kernel, params, tolerance, w, len(x), ls, variance)
    check_reported_bounds(problem, bound_g, bound_v)
    share_g, share_v = check_within(f"{kernel} D={dim} tolerance={tolerance:g}", g, v, as_2d(g_ref), v_ref,
                                    bound_g, bound_v)
    assert max(share_g, share_v) > 0.85, f"the layout no longer reaches the bound: {share_g:.3f}, {share_v:.3f}"


@pytest.mark.parametrize("kernel", ["rbf", "matern12"])
def test_sub_blocks_skip_what_their_block_cannot(kernel):
    """One query block holding two tight groups 40 lengthscales apart (the points are the sources): the
    block's box reaches both groups, so the block and per-source levels keep every source; each sub-block
    (64 rows of one group) skips the other group's mini-tiles.  Only the pairs within a group are computed,
    and the result keeps the bound against the oracle."""
    rng = np.random.default_rng(5)
    half = TILE // 2
    ls = np.array([0.5, 0.5, 0.5])
    groups = [rng.uniform(-0.5, 0.5, (half, 3)) * ls, rng.uniform(-0.5, 0.5, (half, 3)) * ls]
    groups[1][:, 0] += 40.0 * ls[0]
    x = np.concatenate(groups) + 1e4  # far from the origin as well
    w = rng.uniform(0.5, 2.0, len(x)) * rng.choice([-1.0, 1.0], len(x))
    tolerance = 1e-6
    problem = make(x, None, w, kernel, ls, tolerance)
    assert problem.pruned, problem.plan.exact_reason
    g, v, pairs = compute_in_memory(x, None, w, problem.layout, problem.spec, "auto", "float64", problem.shape,
                                    np.asarray(problem.center))
    assert pairs == 2 * half * half  # each query against its own group only
    g_ref, v_ref = reference_gradients(x, x, w, kernel, ls, 1.0, **PARAMS.get(kernel, {}))
    bound_g, bound_v = contract_bounds(kernel, PARAMS.get(kernel, {}), tolerance, w, len(x), ls)
    check_within(f"{kernel} two groups", as_2d(g), v, as_2d(g_ref), v_ref, bound_g, bound_v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_item_calls_pack_each_sub_block_in_order_and_skip_padding_items(dtype):
    """A block's items: each sub-block's positions cut into tiles in order (the last padded with the
    zero-weight source), whole calls of the largest size then the rest in the smallest size that holds it;
    padding items (sub-block -1) only at the end, skipped inside the call (their sums are exactly 0 even when
    their sources have weight).  The sums per sub-block equal the float64 oracle of its rows against its
    positions."""
    from pipeline.block_precision import block_setup
    from pipeline.blocks import block_item_sums
    from pipeline.kept_tiles import ITEMS_PER_CALL, SourceTiles, item_calls
    from pipeline.precision import x64_enabled
    from pipeline.tiles import compiled_items, formulation

    rng = np.random.default_rng(2)
    ls = np.array([0.5, 0.5, 0.5])
    spec = make_spec("rbf", 3, lengthscale=ls)
    n_tiles, subs, rows, cols = 40, 8, 16, 32
    sources = rng.normal(size=(n_tiles * TILE, 3)) + 1e3
    w = rng.uniform(0.5, 2.0, len(sources))
    tiles = SourceTiles.build(np.arange(n_tiles), sources, w, spec, dtype, TILE, np.asarray(sources.mean(0)))
    lengths = [0, 1, cols, cols + 1, 300, 5, 2 * cols, 700]
    per_sub = [-(-n // cols) for n in lengths]
    sub_positions = [np.sort(rng.choice(len(sources), n, replace=False)) for n in lengths]
    calls = item_calls(sub_positions, tiles, cols)
    sizes = [len(item_sub) for _, item_sub, _ in calls]
    assert sum(per_sub) == 39 and sizes == [ITEMS_PER_CALL[-1], 8]
    assert [real for _, _, real in calls] == [32, 7]
    item_sub = np.concatenate([s[:real] for _, s, real in calls])
    np.testing.assert_array_equal(item_sub, np.repeat(np.arange(subs), per_sub))
    assert all(np.all(s[real:] == -1) for _, s, real in calls)
    packed = tiles.prepared.packed.reshape(-1, tiles.prepared.packed.shape[-1])
    zero = packed[n_tiles * TILE]
    items = np.concatenate([c[:real] for c, _, real in calls])
    for s, positions in enumerate(sub_positions):
        mine = items[item_sub == s].reshape(-1, items.shape[-1])
        np.testing.assert_array_equal(mine[:len(positions)], packed[positions])
        np.testing.assert_array_equal(mine[len(positions):], np.broadcast_to(zero, mine[len(positions):].shape))
    queries = rng.normal(size=(subs * rows, 3)) + 1e3
    setup = block_setup(queries, tiles.prepared, spec, "auto", dtype)
    with x64_enabled(setup.variant.uses_float64 or dtype == "float64"):
        g, v = block_item_sums(queries, calls, tiles.prepared.center, spec, "auto", dtype, rows, subs, setup)
        # a padding item whose sources have weight is still skipped
        from pipeline.blocks import _call_inputs
        packed_q, dynamic, static = _call_inputs(queries, tiles.prepared.center, setup, spec, dtype, subs * rows)
        fn = compiled_items(spec.name, static, formulation(spec, "auto"), "auto", dtype, rows, subs, 3, setup.variant)
        last, last_sub, real = calls[-1]
        loaded = last.copy()
        loaded[real:] = last[0]
        g_pad, v_pad = (np.asarray(a) for a in fn(packed_q, loaded, last_sub, dynamic))
    assert np.all(g_pad[real:] == 0) and np.all(v_pad[real:] == 0) and np.any(v_pad[:real] != 0)
    scale = float(np.abs(w).sum())
    for s, positions in enumerate(sub_positions):
        part = slice(s * rows, (s + 1) * rows)
        if len(positions) == 0:
            assert np.all(g[part] == 0) and np.all(v[part] == 0)
            continue
        g_ref, v_ref = reference_gradients(queries[part], sources[positions], w[positions], "rbf", ls)
        tol = 1e-10 if dtype == "float64" else 2e-5
        np.testing.assert_allclose(g[part], g_ref, rtol=0, atol=tol * max(np.abs(g_ref).max(), 1e-300) + 1e-14 * scale)
        np.testing.assert_allclose(v[part], v_ref, rtol=0, atol=tol * v_ref.max() + 1e-14 * scale)


# --- 2. hypothesis ---------------------------------------------------------------------------------------------

N_RANDOM, M_RANDOM = 768, 1024  # fixed sizes: queries (when separate) and sources


@pytest.mark.sampled(2, cover=())  # the default suite: batch 0 (8 layouts); --runslow: both (16)
@pytest.mark.parametrize("batch", (0, 1))
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), kernel=st.sampled_from(PRUNING), dim=st.integers(1, 3),
       clusters=st.integers(1, 8), spread=st.floats(0.0, 4.5), width=st.floats(-1.0, 0.5),
       offset=st.sampled_from([0.0, 1e3, -1e5]), weights=st.sampled_from(["ones", "positive", "signed", "sparse"]),
       separate_queries=st.booleans(), log_tolerance=st.floats(-12.0, -2.0), log_lengthscale=st.floats(-2.0, 2.0),
       shape_a=st.floats(0.3, 3.0), shape_b=st.floats(0.5, 2.0), variance=st.floats(0.1, 10.0))
def test_bound_holds_on_random_layouts(batch, seed, kernel, dim, clusters, spread, width, offset, weights,
                                       separate_queries, log_tolerance, log_lengthscale, shape_a, shape_b, variance):
    """Clusters of random sizes, 10^0 to 10^4.5 lengthscales apart, 0.1 to 3 lengthscales wide (narrower ones
    meet the dense path's float64 bug, see test_float64_near_duplicates_far_from_the_sources_centre), ARD,
    offsets, weights of one or both signs or mostly zero, random kernel parameters and tolerances."""
    rng = np.random.default_rng([batch, seed])  # each batch draws other layouts from the same examples
    ls = 10.0 ** log_lengthscale * rng.uniform(0.5, 2.0, dim)
    centres = _directions(rng, clusters, dim) * 10.0 ** rng.uniform(0.0, spread, (clusters, 1))
    sizes = rng.multinomial(M_RANDOM - clusters, np.ones(clusters) / clusters) + 1
    x = (np.repeat(centres, sizes, axis=0) + 10.0 ** width * rng.normal(size=(M_RANDOM, dim))) * ls + offset
    q = None
    if separate_queries:
        picks = rng.integers(0, M_RANDOM, N_RANDOM)
        q = x[picks] + 2.0 * 10.0 ** width * rng.normal(size=(N_RANDOM, dim)) * ls
    w = {"ones": None, "positive": rng.uniform(0.1, 2.0, M_RANDOM), "signed": rng.normal(size=M_RANDOM),
         "sparse": np.where(rng.random(M_RANDOM) < 0.1, rng.normal(size=M_RANDOM), 0.0)}[weights]
    params = {"rational_quadratic": {"alpha": shape_a}, "imq": {"c": shape_b, "beta": shape_a}}.get(kernel, {})
    tolerance = 10.0 ** log_tolerance
    queries = x if q is None else q
    g, v = kernel_gradients(queries, None if q is None else x, w, kernel=kernel, lengthscale=ls, variance=variance,
                            dtype="float64", tolerance=tolerance, return_value=True, **params)
    g_ref, v_ref = reference_gradients(queries, None if q is None else x, w, kernel, ls, variance, **params)
    bound_g, bound_v = contract_bounds(kernel, params, tolerance, w, M_RANDOM, ls, variance)
    check_within(f"{kernel} tolerance={tolerance:.2g}", g, v, g_ref, v_ref, bound_g, bound_v)


# --- 3. units of pipeline.pruning --------------------------------------------------------------------------------

BOUND_CASES = [("rbf", {}), ("matern12", {}), ("matern32", {}), ("matern52", {}),
               ("rational_quadratic", {}), ("rational_quadratic", {"alpha": 0.7}),
               ("rational_quadratic", {"alpha": 20.0}), ("imq", {}), ("imq", {"c": 1.3, "beta": 0.8}),
               ("imq", {"c": 0.2, "beta": 2.0})]


@pytest.mark.parametrize("kernel,params", BOUND_CASES, ids=[f"{k}{p}" for k, p in BOUND_CASES])
def test_kernel_bounds_kmax_and_gmax(kernel, params):
    """kmax is k(0) (the oracle's value at q = x); gmax is the largest |grad_q k| of the oracle over pairs along
    the smallest lengthscale (and not exceeded in other directions), ARD lengthscales, variance 2.5."""
    ls, variance = np.array([0.3, 2.0]), 2.5
    bounds = kernel_bounds(make_spec(kernel, 2, ls, variance, **params))
    assert bounds is not None
    _, v0 = reference_gradients(np.zeros((1, 2)), np.zeros((1, 2)), None, kernel, ls, variance, **params)
    assert bounds.kmax == pytest.approx(v0[0], rel=1e-14)
    r = np.concatenate([np.geomspace(1e-9, 1e3, 400_001)])
    along = np.zeros((len(r), 2))
    along[:, 0] = r * ls[0]
    rng = np.random.default_rng(12)
    anywhere = rng.normal(size=(20_000, 2)) * ls * rng.uniform(0.0, 4.0, (20_000, 1))
    g_along, _ = reference_gradients(along, np.zeros((1, 2)), None, kernel, ls, variance, **params)
    g_any, _ = reference_gradients(anywhere, np.zeros((1, 2)), None, kernel, ls, variance, **params)
    i = int(np.argmax(row_norms(g_along)))  # refine around the peak
    fine = np.zeros((20_001, 2))
    fine[:, 0] = np.linspace(r[max(i - 1, 0)], r[min(i + 1, len(r) - 1)], 20_001) * ls[0]
    g_fine, _ = reference_gradients(fine, np.zeros((1, 2)), None, kernel, ls, variance, **params)
    gmax = max(row_norms(g_along).max(), row_norms(g_fine).max())
    assert row_norms(g_any).max() <= gmax * (1 + 1e-12)
    assert bounds.gmax <= gmax * (1 + 1e-9)  # never above: the bound would be looser than the contract
    assert bounds.gmax == pytest.approx(gmax, rel=2e-4)  # matern12's sup is at r -> 0: the table reads 1e-4 in
    assert bounds.error_bounds(1e-3, 7.0) == pytest.approx({"gradient": 7e-3 * bounds.gmax,
                                                            "value": 7e-3 * bounds.kmax}, rel=1e-15)


# BUG (minor, pipeline.pruning.kernel_bounds): the |f'| table starts at TABLE_MIN = 1e-4 lengthscales, so for a
# profile whose slope peaks below that (imq with c < ~1e-4, rational_quadratic with alpha < ~5e-9) gmax is the
# slope at 1e-4, far below sup |f'|: imq c=1e-5, beta=0.5 reports gmax = 9.85e7 where max |grad_q k| = 3.85e9.
# The errors stay within the smaller bound it reports (nothing is skipped before the table's peak), but gmax and
# the run's error_bound["gradient"] are not what the contract defines.
def test_gmax_of_a_profile_peaking_below_the_table():
    params = {"c": 1e-5, "beta": 0.5}
    bounds = kernel_bounds(make_spec("imq", 1, 1.0, 1.0, **params))
    _, slope_max = kernel_maxima("imq", params)
    assert bounds.gmax == pytest.approx(slope_max, rel=1e-3), (
        f"gmax {bounds.gmax:.4g} != max |grad_q k| {slope_max:.4g} (the slope peaks at "
        f"r = {params['c'] / math.sqrt(2 * params['beta'] + 1):.2g} < TABLE_MIN = {TABLE_MIN:g})")


@pytest.mark.parametrize("kernel,params", BOUND_CASES, ids=[f"{k}{p}" for k, p in BOUND_CASES])
def test_tails_bound_the_profile_beyond_d(kernel, params):
    """value_tail(d) >= f(r) and slope_tail(d) >= |f'(r)| (lengthscale 1) for random r >= d, d from 1e-7 to
    1e13 (below the table's first radius and beyond its last), r = d included; variance 2.5.  Allowed: a few
    ulps, and 1e-290 absolute: the module's table comes from XLA, which flushes subnormal intermediates to 0
    (exp(-a) below 2.2e-308), so far tails read 0 where f is still ~1e-303 (matern52) -- as small as the
    float64 kernel sums' own underflow."""
    variance = 2.5
    bounds = kernel_bounds(make_spec(kernel, 1, 1.0, variance, **params))
    rng = np.random.default_rng(13)
    d = np.concatenate([10.0 ** rng.uniform(-7.0, 13.0, 20_000), [TABLE_MIN, TABLE_MAX, 1.0, 3.0]])
    d = np.concatenate([d, bounds.radii[1::97]])  # exactly on the table's radii
    for r in (d, d * (1.0 + 10.0 ** rng.uniform(-12.0, 1.0, len(d)))):
        f, slope = profile(kernel, r, params)
        ulps, tiny = 1.0 + 1e-14, 1e-290  # the module's float64 profile and this one may differ by an ulp or two
        assert np.all(bounds.value_tail(d) * ulps + tiny >= variance * f), (
            d[np.argmax(variance * f - bounds.value_tail(d))])
        assert np.all(bounds.slope_tail(d) * ulps + tiny >= variance * slope), (
            d[np.argmax(variance * slope - bounds.slope_tail(d))])
    assert np.all(np.diff(bounds.value_tail(np.sort(d))) <= 0)  # non-increasing in d


def _box_distance(lo_a, hi_a, lo_b, hi_b):
    gap = np.maximum(0.0, np.maximum(lo_b - hi_a, lo_a - hi_b))
    return np.sqrt((gap ** 2).sum(-1))


def _random_tiles(rng, scale, n_tiles, dim, walk):
    """Tile boxes along a random walk (so that super-tiles are compact) or scattered, half-widths 1e-3 to 10."""
    if walk:
        centres = np.cumsum(rng.normal(size=(n_tiles, dim)) * scale / 10.0, axis=0)
    else:
        centres = rng.uniform(-scale, scale, (n_tiles, dim))
    half = 10.0 ** rng.uniform(-3.0, 1.0, (n_tiles, 1)) * rng.uniform(0.0, 1.0, (n_tiles, dim))
    return centres, half


def _random_sources(rng, tile_counts, top_scale, cols, walk):
    """(scale, tile centres, points): D in 1..3, ``cols`` points per tile of :func:`_random_tiles` (scale up to
    10^top_scale), a partial last tile."""
    dim = int(rng.choice([1, 2, 3]))
    n_tiles = int(rng.choice(tile_counts))
    scale = 10.0 ** rng.uniform(0.0, top_scale)
    centres, half = _random_tiles(rng, scale, n_tiles, dim, walk=walk)
    points = (centres[:, None, :] + half[:, None, :] * rng.uniform(-1.0, 1.0, (n_tiles, cols, dim)))
    return scale, centres, points.reshape(-1, dim)[: n_tiles * cols - int(rng.integers(0, cols))]


def _random_blocks(rng, centres, scale, b=6):
    dim = centres.shape[1]
    block_centres = centres[rng.integers(0, len(centres), b)] + rng.normal(size=(b, dim)) * scale / 20.0
    block_half = 10.0 ** rng.uniform(-3.0, 1.0, (b, 1)) * rng.uniform(0.0, 1.0, (b, dim))
    return block_centres - block_half, block_centres + block_half


def _random_weights(rng, n):
    weight = rng.exponential(size=n) * np.where(rng.random(n) < 0.2, 0.0, 1.0)
    weight[rng.random(n) < 0.05] *= 1e4
    return weight


def _skipped_cost(kernel, bounds, lower, upper, weight, ids_kept, point_lower, point_upper):
    """(table cost v, table cost g, true cost v, true cost g) of the entries not in ids_kept (weight > 0)."""
    skipped = np.setdiff1d(np.arange(len(weight)), ids_kept)
    skipped = skipped[weight[skipped] > 0]  # zero weight costs nothing wherever it is
    d = _box_distance(lower, upper, point_lower[skipped], point_upper[skipped])
    f, slope = profile(kernel, d, PARAMS.get(kernel, {}))
    w = weight[skipped]
    return (float(np.sum(w * bounds.value_tail(d))), float(np.sum(w * bounds.slope_tail(d))),
            float(np.sum(w * f)), float(np.sum(w * slope)), len(skipped))


@pytest.mark.parametrize("kernel", PRUNING)
def test_select_tiles_never_skips_more_than_the_budget(kernel):
    """Random tile boxes, weights with zeros and outliers, random block boxes and tolerances: the kept ids are
    ascending and unique, and the tiles each block skips cost (sum of W_t * tail(distance between the boxes))
    at most what the selection says it spent, which is at most the budget."""
    bounds = kernel_bounds(make_spec(kernel, 1, 1.0, 1.0, **PARAMS.get(kernel, {})))
    rng = np.random.default_rng(14)
    skipped_any = kept_any = skipped_many = 0
    for trial in range(60):
        dim = int(rng.choice([1, 2, 3, 5]))
        n_tiles = int(rng.choice([1, 5, SUPER_TILES, SUPER_TILES + 1, 150, 400]))
        scale = 10.0 ** rng.uniform(0.0, 4.0)
        centres, half = _random_tiles(rng, scale, n_tiles, dim, walk=trial % 2 == 1)
        weight = _random_weights(rng, n_tiles)
        index = TileIndex(centres - half, centres + half, weight, np.full(n_tiles, TILE))
        lower, upper = _random_blocks(rng, centres, scale)
        tolerance = 10.0 ** rng.uniform(-12.0, math.log10(0.5))
        budget = Budget.of(bounds, tolerance, float(weight.sum()))
        selection = select_tiles(lower, upper, index, bounds, budget)
        assert len(selection.kept) == len(lower)
        for j, ids in enumerate(selection.kept):
            ids = np.asarray(ids)
            assert np.all(np.diff(ids) > 0) and (len(ids) == 0 or (ids[0] >= 0 and ids[-1] < n_tiles))
            cost_v, cost_g, true_v, true_g, skipped = _skipped_cost(kernel, bounds, lower[j], upper[j], weight, ids,
                                                                    index.lower, index.upper)
            assert cost_v <= selection.spent_value[j] * (1 + 1e-12) + 1e-300, (trial, j, cost_v, selection)
            assert cost_g <= selection.spent_slope[j] * (1 + 1e-12) + 1e-300, (trial, j, cost_g, selection)
            assert selection.spent_value[j] <= budget.value and selection.spent_slope[j] <= budget.slope
            assert true_v <= budget.value * (1 + 1e-12) and true_g <= budget.slope * (1 + 1e-12)
            skipped_any += skipped
            kept_any += len(ids)
            skipped_many += skipped > SUPER_TILES
    assert skipped_any and kept_any and skipped_many  # the trials were not vacuous


@pytest.mark.parametrize("kernel", PRUNING)
def test_skip_rule_sorts_only_what_costs_something(kernel):
    """The tile levels' rule (farthest first, while the budget allows) sorts only the entries nearer than the
    kernel's free radius (beyond it both tables are 0): the same skips and the same spent budget, bit for
    bit, as sorting every entry, on rows with ties, zero weights, entries at distance 0, rows that span the
    free radius or lie wholly beyond it, and a negative budget left."""
    from pipeline.pruning import _skippable, _skippable_sorted

    bounds = kernel_bounds(make_spec(kernel, 1, 1.0, 1.0, **PARAMS.get(kernel, {})))
    free = bounds.free_radius
    reach = free if np.isfinite(free) else 50.0
    rng = np.random.default_rng(21)
    fast_rows = 0
    for trial in range(120):
        rows, entries = int(rng.integers(1, 9)), int(rng.integers(1, 300))
        d = np.abs(rng.normal(0.0, reach * float(rng.choice([0.05, 0.5, 1.0, 2.0, 30.0])), (rows, entries)))
        if trial % 3 == 0:
            d = np.round(d)  # ties
        if trial % 4 == 1:
            d[:, : entries // 3] = 0.0
        if trial % 5 == 2:  # rows at the free radius: just inside it, at it (after SHRINK), beyond; inf
            d[0] = free if np.isfinite(free) else 1e6
            d[-1, ::2] = free / SHRINK if np.isfinite(free) else np.inf
        if trial % 11 == 4:
            d[-1, ::3] = np.inf
        weight = (rng.random(entries) * (rng.random(entries) > 0.2) if trial % 2 else
                  rng.random((rows, entries)) * 10.0 ** rng.uniform(-3, 3))
        value_left = rng.random(rows) * 10.0 ** rng.uniform(-9, 2)
        slope_left = rng.random(rows) * 10.0 ** rng.uniform(-9, 2)
        if trial % 7 == 3:
            value_left[0] = -1.0
        fast_rows += int(np.sum(d * SHRINK < free, axis=1).max() * 2 <= entries)  # calls that sort a part
        expected = _skippable_sorted(d, np.broadcast_to(weight, d.shape), bounds, value_left, slope_left)
        found = _skippable(d, weight, bounds, value_left, slope_left)
        for a, b in zip(expected, found):
            assert a.shape == b.shape and np.array_equal(a, b), trial
    assert fast_rows > 10 or not np.isfinite(free)  # the short path ran (kernels whose tails reach 0)
    for shape in ((3, 0), (0, 5), (0,)):  # no entries, or no rows
        d = np.zeros(shape)
        left = np.ones(shape[:-1])
        rows = (int(np.prod(shape[:-1])), shape[-1])
        for a, b in zip(_skippable_sorted(d.reshape(rows), d.reshape(rows), bounds, left.reshape(-1), left.reshape(-1)),
                        _skippable(d, np.zeros(shape), bounds, left, left)):
            assert np.array_equal(a.reshape(b.shape), b)


@pytest.mark.parametrize("kernel", PRUNING)
def test_tiles_then_sources_never_skip_more_than_the_budget(kernel):
    """All levels together, as a pruned run uses them: select_tiles, then select_sources on the sources of the
    kept tiles with the budget left.  Summed over every source a block does not compute, |w_i| * tail(distance
    from the block's box to x_i) stays within the budget (the tail from the module's table, and f, |f'| from
    the formulas here)."""
    bounds = kernel_bounds(make_spec(kernel, 1, 1.0, 1.0, **PARAMS.get(kernel, {})))
    rng = np.random.default_rng(20)
    cols = 16
    computed_any = skipped_any = 0
    for trial in range(30):
        scale, centres, points = _random_sources(rng, (3, SUPER_TILES + 2, 120), 3.5, cols, walk=trial % 3 != 0)
        weight = _random_weights(rng, len(points))
        index = tile_index(points, weight, cols)
        lower, upper = _random_blocks(rng, centres, scale)
        tolerance = 10.0 ** rng.uniform(-12.0, math.log10(0.5))
        budget = Budget.of(bounds, tolerance, float(weight.sum()))
        selection = select_tiles(lower, upper, index, bounds, budget)
        for j, tiles in enumerate(selection.kept):
            candidates = np.concatenate([np.arange(t * cols, t * cols + index.counts[t]) for t in tiles] or
                                        [np.zeros(0, np.int64)]).astype(np.int64)
            keep = select_sources(lower[j], upper[j], points[candidates], weight[candidates], bounds,
                                  budget.value - selection.spent_value[j], budget.slope - selection.spent_slope[j])
            computed = candidates[np.asarray(keep, np.int64)]
            assert np.all(np.diff(computed) > 0)
            cost_v, cost_g, true_v, true_g, skipped = _skipped_cost(kernel, bounds, lower[j], upper[j], weight,
                                                                    computed, points, points)
            assert cost_v <= budget.value * (1 + 1e-12), (trial, j, cost_v, budget)
            assert cost_g <= budget.slope * (1 + 1e-12), (trial, j, cost_g, budget)
            assert true_v <= budget.value * (1 + 1e-12) and true_g <= budget.slope * (1 + 1e-12)
            computed_any += len(computed)
            skipped_any += skipped
    assert computed_any and skipped_any


def _one_block_skippable(d, weight, bounds, value_left, slope_left):
    """The selection's rule for one block, written out plainly: entries sorted farthest first (stable), the
    running cost of skipping them (zero weight costs nothing), and the longest prefix within the budget."""
    order = np.argsort(-d, kind="stable")
    cost_v = cost_g = 0.0
    spent_v = spent_g = 0.0
    skip = np.zeros(len(d), bool)
    value_tail, slope_tail = bounds.value_tail(d), bounds.slope_tail(d)
    for i in order:
        if weight[i] > 0:
            cost_v += weight[i] * value_tail[i]
            cost_g += weight[i] * slope_tail[i]
        if not (cost_v <= value_left and cost_g <= slope_left):
            break
        skip[i] = True
        spent_v, spent_g = cost_v, cost_g
    return skip, spent_v, spent_g


def _one_block_sources(lower, upper, points, weight, bounds, value_left, slope_left):
    """The per-source level for one block, written out plainly: costs summed per table bin, bins skipped from
    the farthest while the budget allows; the sources of positive weight in the other bins are computed.
    Sources beyond the radius where all the block's candidates would cost FAR_SHARE of its budget are counted
    at that radius."""
    bins = bounds.bins(point_box_distance(lower, upper, points))
    total = float(np.add.reduceat(weight, [0])[0]) if len(weight) else 0.0  # summed as the selection sums
    far = np.flatnonzero((bounds.values <= FAR_SHARE * value_left / total)
                         & (bounds.slopes <= FAR_SHARE * slope_left / total)) if total > 0 else np.zeros(0)
    if len(far):
        bins = np.minimum(bins, far[0])
    cost_v = cost_g = 0.0
    cut = None
    for k in sorted(set(bins[weight > 0].tolist()), reverse=True):
        mass = float(np.sum(weight[bins == k]))
        cost_v += mass * bounds.values[k]
        cost_g += mass * bounds.slopes[k]
        if not (cost_v <= value_left and cost_g <= slope_left):
            break
        cut = k
    return np.flatnonzero((weight > 0) & ((bins < cut) if cut is not None else True))


@pytest.mark.parametrize("kernel", ["rbf", "matern32"])
def test_grouped_selection_equals_one_block_at_a_time(kernel):
    """select_tiles and select_sources_of_blocks work on groups of blocks at once; what each block keeps, and
    the budget it spent, must be what the rule gives for that block alone (written out plainly above), for
    any grouping: random layouts with zero and huge weights, unit weights, duplicated points, blocks that
    hold sources and blocks far from all, tolerances from 1e-12 to 0.5."""
    bounds = kernel_bounds(make_spec(kernel, 1, 1.0, 1.0))
    rng = np.random.default_rng(27)
    cols = 16
    kept_any = skipped_any = 0
    for trial in range(24):
        scale, centres, points = _random_sources(rng, (3, SUPER_TILES + 2, 90), 3.0, cols, walk=trial % 3 != 0)
        if trial % 4 == 1:
            points[1::2] = points[::2][: len(points[1::2])]  # exact duplicates
        weight = np.ones(len(points)) if trial % 4 == 2 else _random_weights(rng, len(points))
        index = tile_index(points, weight, cols)
        lower, upper = _random_blocks(rng, centres, scale, b=int(rng.integers(1, 40)))
        if trial % 5 == 0:
            lower[0], upper[0] = lower[0] + 1e6 * scale, upper[0] + 1e6 * scale  # far from every source
        tolerance = 10.0 ** rng.uniform(-12.0, math.log10(0.5))
        budget = Budget.of(bounds, tolerance, float(weight.sum()))
        selection = select_tiles(lower, upper, index, bounds, budget)
        s_lo, s_hi, s_w = index.supers
        candidates, value_left, slope_left = [], [], []
        for j in range(len(lower)):
            skip_super, v1, g1 = _one_block_skippable(box_distance(lower[j], upper[j], s_lo, s_hi), s_w, bounds,
                                                      budget.value * LEVEL_ONE_SHARE, budget.slope * LEVEL_ONE_SHARE)
            tiles = (np.flatnonzero(~skip_super)[:, None] * SUPER_TILES + np.arange(SUPER_TILES)).ravel()
            tiles = tiles[tiles < index.n_tiles]
            skip, v2, g2 = _one_block_skippable(box_distance(lower[j], upper[j], index.lower[tiles],
                                                             index.upper[tiles]), index.weight[tiles], bounds,
                                                budget.value * LEVEL_TWO_SHARE - v1,
                                                budget.slope * LEVEL_TWO_SHARE - g1)
            assert np.array_equal(selection.kept[j], tiles[~skip]), (trial, j)
            assert np.isclose(selection.spent_value[j], v1 + v2, rtol=1e-12, atol=0.0), (trial, j)
            assert np.isclose(selection.spent_slope[j], g1 + g2, rtol=1e-12, atol=0.0), (trial, j)
            candidates.append(np.concatenate([np.arange(t * cols, t * cols + index.counts[t])
                                              for t in tiles[~skip]] or [np.zeros(0, np.int64)]).astype(np.int64))
            value_left.append(budget.value - selection.spent_value[j])
            slope_left.append(budget.slope - selection.spent_slope[j])
        starts = np.concatenate([[0], np.cumsum([len(c) for c in candidates])])
        flat = np.concatenate(candidates)
        for cut in sorted({0, int(rng.integers(0, len(lower) + 1)), len(lower)}):  # two groups, any split
            for rows in (np.arange(0, cut), np.arange(cut, len(lower))):
                if len(rows) == 0:
                    continue
                a, z = starts[rows[0]], starts[rows[-1] + 1]
                keep = select_sources_of_blocks(lower[rows], upper[rows], points[flat[a:z]], weight[flat[a:z]],
                                                starts[rows[0]:rows[-1] + 2] - a, bounds,
                                                np.asarray(value_left)[rows], np.asarray(slope_left)[rows])
                for j in rows:
                    mine = keep[starts[j] - a:starts[j + 1] - a]
                    expected = _one_block_sources(lower[j], upper[j], points[candidates[j]], weight[candidates[j]],
                                                  bounds, value_left[j], slope_left[j])
                    assert np.array_equal(np.flatnonzero(mine), expected), (trial, j, cut)
                    assert np.array_equal(select_sources(lower[j], upper[j], points[candidates[j]],
                                                         weight[candidates[j]], bounds, value_left[j],
                                                         slope_left[j]), expected)
                    kept_any += len(expected)
                    skipped_any += int(np.sum(weight[candidates[j]] > 0)) - len(expected)
    assert kept_any and skipped_any  # the trials were not vacuous


@pytest.mark.parametrize("kernel", ["rbf", "periodic"])
@pytest.mark.parametrize("tolerance", [-1e-3, -1.0, 1.0, 1.5, math.inf, -math.inf, math.nan, np.float64(np.nan),
                                       "1e-3", None, True, [1e-3]])
def test_bad_tolerance_is_an_input_error_naming_the_value(tolerance, kernel):
    pts = np.random.default_rng(15).normal(size=(20, 2))
    with pytest.raises(InputError) as info:
        kernel_gradients(pts, kernel=kernel, tolerance=tolerance)
    message = str(info.value)
    assert "tolerance" in message and repr(tolerance) in message, message
    with pytest.raises(InputError, match="tolerance"):
        make_problem(pts, pts, kernel=kernel, tolerance=tolerance)


def test_tolerance_accepts_numbers_of_any_numeric_type():
    pts = np.random.default_rng(16).normal(size=(20, 2))
    exact = kernel_gradients(pts, dtype="float64")
    for tolerance in (0, 0.0, np.float32(0.0), np.int64(0)):
        assert np.array_equal(kernel_gradients(pts, dtype="float64", tolerance=tolerance), exact)
    for tolerance in (np.float32(1e-3), np.float64(1e-6), 0.999):
        assert make_problem(pts, pts, tolerance=tolerance).tolerance == float(tolerance)


def test_what_prunes():
    for kernel in PRUNING:
        spec = make_spec(kernel, 2, 1.0, 1.0)
        assert prunes(spec) and not prunes(spec, "jacfwd") and not prunes(spec, "jacrev")
    for kernel in ("periodic", "linear", "polynomial", "user_kernels:logcosh"):
        spec = make_spec(kernel, 2, 1.0, 1.0, **({"gamma": 2.0} if kernel.startswith("user") else {}))
        assert not prunes(spec) and kernel_bounds(spec) is None


# --- 4. kernels and modes that do not prune: the same bits ---------------------------------------------------------


def _spread_points():
    rng = np.random.default_rng(17)
    return _clusters(rng, 3, 2, per=100), rng.normal(size=300)


NOT_PRUNED = [("periodic", "auto", {"period": 2.3}), ("linear", "auto", {}), ("polynomial", "auto", {"degree": 3}),
              ("user_kernels:logcosh", "auto", {"gamma": 2.0}), ("user_kernels:cubic_dot", "auto", {}),
              ("rbf", "jacfwd", {}), ("matern52", "jacrev", {})]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel,mode,params", NOT_PRUNED, ids=[f"{k}-{m}" for k, m, _ in NOT_PRUNED])
def test_kernels_and_modes_that_do_not_prune_give_the_same_bits(kernel, mode, params, dtype):
    pts, w = _spread_points()
    if kernel in ("linear", "polynomial", "user_kernels:cubic_dot"):  # not re-centred: keep the values small
        pts = (pts - pts.mean(0)) / np.abs(pts - pts.mean(0)).max() * 2.0
    kw = dict(kernel=kernel, mode=mode, dtype=dtype, return_value=True, **params)
    g0, v0 = kernel_gradients(pts, None, w, **kw)
    problem = make_problem(pts, pts, kernel=kernel, mode=mode, dtype=dtype, params=params, tolerance=1e-3,
                           weights=w, sources_are_points=True)
    assert not problem.pruned and problem.plan.exact_reason
    for tolerance in (1e-2, 1e-9):
        g, v = kernel_gradients(pts, None, w, tolerance=tolerance, **kw)
        assert g.dtype == g0.dtype and np.array_equal(g, g0) and np.array_equal(v, v0), tolerance


@pytest.mark.real_threshold
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_run_that_would_keep_most_pairs_is_the_dense_run(dtype):
    """Compact data: pruning would keep more than DENSE_ABOVE of the pairs, so every pair is computed the dense
    way, with the same bits as tolerance 0."""
    rng = np.random.default_rng(18)
    pts, w = rng.normal(size=(1200, 3)), rng.normal(size=1200)
    problem = make_problem(pts, pts, kernel="matern32", dtype=dtype, tolerance=1e-9, weights=w,
                           sources_are_points=True)
    assert not problem.pruned and "every pair" in problem.plan.exact_reason
    g0, v0 = kernel_gradients(pts, None, w, kernel="matern32", dtype=dtype, return_value=True)
    g, v = kernel_gradients(pts, None, w, kernel="matern32", dtype=dtype, tolerance=1e-9, return_value=True)
    assert np.array_equal(g, g0) and np.array_equal(v, v0)


# --- 5. determinism ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout,kernel", [("duplicates", "rbf"), ("separate", "imq"), ("d5_clusters", "matern12")])
def test_same_call_twice_same_bits(layout, kernel, dtype):
    q, x, w, ls = LAYOUTS[layout](kernel)
    assert make(q, x, w, kernel, ls, 1e-3).pruned
    g1, v1 = run(q, x, w, kernel, ls, 1e-3, dtype=dtype)
    g2, v2 = run(q, x, w, kernel, ls, 1e-3, dtype=dtype)
    assert g1.dtype == np.dtype(dtype)
    assert g1.tobytes() == g2.tobytes() and v1.tobytes() == v2.tobytes()


def _permuted(q, x, w, seed):
    rng = np.random.default_rng(seed)
    pq = rng.permutation(len(q))
    if x is None:
        return pq, (q[pq], None, None if w is None else w[pq])
    ps = rng.permutation(len(x))
    return pq, (q[pq], x[ps], None if w is None else w[ps])


def _interchangeable_sorted(q, w, g, v):
    """g and v with the rows of each group of identical queries (same coordinates and, when the queries are
    the sources, the same weight) sorted among themselves: such rows cannot be told apart, so which of them
    shares a query block with which others (and so which of two results within the bound it gets) is not
    fixed by the data."""
    keys = np.concatenate([as_2d(q), (np.zeros(len(q)) if w is None else np.asarray(w))[:, None]], axis=1)
    group = np.unique(keys, axis=0, return_inverse=True)[1].ravel()
    g2 = as_2d(g)
    order = np.lexsort((v, *g2.T[::-1], group))
    return g2[order], v[order]


def _assert_permutes(label, q, x, w, kernel, ls, tolerance=1e-3):
    assert make(q, x, w, kernel, ls, tolerance).pruned, label
    g, v = run(q, x, w, kernel, ls, tolerance)
    pq, permuted = _permuted(q, x, w, seed=19)
    gp, vp = run(*permuted, kernel, ls, tolerance)
    own_w = w if x is None else None  # the queries' own weights, when they are the sources
    g, v = _interchangeable_sorted(q, own_w, g, v)
    gp, vp = _interchangeable_sorted(permuted[0], None if own_w is None else own_w[pq], gp, vp)
    pq = np.arange(len(q))  # both in the canonical order of their (coordinates, weight) groups
    diff_g = float(row_norms(gp - g[pq]).max())
    diff_v = float(np.abs(vp - v[pq]).max())
    bound_g, bound_v = contract_bounds(kernel, PARAMS.get(kernel, {}), tolerance, w, len(q if x is None else x), ls)
    assert diff_g <= SLACK * float(row_norms(g).max()) and diff_v <= SLACK * float(np.abs(v).max()), (
        f"{label}: permuting the input rows changes the results by {diff_g:.3e} (gradient; "
        f"{diff_g / bound_g:.3g} x the error bound) and {diff_v:.3e} (value; {diff_v / bound_v:.3g} x the bound)")


@pytest.mark.parametrize("layout,kernel", [("mixed_weights", "rbf"), ("separate", "matern52"),
                                           ("integer_grid_1d", "imq"), ("d5_clusters", "rational_quadratic")])
def test_permuting_rows_permutes_the_results(layout, kernel):
    """Points in distinct Morton cells (every spatial order the same whatever the input order): permuting points
    (and sources with their weights) permutes the outputs, to float64 rounding."""
    q, x, w, ls = LAYOUTS[layout](kernel)
    _assert_permutes(f"{layout} {kernel}", q, x, w, kernel, ls)


# Points whose Morton keys tie (exact duplicates, or points closer than the key's quantisation step: span / 2^21
# per dimension, e.g. 0.7 lengthscales for far_outlier) are ordered by coordinates and weight, never by input
# position, so permuting the input rows permutes the results (found by this test: with ties in input order the
# results moved by up to 0.7 x the bound).  Exact copies stay interchangeable among themselves.
@pytest.mark.parametrize("layout,kernel", [("far_outlier", "rbf"), ("far_outlier", "matern12"),
                                           ("duplicates", "matern12")])
def test_permuting_rows_with_tied_morton_keys_permutes_the_results(layout, kernel):
    q, x, w, ls = LAYOUTS[layout](kernel)
    _assert_permutes(f"{layout} {kernel}", q, x, w, kernel, ls)


# --- the float64 accuracy the bound sits on --------------------------------------------------------------------------


# The float64 accuracy the bound sits on, on near-duplicate points far from the sources' centre (the mid-range
# the coordinates are shifted by), at tolerance 0 and with any tolerance.  Found by the tight-cluster layout:
# * matern32 / matern52 (the same cluster plus 256 points around (100, 100)) were off by 4e-6 and 6e-6 x max|g|:
#   a near-duplicate pair's r2 from the float64 GEMM form rounded to 0 and the safe square root's zero derivative
#   dropped its gradient.  Fixed: below r2 = 1e-6 those profiles use their Taylor series (pipeline.kernels).
# * matern12 (256 points within 1e-7 of (0.5, 0.5) plus 256 around (1e5, 1e5)) is still off by 3.5e-5 x max|g|:
#   each pair's unit vector (q - x) / r is formed from coordinates rounded at ~5e4 * 1.1e-16 = 5.5e-12, i.e.
#   5e-5 of r (a known bug: float64 runs would need the hi/lo coordinates float32 runs have).
@pytest.mark.parametrize("kernel,far", [
    pytest.param("matern12", 1e5, marks=pytest.mark.xfail(strict=True, reason="known bug of the dense float64 "
                                                           "path: see the comment above")),
    ("matern32", 100.0), ("matern52", 100.0)])
def test_float64_near_duplicates_far_from_the_sources_centre(kernel, far):
    rng = np.random.default_rng(1)
    pts = np.concatenate([0.5 + 1e-7 * rng.normal(size=(256, 2)), rng.normal(size=(256, 2)) + far])
    g, v = kernel_gradients(pts, kernel=kernel, dtype="float64", return_value=True)
    g_ref, v_ref = reference_gradients(pts, None, None, kernel, 1.0)
    err = float(np.abs(g - g_ref).max() / np.abs(g_ref).max())
    assert err <= SLACK, f"{kernel}: float64 gradient error {err:.2e} x max|g| > {SLACK:g}"
    assert float(np.abs(v - v_ref).max() / np.abs(v_ref).max()) <= SLACK


def test_float32_pruned_run_keeps_the_bound_on_top_of_float32_rounding():
    """The default dtype: the pruned float32 result is within the bound plus float32's 2e-5 x max|g|."""
    q, x, w, ls = LAYOUTS["separate"]("rbf")
    assert make(q, x, w, "rbf", ls, 1e-3).pruned
    g, v = run(q, x, w, "rbf", ls, 1e-3, dtype="float32")
    assert g.dtype == np.float32
    g_ref, v_ref = reference_gradients(q, x, w, "rbf", ls)
    bound_g, bound_v = contract_bounds("rbf", {}, 1e-3, w, len(x), ls)
    assert row_norms(g - g_ref).max() <= bound_g + 2e-5 * row_norms(g_ref).max()
    assert np.abs(v - v_ref).max() <= bound_v + 2e-5 * np.abs(v_ref).max()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_sorted_sources_are_read_a_run_of_chunks_at_a_time(weighted, separate, monkeypatch):
    """A task's rows of the sorted sources (pipeline.methods.pruned.read_sorted_sources): the chunks a
    worker has not cached are read one run of consecutive chunks at a time (a partial last chunk too), the
    cached ones not again, and the rows and weights are the copy's, whatever was cached before."""
    from pipeline.methods import pruned as P

    class Recorded:
        def __init__(self, data):
            self.data, self.reads = data, []

        def __getitem__(self, rows):
            self.reads.append((rows.start, rows.stop))
            return self.data[rows]

    class Copy:
        def __init__(self, arrays):
            self.held = arrays

        def arrays(self, *names):
            return {name: self.held.get(name) for name in names}

    rng = np.random.default_rng(3)
    size, m, dim = 8, 61, 2  # 8 chunks, the last of 5 rows
    name = "sources" if separate else "points"
    arrays = {name: Recorded(rng.normal(size=(m, dim)))}
    if weighted:
        arrays["weights"] = Recorded(rng.normal(size=m))
    layout = P.SortedLayout(copy_chunk=size, copy_id=f"test-{weighted}-{separate}", separate_sources=separate)
    copy = Copy(arrays)
    P._CHUNKS.clear()
    rows = np.array([1, 2, 9, 17, 40, 41, 47, 60])  # chunks 0, 1, 2, 5, 7 (runs 0-2, 5, 7)
    sources, weights = P.read_sorted_sources(layout, copy, rows, dim)
    np.testing.assert_array_equal(sources, arrays[name].data[rows])
    assert arrays[name].reads == [(0, 24), (40, 48), (56, 64)]
    if weighted:
        np.testing.assert_array_equal(weights, arrays["weights"].data[rows])
        assert arrays["weights"].reads == arrays[name].reads
    else:
        assert weights is None
    arrays[name].reads.clear()
    rows = np.array([3, 30, 31, 33, 45, 52])  # chunks 0, 3, 4 (a run of two not cached), 5, 6
    sources, weights = P.read_sorted_sources(layout, copy, rows, dim)
    np.testing.assert_array_equal(sources, arrays[name].data[rows])
    assert arrays[name].reads == [(24, 40), (48, 56)]
    if weighted:
        np.testing.assert_array_equal(weights, arrays["weights"].data[rows])
    P._CHUNKS.clear()
    arrays[name].reads.clear()
    monkeypatch.setattr(P, "READ_RUN", 3)  # a long run is read a few chunks at a time
    rows = np.arange(0, m, 5)
    sources, weights = P.read_sorted_sources(layout, copy, rows, dim)
    np.testing.assert_array_equal(sources, arrays[name].data[rows])
    assert arrays[name].reads == [(0, 24), (24, 48), (48, 64)]
    P._CHUNKS.clear()
