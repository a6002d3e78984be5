"""Accuracy of ``pipeline.kernel_gradients`` against the independent float64 numpy oracle.

Metric: ``err = max |g - g_ref| / max |g_ref|`` (the same for v).  Bounds (``reference.py``):

* float64: ``err <= 1e-10`` everywhere;
* float32: ``err <= 2e-5`` on well-conditioned data.  Measured worst cases on a 2-core x86 CPU (ARD
  lengthscales, signed weights, N = 37 / M = 101 / D = 3, 1-D and 333-point self sums): g about 1.4e-6 for
  every kernel except matern12's fast path (2.4e-6 at D = 3, 3.8e-5 in 1-D, where pairs 1e-3 lengthscales
  apart occur); v at most 1.0e-6.  The generic modes (jacfwd, jacrev) stay below 1e-6 throughout.

Shapes are fixed and few, so compiled tile functions are reused across tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import (
    FLOAT32_BOUND,
    FLOAT64_BOUND,
    KERNEL_NAMES,
    USES_LENGTHSCALE,
    reference_gradients,
    relative_error,
)

import pipeline  # noqa: E402  (an import error must fail, never skip)

# The default suite runs a sample of each parametrised test (each parameter value at least once); --runslow all.
pytestmark = pytest.mark.sampled(4)

kernel_gradients = pipeline.kernel_gradients

DTYPES = ("float64", "float32")
MODES = ("auto", "jacfwd", "jacrev")
BOUND = {"float64": FLOAT64_BOUND, "float32": FLOAT32_BOUND}
# Non-default kernel parameters, so every parameter's place in the formula is exercised.
PARAMS = {
    "rational_quadratic": {"alpha": 0.7},
    "imq": {"c": 1.3, "beta": 0.8},
    "periodic": {"period": 2.3},
    "polynomial": {"c": 0.5, "degree": 3},
}
ARD = [0.7, 1.3, 2.1]
VARIANCE = 1.7
N, M, D = 37, 101, 3


def lengthscale_for(kernel, ls):
    return ls if kernel in USES_LENGTHSCALE else 1.0


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20240611)
    q = rng.normal(size=(N, D))
    x = rng.normal(size=(M, D)) * 1.2 + 0.1
    w = rng.normal(size=M)  # signed weights (GP mean alpha, SVGD-like sums)
    return q, x, w


def compare(kernel, dtype, points, sources=None, weights=None, mode="auto", lengthscale=1.0, variance=1.0,
            bound=None, record=None, **params):
    """Run the implementation, check shapes/dtype/finiteness and return (g_err, v_err) vs the oracle."""
    g, v = kernel_gradients(points, sources, weights, kernel=kernel, lengthscale=lengthscale,
                            variance=variance, dtype=dtype, mode=mode, return_value=True, **params)
    g_ref, v_ref = reference_gradients(points, sources, weights, kernel, lengthscale, variance, **params)
    assert g.shape == g_ref.shape and v.shape == v_ref.shape
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(v)), f"{kernel} {dtype} {mode}: NaN/inf in output"
    g_err, v_err = relative_error(g, g_ref), relative_error(v, v_ref)
    if record is not None:
        record("g_err", g_err)
        record("v_err", v_err)
    bound = BOUND[dtype] if bound is None else bound
    assert g_err <= bound, f"{kernel} {dtype} mode={mode}: gradient error {g_err:.3e} > {bound:.1e}"
    assert v_err <= bound, f"{kernel} {dtype} mode={mode}: value error {v_err:.3e} > {bound:.1e}"
    return g_err, v_err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_matches_reference(kernel, mode, dtype, data, record_property):
    """ARD lengthscales, variance 1.7, non-default parameters, signed weights, N != M."""
    q, x, w = data
    compare(kernel, dtype, q, x, w, mode=mode, lengthscale=lengthscale_for(kernel, ARD), variance=VARIANCE,
            record=record_property, **PARAMS.get(kernel, {}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_modes_agree(kernel, dtype, data):
    """auto (structured fast path), jacfwd and jacrev give the same sums (same tile shapes: no recompile)."""
    q, x, w = data
    kw = dict(kernel=kernel, lengthscale=lengthscale_for(kernel, ARD), variance=VARIANCE, dtype=dtype,
              return_value=True, **PARAMS.get(kernel, {}))
    results = {mode: kernel_gradients(q, x, w, mode=mode, **kw) for mode in MODES}
    g0, v0 = results["auto"]
    for mode in ("jacfwd", "jacrev"):
        g, v = results[mode]
        assert relative_error(g, g0) <= 2 * BOUND[dtype], f"{kernel} {dtype}: {mode} vs auto (g)"
        assert relative_error(v, v0) <= 2 * BOUND[dtype], f"{kernel} {dtype}: {mode} vs auto (v)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_default_parameters(kernel, dtype, data):
    """No kernel parameters given: the documented defaults (alpha=1; c=1, beta=0.5; period=1; c=1, degree=2)."""
    q, x, w = data
    compare(kernel, dtype, q, x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_one_dimensional_input(kernel, dtype, record_property):
    """points of shape (N,) mean D = 1; g then has shape (N,)."""
    rng = np.random.default_rng(11)
    q, x, w = rng.normal(size=N) * 1.5, rng.normal(size=M) * 1.5, rng.normal(size=M)
    ls = lengthscale_for(kernel, 0.8)
    g_err, _ = compare(kernel, dtype, q, x, w, lengthscale=ls, variance=2.5, record=record_property,
                       **PARAMS.get(kernel, {}))
    g = kernel_gradients(q, x, w, kernel=kernel, lengthscale=ls, variance=2.5, dtype=dtype,
                         **PARAMS.get(kernel, {}))
    assert g.shape == (N,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_self_sum_defaults(kernel, dtype, record_property):
    """sources=None, weights=None: all pairs of 333 points with unit weights (the seed post's quantity)."""
    rng = np.random.default_rng(12)
    pts = rng.normal(size=(333, 2)) * np.array([1.0, 2.0])
    compare(kernel, dtype, pts, lengthscale=lengthscale_for(kernel, [0.9, 1.7]), record=record_property,
            **PARAMS.get(kernel, {}))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_scalar_lengthscale_equals_repeated(kernel, data):
    q, x, w = data
    if kernel not in USES_LENGTHSCALE:
        pytest.skip("no lengthscale")
    g1 = kernel_gradients(q, x, w, kernel=kernel, lengthscale=1.3, dtype="float64")
    g2 = kernel_gradients(q, x, w, kernel=kernel, lengthscale=[1.3, 1.3, 1.3], dtype="float64")
    np.testing.assert_allclose(g1, g2, rtol=0, atol=1e-13 * np.max(np.abs(g1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_value_shapes_and_dtypes(dtype, data):
    q, x, w = data
    g = kernel_gradients(q, x, w, dtype=dtype)
    assert isinstance(g, np.ndarray) and g.shape == (N, D) and g.dtype == np.dtype(dtype)
    out = kernel_gradients(q, x, w, dtype=dtype, return_value=True)
    assert isinstance(out, tuple) and len(out) == 2
    g2, v = out
    assert g2.shape == (N, D) and v.shape == (N,) and v.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(g, g2)
    g1, v1 = kernel_gradients(q[:, 0], x[:, 0], w, dtype=dtype, return_value=True)
    assert g1.shape == (N,) and v1.shape == (N,)
    gs, vs = kernel_gradients(q, dtype=dtype, return_value=True)  # sources default to points
    assert gs.shape == (N, D) and vs.shape == (N,)


def test_weights_default_to_ones_and_sum_linearly(data):
    q, x, w = data
    g_ones = kernel_gradients(q, x, None, dtype="float64")
    np.testing.assert_allclose(kernel_gradients(q, x, np.ones(M), dtype="float64"), g_ones, rtol=1e-14,
                               atol=1e-14)
    g_w = kernel_gradients(q, x, w, dtype="float64")
    g_sum = kernel_gradients(q, x, w + 1.0, dtype="float64")
    np.testing.assert_allclose(g_sum, g_w + g_ones, rtol=0, atol=1e-12 * np.max(np.abs(g_sum)))


def test_derivative_is_with_respect_to_first_argument():
    """A non-symmetric pair: g(q; x) = -(grad w.r.t. x), so the sign tells the two arguments apart."""
    q = np.array([[0.0, 0.0]])
    x = np.array([[1.0, 0.5]])
    g = kernel_gradients(q, x, kernel="rbf", dtype="float64")
    k = np.exp(-0.5 * 1.25)
    np.testing.assert_allclose(g, [[k * 1.0, k * 0.5]], rtol=1e-13)  # points towards the source


@pytest.mark.parametrize("variance", [0.01, 1.0, 250.0])
def test_variance_scales_linearly(variance, data):
    q, x, w = data
    g1, v1 = kernel_gradients(q, x, w, kernel="matern52", lengthscale=ARD, dtype="float64",
                              return_value=True)
    gv, vv = kernel_gradients(q, x, w, kernel="matern52", lengthscale=ARD, variance=variance,
                              dtype="float64", return_value=True)
    assert relative_error(gv, variance * g1) <= FLOAT64_BOUND
    assert relative_error(vv, variance * v1) <= FLOAT64_BOUND


# --- user kernels ('module:function') ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_user_kernel_logcosh(mode, dtype, data, record_property):
    from user_kernels import logcosh_reference

    q, x, w = data
    g, v = kernel_gradients(q, x, w, kernel="user_kernels:logcosh", lengthscale=ARD, variance=VARIANCE,
                            gamma=1.5, dtype=dtype, mode=mode, return_value=True)
    g_ref, v_ref = logcosh_reference(q, x, w, ARD, VARIANCE, 1.5)
    g_err, v_err = relative_error(g, g_ref), relative_error(v, v_ref)
    record_property("g_err", g_err)
    assert g.shape == (N, D) and v.shape == (N,)
    assert g_err <= BOUND[dtype] and v_err <= BOUND[dtype], (g_err, v_err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_user_kernel_non_stationary(dtype, data):
    """A user kernel is treated as non-stationary: inputs must not be re-centred for it."""
    from user_kernels import cubic_dot_reference

    q, x, w = data
    g, v = kernel_gradients(q + 3.0, x + 3.0, w, kernel="user_kernels:cubic_dot", variance=0.5, dtype=dtype,
                            return_value=True)
    g_ref, v_ref = cubic_dot_reference(q + 3.0, x + 3.0, w, 0.5)
    assert relative_error(g, g_ref) <= BOUND[dtype]
    assert relative_error(v, v_ref) <= BOUND[dtype]


def test_user_kernel_one_dimensional():
    from user_kernels import logcosh_reference

    rng = np.random.default_rng(13)
    q, x, w = rng.normal(size=N), rng.normal(size=M), rng.normal(size=M)
    g = kernel_gradients(q, x, w, kernel="user_kernels:logcosh", lengthscale=0.6, gamma=2.0,
                         dtype="float64")
    g_ref, _ = logcosh_reference(q[:, None], x[:, None], w, 0.6, 1.0, 2.0)
    assert g.shape == (N,)
    assert relative_error(g, g_ref[:, 0]) <= FLOAT64_BOUND


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["rbf", "matern52", "periodic", "polynomial"])
def test_float32_input_arrays(kernel, dtype, data):
    """Inputs that are already float32 arrays (as loaded from float32 zarr/npy files)."""
    q, x, w = (a.astype(np.float32) for a in data)
    compare(kernel, dtype, q, x, w, lengthscale=lengthscale_for(kernel, ARD), variance=VARIANCE,
            **PARAMS.get(kernel, {}))


GAUSSIAN_FAMILY = [name for name, k in pipeline.KERNELS.items() if k.exponent is not None]


def test_gaussian_family_declared():
    """rbf declares its exponent, so ``--mode auto`` takes the one-exp, one-GEMM tile."""
    assert GAUSSIAN_FAMILY == ["rbf"]


@pytest.mark.parametrize("kernel", GAUSSIAN_FAMILY)
def test_gaussian_exponent_is_consistent(kernel):
    """The structure the one-GEMM tile relies on: f(r2) = f(0) exp(e(r2)), e(0) = 0, e linear and
    decreasing (JAX's second derivative of e is 0, its first is negative and the same everywhere)."""
    import jax

    from pipeline.precision import x64_enabled
    k = pipeline.KERNELS[kernel]
    p = {"lengthscale": np.ones(3), "variance": np.float64(VARIANCE)}
    r2 = np.array([0.0, 1e-8, 0.3, 1.0, 7.5, 40.0])
    e = lambda t: k.exponent(t, p)  # noqa: E731
    with x64_enabled():
        f0 = float(k.radial_profile(np.float64(0.0), p))
        np.testing.assert_allclose([k.radial_profile(t, p) for t in r2], f0 * np.exp([e(t) for t in r2]),
                                   rtol=1e-14)
        assert float(e(np.float64(0.0))) == 0.0
        slopes = [float(jax.jacfwd(e)(np.float64(t))) for t in r2]
        assert slopes[0] < 0 and all(s == slopes[0] for s in slopes)
        assert all(float(jax.jacfwd(jax.jacfwd(e))(np.float64(t))) == 0.0 for t in r2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", GAUSSIAN_FAMILY)
def test_gaussian_tile_matches_general_radial_tile(kernel, dtype, data):
    """The one-GEMM tile and the general radial tile (f' from vmap(jacfwd(f)), two GEMMs) agree."""
    import jax.numpy as jnp

    from pipeline import tiles
    from pipeline.precision import x64_enabled
    q, x, w = (np.asarray(a, dtype) for a in data)
    k = pipeline.KERNELS[kernel]
    with x64_enabled(dtype == "float64"):
        p = {"lengthscale": jnp.asarray(ARD, dtype), "variance": jnp.asarray(VARIANCE, dtype)}
        g1, v1 = tiles._gaussian_tile(k.radial_profile, k.exponent, q, x, w, p)
        g2, v2 = tiles._radial_tile(k.radial_profile, False, q, x, w, p)
        assert relative_error(np.asarray(g1), np.asarray(g2)) <= BOUND[dtype]
        assert relative_error(np.asarray(v1), np.asarray(v2)) <= BOUND[dtype]
