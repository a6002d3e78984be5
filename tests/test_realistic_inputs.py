"""Inputs as users bring them: far from the origin, tiny or huge spreads, exact duplicates, tight clusters,
sizes that are not multiples of the tile shapes.

Bounds (``reference.accuracy_bounds``): float64 ``err <= 1e-10``.  float32 ``err <= 2e-5 + 10 * e_in``,
where ``e_in`` is the error caused merely by storing the (re-centred) inputs in float32: the problem's own
float32 conditioning.  For most data here ``e_in`` is about 1e-7, so the bound is the plain 2e-5; it only
grows where the data cannot be represented in float32 (near-duplicate points seen through matern12).

Inputs are always float64: the implementation may (and, for stationary kernels, should) re-centre them in
float64 before casting, so shifting everything by 1e6 must not cost float32 accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import (
    FLOAT32_BOUND,
    FLOAT64_BOUND,
    KERNEL_NAMES,
    STATIONARY,
    USES_LENGTHSCALE,
    accuracy_bounds,
    reference_gradients,
    relative_error,
)

import pipeline  # noqa: E402  (an import error must fail, never skip)

# The default suite runs a sample of each parametrised test (each parameter value at least once); --runslow all.
pytestmark = pytest.mark.sampled(4)

kernel_gradients = pipeline.kernel_gradients

DTYPES = ("float64", "float32")
NQ, NS, D = 150, 200, 3  # fixed shapes: compiled tiles are shared by every case below
PARAMS = {
    "rational_quadratic": {"alpha": 0.7},
    "imq": {"c": 1.3, "beta": 0.8},
    "periodic": {"period": 2.3},
    "polynomial": {"c": 0.5, "degree": 3},
}


def params_for(kernel, scale=1.0):
    """Kernel parameters for data of the given spread: a period is a length, so it scales with the data."""
    p = dict(PARAMS.get(kernel, {}))
    if kernel == "periodic":
        p["period"] *= scale
    return p


def check(kernel, dtype, points, sources=None, weights=None, lengthscale=1.0, variance=1.0, mode="auto",
          record=None, **params):
    g, v = kernel_gradients(points, sources, weights, kernel=kernel, lengthscale=lengthscale,
                            variance=variance, dtype=dtype, mode=mode, return_value=True, **params)
    assert not np.any(np.isnan(g)) and not np.any(np.isnan(v)), f"{kernel} {dtype} {mode}: NaN in output"
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(v)), f"{kernel} {dtype} {mode}: inf in output"
    g_ref, v_ref = reference_gradients(points, sources, weights, kernel, lengthscale, variance, **params)
    g_err, v_err = relative_error(g, g_ref), relative_error(v, v_ref)
    g_bound, v_bound = accuracy_bounds(dtype, points, sources, weights, kernel, lengthscale, variance,
                                       (g_ref, v_ref), **params)
    if record is not None:
        record("g_err", g_err)
        record("v_err", v_err)
        record("g_bound", g_bound)
    assert g_err <= g_bound, f"{kernel} {dtype} mode={mode}: gradient error {g_err:.3e} > {g_bound:.2e}"
    assert v_err <= v_bound, f"{kernel} {dtype} mode={mode}: value error {v_err:.3e} > {v_bound:.2e}"
    return g, v


@pytest.fixture(scope="module")
def unit_data():
    """Queries and sources with spread 1 around the origin, signed weights."""
    rng = np.random.default_rng(7)
    q = rng.normal(size=(NQ, D))
    x = rng.normal(size=(NS, D))
    w = rng.normal(size=NS)
    return q, x, w


# centre, spread (= lengthscale)
OFFSETS = [
    (1e4, 1.0),
    (1e6, 1.0),
    (1e4, 1e-3),
    (1e6, 1e-3),
    (0.0, 1e3),
    (1e6, 1e3),
    (-3e5, 20.0),
]


@pytest.mark.sampled(6, cover=("kernel", "dtype", "center", "spread"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center,spread", OFFSETS, ids=[f"c{c:g}-s{s:g}" for c, s in OFFSETS])
@pytest.mark.parametrize("kernel", STATIONARY)
def test_far_from_origin_and_scaled(kernel, center, spread, dtype, unit_data, record_property):
    q, x, w = unit_data
    # a lengthscale is a length, except periodic's (a ratio; its period is the length and scales instead)
    ls = np.array([0.8, 1.0, 1.3]) * (1.0 if kernel == "periodic" else spread)
    check(kernel, dtype, q * spread + center, x * spread + center, w, lengthscale=ls, variance=0.6,
          record=record_property, **params_for(kernel, spread))


@pytest.mark.parametrize("center", [1e4, 1e6])
@pytest.mark.parametrize("kernel", STATIONARY)
def test_float32_translation_invariance(kernel, center, unit_data):
    """Shifting every point by ``center`` leaves float32 results (from float64 inputs) within the bound."""
    q, x, w = unit_data
    kw = dict(kernel=kernel, lengthscale=[0.8, 1.0, 1.3], dtype="float32", return_value=True,
              **params_for(kernel))
    g0, v0 = kernel_gradients(q, x, w, **kw)
    g1, v1 = kernel_gradients(q + center, x + center, w, **kw)
    g_ref, v_ref = reference_gradients(q, x, w, kernel, [0.8, 1.0, 1.3], **params_for(kernel))
    assert relative_error(g1, g_ref) <= FLOAT32_BOUND
    assert relative_error(v1, v_ref) <= FLOAT32_BOUND
    assert relative_error(g1, g0) <= 2 * FLOAT32_BOUND
    assert relative_error(v1, v0) <= 2 * FLOAT32_BOUND


def test_shift_along_one_axis_only(unit_data):
    """A large offset in one coordinate only (e.g. UTM northing next to a small easting)."""
    q, x, w = unit_data
    shift = np.array([0.0, 4.5e6, -2.0])
    for kernel in ("rbf", "matern32"):
        check(kernel, "float32", q + shift, x + shift, w, lengthscale=[1.0, 0.5, 2.0])


# --- duplicates and clusters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duplicated():
    """Every point twice (N = 200), spread 1."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(NS // 2, D))
    return np.repeat(base, 2, axis=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_exact_duplicates_self_sum(kernel, dtype, duplicated, record_property):
    """sources = points, every point twice: each point meets itself and its twin at r = 0."""
    ls = [0.8, 1.0, 1.3] if kernel in USES_LENGTHSCALE else 1.0
    g, _ = check(kernel, dtype, duplicated, lengthscale=ls, record=record_property, **params_for(kernel))
    if kernel in STATIONARY:  # twins get the same rows
        tol = (FLOAT64_BOUND if dtype == "float64" else FLOAT32_BOUND) * np.max(np.abs(g))
        np.testing.assert_allclose(g[0::2], g[1::2], rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["matern12", "matern32", "matern52"])
def test_exact_duplicates_generic_mode(kernel, dtype, duplicated):
    check(kernel, dtype, duplicated, lengthscale=[0.8, 1.0, 1.3], mode="jacfwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["matern12", "matern32", "matern52", "rbf"])
def test_query_on_top_of_a_source(kernel, dtype):
    """One query exactly on a source among others: that pair contributes 0, the rest count in full."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(NS, D))
    q = np.concatenate([x[:5], rng.normal(size=(NQ - 5, D))])
    w = rng.normal(size=NS)
    check(kernel, dtype, q, x, w, lengthscale=1.1)


@pytest.mark.parametrize("dtype,mode", [("float64", "auto"), ("float64", "jacfwd"), ("float64", "jacrev"),
                                        ("float32", "auto")])
def test_matern12_single_duplicate_pair_is_exactly_zero(dtype, mode):
    p = np.array([[0.3, -0.2, 7.0]])
    g, v = kernel_gradients(p, p, kernel="matern12", lengthscale=0.7, variance=2.0, dtype=dtype, mode=mode,
                            return_value=True)
    assert np.all(g == 0.0), (dtype, mode, g)
    assert v[0] == pytest.approx(2.0, rel=1e-6)


def _clusters(rng, within, n_clusters=10, n=NS):
    centers = rng.normal(size=(n_clusters, D)) * 3.0
    return centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, D)) * within


@pytest.mark.sampled(6, cover=("kernel", "dtype", "within"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("within", [1e-2, 1e-3, 1e-5])
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_clustered_data(kernel, within, dtype, record_property):
    """10 tight clusters (within-cluster spread 1e-2 .. 1e-5 of the lengthscale), self-sum, unit weights."""
    pts = _clusters(np.random.default_rng(10), within)
    check(kernel, dtype, pts, record=record_property, **params_for(kernel))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["matern12", "matern32", "matern52"])
def test_clustered_data_generic_mode(kernel, dtype):
    pts = _clusters(np.random.default_rng(10), 1e-3)
    check(kernel, dtype, pts, mode="jacfwd")


@pytest.mark.parametrize("kernel", ["matern12", "matern32", "matern52", "rbf"])
def test_nearby_points_one_dimensional(kernel):
    """Ordinary random 1-D data: 37 x 101 pairs, the closest at about 1e-3 lengthscales."""
    rng = np.random.default_rng(11)
    q, x, w = rng.normal(size=37) * 1.5, rng.normal(size=101) * 1.5, rng.normal(size=101)
    for dtype in DTYPES:
        check(kernel, dtype, q, x, w, lengthscale=0.8, variance=2.5)


# matern12 (the closest pairs matter most to its fast path) in both dtypes and rbf in float32 stay in the
# default suite; the other cases (each a compile of its own) are slow.
SELF_SUM_2000 = [pytest.param(k, d, marks=[] if (k == "matern12" or (k, d) == ("rbf", "float32")) else
                              [pytest.mark.slow], id=f"{k}-{d}")
                 for k in ("matern12", "matern32", "matern52", "rbf") for d in DTYPES]


@pytest.mark.parametrize("kernel,dtype", SELF_SUM_2000)
def test_one_dimensional_self_sum_of_2000_points(kernel, dtype, record_property):
    """2000 standard-normal 1-D points (closest pair about 3e-7 apart), all pairs, unit weights."""
    x = np.random.default_rng(5).normal(size=2000)
    check(kernel, dtype, x, record=record_property)


# --- sizes that are not multiples of the tile shapes ------------------------------------------------------


RAGGED = [(k, 1027) for k in KERNEL_NAMES] + [(k, 1000) for k in ("rbf", "matern12", "linear")]
# Default suite: a radial (rbf, matern12's fast path), the periodic and a dot-product kernel at 1027 rows, and
# rbf at 1000; the rest (a compile each) are slow.
RAGGED_FAST = {("rbf", 1027), ("matern12", 1027), ("periodic", 1027), ("polynomial", 1027), ("rbf", 1000)}
RAGGED = [pytest.param(k, n, marks=[] if (k, n) in RAGGED_FAST else [pytest.mark.slow], id=f"{k}-{n}")
          for k, n in RAGGED]


@pytest.mark.parametrize("kernel,n", RAGGED)
def test_ragged_sizes_float32(kernel, n, record_property):
    rng = np.random.default_rng(n)
    pts = rng.normal(size=(n, 2)) * 2.0
    w = rng.uniform(0.1, 1.0, size=n)
    ls = [0.9, 1.4] if kernel in USES_LENGTHSCALE else 1.0
    check(kernel, "float32", pts, None, w, lengthscale=ls, record=record_property, **params_for(kernel))


@pytest.mark.parametrize("kernel", ["rbf", "matern32", "periodic", "polynomial"])
def test_ragged_sizes_float64_queries_differ(kernel):
    """1027 queries against 1000 sources: several query blocks and source tiles, both ragged."""
    rng = np.random.default_rng(3)
    q, x, w = rng.normal(size=(1027, 2)), rng.normal(size=(1000, 2)), rng.normal(size=1000)
    ls = [0.9, 1.4] if kernel in USES_LENGTHSCALE else 1.0
    check(kernel, "float64", q, x, w, lengthscale=ls, **params_for(kernel))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["rbf", "periodic"])
def test_ragged_sizes_generic_mode(kernel):
    rng = np.random.default_rng(4)
    pts = rng.normal(size=(1027, 2))
    check(kernel, "float32", pts, lengthscale=[0.9, 1.4], mode="jacfwd", **params_for(kernel))
    check(kernel, "float32", pts, lengthscale=[0.9, 1.4], mode="jacrev", **params_for(kernel))
