"""The oracle proves itself: hand-derived gradients vs finite differences, vectorised vs scalar values.

Pure numpy, no JAX, no pipeline import: these tests pass or fail on the oracle alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from reference import (
    DEFAULTS,
    KERNEL_NAMES,
    STATIONARY,
    USES_LENGTHSCALE,
    finite_difference_gradients,
    reference_gradients,
    relative_error,
    scalar_kernel,
)

# Non-default kernel parameters, so that every parameter's place in the formula is exercised.
PARAMS = {
    "rational_quadratic": {"alpha": 0.7},
    "imq": {"c": 1.3, "beta": 0.8},
    "periodic": {"period": 2.3},
    "polynomial": {"c": 0.5, "degree": 3},
}


def finite_difference_check(kernel, q, x, w, lengthscale, variance, params, rtol=1e-8):
    """Assert the oracle's analytic g equals 4th-order central differences of its own v (float64)."""
    g, _ = reference_gradients(q, x, w, kernel, lengthscale, variance, **params)
    g_fd = finite_difference_gradients(q, x, w, kernel, lengthscale, variance, **params)
    g2 = g if g.ndim == 2 else g[:, None]
    err = relative_error(g2, g_fd)
    assert err < rtol, f"{kernel}: analytic gradient differs from finite differences by {err:.3e}"
    return err


def _data(rng, n, m, d, spread=1.0):
    return rng.normal(size=(n, d)) * spread, rng.normal(size=(m, d)) * spread, rng.normal(size=m)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_gradient_matches_finite_differences(kernel):
    rng = np.random.default_rng(1)
    q, x, w = _data(rng, 7, 11, 3)
    ls = [0.7, 1.3, 2.1] if kernel in USES_LENGTHSCALE else 1.0
    finite_difference_check(kernel, q, x, w, ls, 1.7, PARAMS.get(kernel, {}))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_gradient_matches_finite_differences_default_params(kernel):
    rng = np.random.default_rng(2)
    q, x, w = _data(rng, 5, 9, 2)
    finite_difference_check(kernel, q, x, w, 1.0, 1.0, {})


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_gradient_matches_finite_differences_1d(kernel):
    rng = np.random.default_rng(3)
    q, x, w = rng.normal(size=6), rng.normal(size=8), rng.normal(size=8)
    g, v = reference_gradients(q, x, w, kernel, 0.8 if kernel in USES_LENGTHSCALE else 1.0, 2.0,
                               **PARAMS.get(kernel, {}))
    assert g.shape == (6,) and v.shape == (6,)
    finite_difference_check(kernel, q, x, w, 0.8 if kernel in USES_LENGTHSCALE else 1.0, 2.0,
                            PARAMS.get(kernel, {}))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_values_match_scalar_formulas(kernel):
    rng = np.random.default_rng(4)
    q, x, w = _data(rng, 4, 5, 3)
    ls = [0.7, 1.3, 2.1] if kernel in USES_LENGTHSCALE else 1.0
    params = PARAMS.get(kernel, {})
    _, v = reference_gradients(q, x, w, kernel, ls, 1.7, **params)
    expected = [math.fsum(w[i] * scalar_kernel(kernel, q[j], x[i], ls, 1.7, **params) for i in range(5))
                for j in range(4)]
    np.testing.assert_allclose(v, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_self_sum_and_blocking(kernel):
    """sources=None and weights=None mean (points, ones); row blocking does not change the result."""
    import reference

    rng = np.random.default_rng(5)
    q = rng.normal(size=(50, 2))
    params = PARAMS.get(kernel, {})
    g1, v1 = reference_gradients(q, None, None, kernel, 1.1, 1.0, **params)
    g2, v2 = reference_gradients(q, q, np.ones(50), kernel, 1.1, 1.0, **params)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(v1, v2)
    old = reference._BLOCK_ELEMENTS
    try:
        reference._BLOCK_ELEMENTS = 7 * 50 * 2  # blocks of 7 rows, last one ragged
        g3, v3 = reference_gradients(q, None, None, kernel, 1.1, 1.0, **params)
    finally:
        reference._BLOCK_ELEMENTS = old
    np.testing.assert_allclose(g3, g1, rtol=0, atol=1e-14 * np.max(np.abs(g1)))
    np.testing.assert_allclose(v3, v1, rtol=0, atol=1e-14 * np.max(np.abs(v1)))


@pytest.mark.parametrize("kernel", ["matern12", "matern32", "matern52", "rbf", "rational_quadratic", "imq",
                                    "periodic"])
def test_duplicate_points_contribute_zero_gradient(kernel):
    """At r = 0 every stationary kernel's pair gradient is 0 (matern12 by convention), never NaN."""
    q = np.array([[0.3, -0.2]])
    g, v = reference_gradients(q, q, None, kernel, [0.5, 2.0], 1.5)
    assert np.all(np.isfinite(g)) and np.all(g == 0.0)
    assert v[0] == pytest.approx(1.5)  # k(q, q) = s2 for every stationary kernel (imq: c = 1)


def test_matern12_one_sided_limits_near_zero():
    """matern12's pair gradient is a unit-vector step (-s2 sign(delta)/l) next to r = 0, 0 exactly at it."""
    x = np.array([[0.0]])
    for delta in (1e-12, -1e-12):
        g, _ = reference_gradients(np.array([[delta]]), x, None, "matern12", 2.0, 3.0)
        assert g[0, 0] == pytest.approx(-3.0 * np.sign(delta) / 2.0, rel=1e-9)


def test_known_identities():
    rng = np.random.default_rng(6)
    q, x, w = _data(rng, 6, 7, 2)
    # rational quadratic -> rbf as alpha -> infinity
    g_rq, v_rq = reference_gradients(q, x, w, "rational_quadratic", 0.9, 1.2, alpha=1e8)
    g_rbf, v_rbf = reference_gradients(q, x, w, "rbf", 0.9, 1.2)
    assert relative_error(g_rq, g_rbf) < 1e-6 and relative_error(v_rq, v_rbf) < 1e-6
    # imq with c = 1, beta = 1 is the Cauchy kernel 1 / (1 + r^2) = rational quadratic with alpha = 1, l / sqrt2
    g_imq, v_imq = reference_gradients(q, x, w, "imq", 1.0, 1.0, c=1.0, beta=1.0)
    g_c, v_c = reference_gradients(q, x, w, "rational_quadratic", 1.0 / math.sqrt(2.0), 1.0, alpha=1.0)
    assert relative_error(g_imq, g_c) < 1e-13 and relative_error(v_imq, v_c) < 1e-13
    # polynomial with degree 1, c = 0 is linear
    g_p, v_p = reference_gradients(q, x, w, "polynomial", 1.0, 2.0, c=0.0, degree=1)
    g_l, v_l = reference_gradients(q, x, w, "linear", 1.0, 2.0)
    assert relative_error(g_p, g_l) < 1e-14 and relative_error(v_p, v_l) < 1e-14
    # linear: g_j = s2 sum_i w_i x_i for every j
    np.testing.assert_allclose(g_l, np.tile(2.0 * w @ x, (6, 1)), rtol=1e-13)
    # matern12 in 1-D is exp(-|q - x| / l)
    q1, x1 = q[:, 0], x[:, 0]
    _, v12 = reference_gradients(q1, x1, w, "matern12", 0.6, 1.0)
    np.testing.assert_allclose(v12, np.exp(-np.abs(q1[:, None] - x1[None, :]) / 0.6) @ w, rtol=1e-13)
    # periodic: shifting queries by a whole period changes nothing
    g_a, v_a = reference_gradients(q, x, w, "periodic", [0.8, 1.4], 1.0, period=2.3)
    g_b, v_b = reference_gradients(q + 2.3, x, w, "periodic", [0.8, 1.4], 1.0, period=2.3)
    assert relative_error(g_b, g_a) < 1e-12 and relative_error(v_b, v_a) < 1e-12


@pytest.mark.parametrize("kernel", STATIONARY)
def test_oracle_is_exact_far_from_origin(kernel):
    """Shifting everything by 1e6 (exactly representable shifts of dyadic data) leaves the oracle unchanged."""
    rng = np.random.default_rng(7)
    q = np.round(rng.normal(size=(9, 2)) * 1024) / 1024  # dyadic: q + 2^20 is exact in float64
    x = np.round(rng.normal(size=(13, 2)) * 1024) / 1024
    w = rng.normal(size=13)
    g0, v0 = reference_gradients(q, x, w, kernel, [0.9, 1.1], 1.0)
    g1, v1 = reference_gradients(q + 2.0**20, x + 2.0**20, w, kernel, [0.9, 1.1], 1.0)
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(v0, v1)


def test_defaults_table_matches_design():
    assert DEFAULTS == {
        "rational_quadratic": {"alpha": 1.0},
        "imq": {"c": 1.0, "beta": 0.5},
        "periodic": {"period": 1.0},
        "polynomial": {"c": 1.0, "degree": 2},
    }


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError):
        reference_gradients(np.zeros((2, 1)), kernel="rbf", alpha=2.0)
