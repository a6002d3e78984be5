"""Accuracy on spread-out data layouts (issue 9): the float32 bound, and float64's 1e-10, wherever the data lie.

Metric as in ``test_accuracy.py``: ``err = max |g - g_ref| / max |g_ref|`` (and the same for v) against the
independent float64 oracle (``reference.py``).  Bounds: float64 inputs, float32 results 2e-5; float64
results 1e-10; float32 inputs, float32 results 2e-5 + 10 e_in (``accuracy_bounds``).

Layouts: 1-D grids over 10^3 to 10^4 lengthscales, clusters 10^4 and 10^5 lengthscales apart, clustered KDE
data, data 10^6 lengthscales from the origin, ARD lengthscales from 1e-3 to 1e3 on the same data, GP
posterior-mean weights (strong cancellation), heavy tails.  Every kernel and mode on one mixed layout (a
dense cluster, a far cluster and a sparse line: blocks of every variant in one call), 1-D to 3-D.  Sizes are
few and fixed, so compiled tile functions are reused.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import (FLOAT32_BOUND, FLOAT64_BOUND, KERNEL_NAMES, USES_LENGTHSCALE, accuracy_bounds,
                       reference_gradients, relative_error)

pipeline = pytest.importorskip("pipeline")
kernel_gradients = pipeline.kernel_gradients

# The default suite runs a sample of each parametrised test (each parameter value at least once); --runslow all.
pytestmark = pytest.mark.sampled(6)

BOUND = {"float64": FLOAT64_BOUND, "float32": FLOAT32_BOUND}
MODES = ("auto", "jacfwd", "jacrev")
PARAMS = {
    "rational_quadratic": {"alpha": 0.7},
    "imq": {"c": 1.3, "beta": 0.8},
    "periodic": {"period": 2.3},
    "polynomial": {"c": 0.5, "degree": 3},
}


def errors(points, sources=None, weights=None, *, kernel="rbf", lengthscale=1.0, dtype="float32", mode="auto",
           **params):
    g, v = kernel_gradients(points, sources, weights, kernel=kernel, lengthscale=lengthscale, dtype=dtype,
                            mode=mode, return_value=True, **params)
    g_ref, v_ref = reference_gradients(points, sources, weights, kernel, lengthscale, 1.0, **params)
    assert g.shape == g_ref.shape and g.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(v))
    return relative_error(g, g_ref), relative_error(v, v_ref)


def check(label, dtype, errs, bound=None):
    bound = BOUND[dtype] if bound is None else bound
    g_err, v_err = errs
    assert g_err <= bound and v_err <= bound, f"{label} {dtype}: g {g_err:.2e}, v {v_err:.2e} > {bound:.1e}"


# --- layouts --------------------------------------------------------------------------------------------------


def grid_1d():
    """The issue's grid: 6000 points 0.5 lengthscales apart over 3000 (interior g exactly 0)."""
    return np.arange(0.0, 3000.0, 0.5), None, None, 1.0


def grid_1d_wide():
    """A coarser 1-D grid over 1.2e4 lengthscales, far from the origin."""
    return 1e5 + np.arange(0.0, 12000.0, 2.5), None, None, 1.0


def clusters_1e4():
    """Two 2-D clusters 10^4 lengthscales apart."""
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.normal(size=(700, 2)), rng.normal(size=(700, 2)) + [1e4, 0.0]])
    return pts, None, None, 1.0


def clusters_1e5():
    """Three 3-D clusters 10^5 lengthscales apart, queries != sources, positive weights."""
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0, 0.0], [1e5, 0.0, 0.0], [1e5, 1e5, 0.0]])
    src = np.concatenate([rng.normal(size=(500, 3)) + c for c in centres])
    q = np.concatenate([rng.normal(size=(400, 3)) * 1.5 + c for c in centres])
    return q, src, rng.uniform(0.5, 1.5, len(src)), 1.0


def kde_3d():
    """The issue's clustered KDE data: Gaussian clusters of width 1 in a 100-wide box, h = 0.3."""
    rng = np.random.default_rng(3)
    centres = rng.uniform(0.0, 100.0, (1000, 3))
    return (centres[:, None, :] + rng.normal(size=(1000, 3, 3))).reshape(-1, 3), None, None, 0.3


def offset_1e6():
    """Ordinary dense data 10^6 lengthscales from the origin (ARD)."""
    rng = np.random.default_rng(4)
    ls = np.array([0.7, 1.3, 2.1])
    return rng.normal(size=(2000, 3)) * 1.5 + 1e6 * ls, None, None, ls


def ard_mismatched():
    """ARD lengthscales 1e-3, 1, 1e3 on data whose spread per dimension is 0.1, 10, 1e3."""
    rng = np.random.default_rng(5)
    return rng.normal(size=(1500, 3)) * [0.1, 10.0, 1e3], None, None, np.array([1e-3, 1.0, 1e3])


def gp_alpha():
    """GP posterior-mean gradient: weights alpha = (K + s^2 I)^-1 y, of both signs, strongly cancelling."""
    rng = np.random.default_rng(6)
    x = np.sort(rng.uniform(0.0, 50.0, 500))
    y = np.sin(x) + 0.1 * rng.normal(size=500)
    kernel = np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2)
    alpha = np.linalg.solve(kernel + 1e-2 * np.eye(500), y)
    return np.linspace(-2.0, 52.0, 1500), x, alpha, 1.0


LAYOUTS = {f.__name__: f for f in (grid_1d, grid_1d_wide, clusters_1e4, clusters_1e5, kde_3d, offset_1e6,
                                   ard_mismatched, gp_alpha)}


@pytest.fixture(scope="module")
def layouts():
    return {name: make() for name, make in LAYOUTS.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rbf_layouts(layout, dtype, layouts):
    q, x, w, ls = layouts[layout]
    check(layout, dtype, errors(q, x, w, lengthscale=ls, dtype=dtype))


def test_issue_grid_interior_is_flat(layouts):
    """The issue's symptom: on the 1-D grid, interior v is 5.013257 (to float32) and interior g is 0."""
    q, _, _, _ = layouts["grid_1d"]
    g, v = kernel_gradients(q, return_value=True)
    interior = slice(100, -100)
    assert np.max(np.abs(v[interior] - 5.0132565)) < 2e-5 * 5.0132565
    assert np.max(np.abs(g[interior])) < 2e-5 * np.max(np.abs(g))


# --- every kernel, every mode, on one mixed layout -----------------------------------------------------------


def mixed(dim):
    """A dense cluster at 3e4, a far cluster 10^4 lengthscales away, and a sparse line between (spacing 7):
    compact blocks (float32 tiles) and wide ones (float64, GEMM and direct) in one run; positive weights."""
    rng = np.random.default_rng(10 + dim)
    base = np.full(dim, 3e4)
    line = np.zeros((300, dim))
    line[:, 0] = np.arange(300) * 7.0 + 2000.0
    pts = np.concatenate([rng.normal(size=(600, dim)) + base, rng.normal(size=(300, dim)) * 2 + base + 1e4,
                          line + base])
    return pts, rng.uniform(0.5, 1.5, len(pts))


def lengthscale_for(kernel, dim):
    return list(np.linspace(0.8, 1.6, dim)) if kernel in USES_LENGTHSCALE else 1.0


# Default suite: every kernel in mode auto, and the generic modes (jacfwd, jacrev) for a radial kernel (rbf),
# matern12 (its own fast path in auto) and a dot-product kernel (polynomial), in both dtypes; the other
# generic-mode cases (a compile each) are slow.
GENERIC_FAST = ("rbf", "matern12", "polynomial")
MIXED_CASES = [pytest.param(k, m, d, marks=[] if m == "auto" or k in GENERIC_FAST else [pytest.mark.slow],
                            id=f"{k}-{m}-{d}")
               for k in KERNEL_NAMES for m in MODES for d in ("float32", "float64")]


@pytest.mark.parametrize("kernel,mode,dtype", MIXED_CASES)
def test_every_kernel_and_mode_on_mixed_layout(kernel, mode, dtype):
    dim = 2
    pts, w = mixed(dim)
    if kernel in ("linear", "polynomial"):  # not re-centred: their values depend on the origin
        pts = pts - pts.mean(axis=0)
        pts = pts / np.max(np.abs(pts)) * 3.0
    check(f"{kernel} {mode}", dtype, errors(pts, None, w, kernel=kernel, mode=mode, dtype=dtype,
                                           lengthscale=lengthscale_for(kernel, dim), **PARAMS.get(kernel, {})))


# Default suite: four kernels, each in one of the two dimensions (test_every_kernel_and_mode_on_mixed_layout runs
# every kernel in 2-D); the rest is slow.
STATIONARY_1D_3D = [pytest.param(k, dim, marks=[] if (i + j) % 2 == 0 and k in ("rbf", "matern12", "rational_quadratic",
                                                                                    "imq") else [pytest.mark.slow],
                                 id=f"{k}-{dim}")
                    for i, k in enumerate(["rbf", "matern12", "matern32", "matern52", "rational_quadratic", "imq",
                                           "periodic"]) for j, dim in enumerate((1, 3))]


@pytest.mark.parametrize("kernel,dim", STATIONARY_1D_3D)
def test_stationary_kernels_mixed_layout_1d_3d(kernel, dim):
    pts, w = mixed(dim)
    for dtype in ("float32", "float64"):
        check(f"{kernel} D={dim}", dtype, errors(pts, None, w, kernel=kernel, dtype=dtype,
                                                lengthscale=lengthscale_for(kernel, dim), **PARAMS.get(kernel, {})))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", ["rbf", "matern52", "rational_quadratic"])
def test_isolated_points(kernel, dtype):
    """Points 7 lengthscales apart (rbf: g ~ 7 exp(-24.5) ~ 1e-10 of the self term): a GEMM assembly's
    rounding (~eps e sum|F'|) would swamp g, so such blocks take exact differences."""
    pts = np.arange(1500) * 7.0 + 123.0
    check(f"{kernel} isolated", dtype, errors(pts, kernel=kernel, dtype=dtype, **PARAMS.get(kernel, {})))


# --- heavy tails, cancellation, ARD ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel,params", [("imq", {}), ("imq", {"c": 1.3, "beta": 0.8}),
                                           ("rational_quadratic", {"alpha": 0.5})])
def test_heavy_tails_on_a_long_line(kernel, params, dtype):
    """The issue's imq case: 5000 points on [0, 3000] (float32 gradient error was 0.91)."""
    pts = np.linspace(0.0, 3000.0, 5000)
    check(kernel, dtype, errors(pts, kernel=kernel, dtype=dtype, **params))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", ["rbf", "matern32", "matern52", "imq"])
def test_gp_alpha_weights(kernel, dtype, layouts):
    """Signed weights that cancel strongly: sum |w k| is ~1e3 max |v|."""
    q, x, w, _ = layouts["gp_alpha"]
    check(kernel, dtype, errors(q, x, w, kernel=kernel, dtype=dtype))


@pytest.mark.sampled(6, cover=("kernel", "dtype"))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", ["rbf", "matern12", "matern52", "rational_quadratic", "periodic"])
@pytest.mark.parametrize("lengthscale", [[1e-3, 1.0, 1e3], [1e3, 1e-3, 1.0], [1e-3, 1e3, 1e3]])
def test_ard_lengthscales_on_the_same_data(kernel, lengthscale, dtype, layouts):
    q, _, _, _ = layouts["ard_mismatched"]
    q = q[:600]
    check(f"{kernel} ls={lengthscale}", dtype, errors(q, kernel=kernel, lengthscale=lengthscale, dtype=dtype,
                                                     **PARAMS.get(kernel, {})))


@pytest.mark.parametrize("layout", ["grid_1d_wide", "clusters_1e5", "offset_1e6"])
def test_float32_inputs(layout, layouts):
    """Inputs given as float32 arrays: within 2e-5 + 10 e_in (e_in: error of rounding the inputs)."""
    q, x, w, ls = layouts[layout]
    q32 = np.asarray(q, np.float32)
    x32 = None if x is None else np.asarray(x, np.float32)
    g_bound, v_bound = accuracy_bounds("float32", q32, x32, w, "rbf", ls)
    g_err, v_err = errors(q32, x32, w, lengthscale=ls)
    assert g_err <= g_bound and v_err <= v_bound, (g_err, g_bound, v_err, v_bound)


# --- error against offset and spread (property) ---------------------------------------------------------------


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None, derandomize=True)
@given(offset=st.floats(0.0, 6.0), spread=st.floats(0.0, 5.0), kernel=st.sampled_from(["rbf", "imq", "matern32"]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_error_independent_of_offset_and_spread(offset, spread, kernel, dtype):
    """Two clusters 10^spread lengthscales apart, 10^offset from the origin: always within the bound.
    Fixed sizes (N = M = 256, D = 2): one compile per kernel and variant."""
    rng = np.random.default_rng(7)
    pts = rng.normal(size=(256, 2))
    pts[128:] += [10.0 ** spread, 0.5 * 10.0 ** spread]
    pts += 10.0 ** offset
    check(f"{kernel} offset 1e{offset:.1f} spread 1e{spread:.1f}", dtype, errors(pts, kernel=kernel, dtype=dtype))


# --- the dask task path ---------------------------------------------------------------------------------------


def test_run_task_on_wide_spread_data(tmp_path):
    """run_task (what each dask task runs) on clusters 10^4 lengthscales apart: same bound, and the same bits
    as the in-process API (same blocks, in the run's spatial order, written back in input order)."""
    import zarr

    import run_steps
    from pipeline.methods.dense import DENSE
    from pipeline.workflow import RunConfig, prepare

    q, _, _, _ = LAYOUTS["clusters_1e4"]()
    rng = np.random.default_rng(8)
    q = q[rng.permutation(len(q))]  # input order unrelated to space: only the computing order changes
    np.save(tmp_path / "points.npy", q)
    out = tmp_path / "out.zarr"
    prepared = prepare(RunConfig(points=str(tmp_path / "points.npy"), out=str(out), workers=1))
    plan = prepared.plan
    job = run_steps.start(prepared)
    for task in plan.tasks:
        DENSE.run_task(job, task)
    run_steps.finish(prepared, job)
    group = zarr.open_group(str(out), mode="r")
    g, v = np.asarray(group["gradient"][:]), np.asarray(group["value"][:])
    g_ref, v_ref = reference_gradients(q)
    assert relative_error(g, g_ref) <= FLOAT32_BOUND and relative_error(v, v_ref) <= FLOAT32_BOUND
    g_api, v_api = kernel_gradients(q, return_value=True)
    assert g_api.tobytes() == g.tobytes() and v_api.tobytes() == v.tobytes()
