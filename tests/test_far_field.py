"""The far-field method (pipeline/proxies.py, pipeline/grid_sums.py, pipeline/methods/far_field.py): its
bounds (source side, query side, the whole chain) against a float64 numpy oracle on layouts built to stress
them, the whole run's bound per query, and how the plan chooses it or says why not.  Its run guarantees (same bits on every executor, resume, worker loss,
refusals) are in test_guarantees.py, through its case in tests/methods.py."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import grid_sums
from pipeline.api import kernel_gradients
from pipeline.errors import InputError
from pipeline.problem import make_problem
from pipeline.proxies import (ORDERS, interpolation_error, lagrange, lebesgue_constant, make_grid, node_constant,
                              offsets, proxy_weights, spacing_for, spread)
from pipeline.scale_mixtures import RBF, GaussianMixture, mixture_for

SLOPE = math.exp(-0.5)  # rbf: gmax = SLOPE / l_min, kmax = 1
RQ = GaussianMixture("rational_quadratic", 1.0, 1.0, 1.0)  # alpha = 1
IMQ = GaussianMixture("imq", 1.0, 0.5, 0.5)  # c = 1, beta = 1/2: (1 + r^2)^(-1/2)
MIXTURES = {"rbf": RBF, "rational_quadratic": RQ, "imq": IMQ}


def _profile_and_slope(kernel, r2):
    """f(r2) / kmax and d f / d r2 / kmax, float64."""
    if kernel.shape is None:
        f = np.exp(-0.5 * r2)
        return f, -0.5 * f
    base = 1.0 + r2 / (2.0 * kernel.rate)
    return base ** -kernel.shape, -(kernel.shape / (2.0 * kernel.rate)) * base ** (-kernel.shape - 1.0)


def oracle(queries, sources, weights, lengthscale, kernel=RBF):
    """The kernel's sums (kmax = 1) in float64 with exact differences: g (n, D), v (n,)."""
    q = np.asarray(queries, np.float64)
    x = np.asarray(sources, np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    ls = np.broadcast_to(np.asarray(lengthscale, np.float64), (q.shape[1],))
    g, v = np.zeros(q.shape), np.zeros(len(q))
    for s in range(0, len(x), 4096):
        d = (q[:, None, :] - x[None, s:s + 4096]) / ls
        f, df = _profile_and_slope(kernel, np.einsum("qmd,qmd->qm", d, d))
        v += (f * w[s:s + 4096]).sum(1)
        g += np.einsum("qm,qmd->qd", 2.0 * df * w[s:s + 4096], d) / ls
    return g, v


def errors(g, v, g_ref, v_ref, weights, lengthscale, n_sources, kernel=RBF):
    """max_j |g^ - g| / (S gmax) and max_j |v^ - v| / (S kmax): the bound's units (kmax = 1)."""
    s = n_sources if weights is None else float(np.abs(weights).sum())
    gmax = kernel.slope / float(np.min(lengthscale))
    return (float(np.linalg.norm(g - g_ref, axis=1).max()) / (s * gmax), float(np.abs(v - v_ref).max()) / s)


def proxy_sums(queries, sources, weights, lengthscale, order, spacing):
    lower, upper = np.min(sources, 0), np.max(sources, 0)
    grid = make_grid(lower, upper, lengthscale, order, spacing)
    z, w = proxy_weights(sources, weights, grid)
    return oracle(queries, z, w, lengthscale)


# --------------------------------------------------------------------------------- the 1-D pieces


@pytest.mark.parametrize("order", ORDERS)
def test_stencil_constants(order):
    """The basis sums to 1 and reproduces polynomials of degree < p; C_p is the largest |omega| on the cell;
    the Lebesgue constant is at least the sampled maximum (it is an upper bound)."""
    t = np.linspace(0.0, 1.0, 2001)
    basis = lagrange(order, t)
    m = offsets(order)
    for degree in range(order):
        assert np.allclose(basis @ m ** degree, t ** degree, rtol=0, atol=1e-9 * 10 ** (degree / 4))
    omega = np.abs(np.prod(t[:, None] - m[None], axis=1))
    assert node_constant(order) == pytest.approx(omega.max(), rel=1e-12)
    assert int(np.argmax(omega)) == 1000  # the middle of the cell
    fine = np.linspace(0.0, 1.0, 200_001)
    assert lebesgue_constant(order) >= np.abs(lagrange(order, fine)).sum(1).max()
    c_prime, lam_prime = grid_sums.derivative_constants(order)
    assert lam_prime >= np.abs(grid_sums.lagrange_derivative(order, fine)).sum(1).max()
    omega_prime = sum(np.prod(np.delete(fine[:, None] - m[None], k, axis=1), axis=1) for k in range(order))
    assert c_prime >= np.abs(omega_prime).max()


def test_spacing_meets_the_error_and_grows_with_tolerance():
    for dim in (1, 2, 3):
        for order in ORDERS:
            for error in (1e-9, 1e-6, 1e-3):
                h = spacing_for(order, dim, error)
                assert max(interpolation_error(order, h, dim)) <= error
                assert max(interpolation_error(order, h * 1.01, dim)) > error
        assert spacing_for(8, dim, 1e-3) > spacing_for(8, dim, 1e-9)


def test_whole_chain_spacing_meets_its_bound_or_says_none():
    """grid_sums.spacing_for (what the plan uses): within the whole chain's bound, rounding allowance
    included; None where no spacing down to 1e-6 lengthscales meets it (a low order at a tiny tolerance)."""
    for dim in (1, 2, 3):
        for order in ORDERS:
            for error in (1e-9, 1e-6, 1e-3):
                h = grid_sums.spacing_for(order, dim, error)
                if h is None:
                    assert max(grid_sums.total_error(order, 1e-6, dim)) > error
                    continue
                assert max(grid_sums.total_error(order, h, dim)) <= error
                assert max(grid_sums.total_error(order, h * 1.01, dim)) > error
    assert grid_sums.spacing_for(4, 1, 1e-20) is None


# ---------------------------------------------------------------- the interpolation bound vs the oracle


def _layout(name, dim, rng):
    """(queries, sources, weights, lengthscale) of a named layout."""
    ls = np.array([0.7, 1.9, 0.3][:dim])
    if name == "far-from-origin":
        x = rng.normal(size=(3000, dim)) * 3 * ls + 1e6
        return x[rng.choice(3000, 100)] + 0.3 * ls, x, None, ls
    if name == "one-point":
        x = np.full((1, dim), -12345.678)
        return x + rng.normal(size=(50, dim)) * 2 * ls, x, np.array([2.5]), ls
    if name == "duplicates":  # a million copies of two points: the weights are sums of many equal terms
        x = np.repeat(rng.normal(size=(2, dim)), 500_000, axis=0)
        return x[[0, -1]] + rng.normal(size=(2, dim)) * ls, x, None, ls
    if name == "mixed-sign":
        x = rng.uniform(-10, 10, size=(2000, dim)) * ls
        return rng.uniform(-12, 12, size=(100, dim)) * ls, x, rng.normal(size=2000), ls
    if name == "ard-1e-3-to-1e3":
        ls = np.array([1e-3, 1e3, 1.0][:dim])
        x = rng.normal(size=(2000, dim)) * 4 * ls
        return x[:100] + 0.1 * ls, x, rng.uniform(0.1, 2, 2000), ls
    if name == "query-inside-box":
        x = rng.uniform(0, 6, size=(2000, dim)) * ls
        return rng.uniform(2, 4, size=(100, dim)) * ls, x, None, ls
    raise ValueError(name)


LAYOUTS = ("far-from-origin", "one-point", "duplicates", "mixed-sign", "ard-1e-3-to-1e3", "query-inside-box")


@pytest.mark.sampled(every=3)
@pytest.mark.parametrize("order", (6, 8, 12))
@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_interpolation_error_within_the_bound(layout, dim, order):
    """At the spacing the plan would take for an error of 1e-6, the proxies' sums differ from the true ones by
    at most the bound, per query, for k and grad k."""
    rng = np.random.default_rng([dim, order, LAYOUTS.index(layout)])
    q, x, w, ls = _layout(layout, dim, rng)
    h = spacing_for(order, dim, 1e-6)
    e_v, e_g = interpolation_error(order, h, dim)
    grid = make_grid(np.min(x, 0), np.max(x, 0), ls, order, h)
    if grid.n_nodes > 2e6:
        pytest.skip(f"{grid.n_nodes:.3g} nodes: too fine a grid for this layout's extent")
    g, v = proxy_sums(q, x, w, ls, order, h)
    g_ref, v_ref = oracle(q, x, w, ls)
    err_g, err_v = errors(g, v, g_ref, v_ref, w, ls, len(x))
    assert err_v <= e_v and err_g <= e_g, (err_v, e_v, err_g, e_g)


@pytest.mark.sampled(every=3)
@pytest.mark.parametrize("order", (4, 8, 12))
@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_chain_within_its_bound(layout, dim, order):
    """Spread, node sums, interpolation at the queries (pipeline.grid_sums) at the spacing the plan would
    take for 1e-4 (1e-3 for p = 4, whose grids are fine): within S E + S' Q of the oracle, per query."""
    _check_whole_chain(layout, dim, order, RBF, 1e-3 if order == 4 else 1e-4)


@pytest.mark.sampled(every=3)
@pytest.mark.parametrize("kernel", ("rational_quadratic", "imq"))
@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_chain_within_its_bound_for_scale_mixtures(layout, dim, kernel):
    """The same for rational_quadratic and imq (moments of the mixture in the bound, node sums by FFT with
    their rounding counted), p = 8 at the spacing for 1e-4."""
    _check_whole_chain(layout, dim, 8, MIXTURES[kernel], 1e-4)


def _check_whole_chain(layout, dim, order, kernel, target):
    rng = np.random.default_rng([dim, order, LAYOUTS.index(layout), 1])
    q, x, w, ls = _layout(layout, dim, rng)
    h = grid_sums.spacing_for(order, dim, target, kernel)
    both = np.vstack([q, x])
    grid = make_grid(both.min(0), both.max(0), ls, order, h)
    if grid.n_nodes > 4e6:
        pytest.skip(f"{grid.n_nodes:.3g} nodes: too fine a grid for this layout's extent")
    weights = spread(x, w, grid)
    s_prime = float(np.abs(weights).sum())
    g, v = grid_sums.interpolate(q, grid_sums.node_sums(weights, grid, kernel), grid)
    g_ref, v_ref = oracle(q, x, w, ls, kernel)
    err_g, err_v = errors(g, v, g_ref, v_ref, w, ls, len(x), kernel)
    s = len(x) if w is None else float(np.abs(w).sum())
    e_v, e_g = interpolation_error(order, h, dim, kernel)
    q_v, q_g = grid_sums.query_error(order, h, dim, kernel)
    rounding = grid_sums.fft_rounding(grid, kernel)  # 0 for rbf
    lam = lebesgue_constant(order)
    r_v = rounding * lam ** dim
    r_g = rounding * math.sqrt(dim) * lam ** (dim - 1) * grid_sums.derivative_constants(order)[1] / h / kernel.slope
    assert err_v <= e_v + s_prime / s * (q_v + r_v) and err_g <= e_g + s_prime / s * (q_g + r_g), (err_v, err_g)
    assert s_prime <= lam ** dim * s * (1 + 1e-12)
    assert max(e_v + s_prime / s * q_v, e_g + s_prime / s * q_g) <= target * (1 + 1e-9)


def test_query_side_derivative_constants():
    """C'_p and Lambda' bound |omega'| and sum |L'| on the cell; the basis derivative matches finite
    differences."""
    t = np.linspace(0.0, 1.0, 3001)
    for order in ORDERS:
        m = offsets(order)
        c_prime, lam_prime = grid_sums.derivative_constants(order)
        step = 1e-6
        omega = lambda s: np.prod(s[:, None] - m[None], axis=1)  # noqa: E731
        numeric = (omega(t + step) - omega(t - step)) / (2 * step)
        assert np.abs(numeric).max() <= c_prime
        slope = grid_sums.lagrange_derivative(order, t)
        numeric = (lagrange(order, t + step) - lagrange(order, t - step)) / (2 * step)
        assert np.allclose(slope, numeric, atol=1e-5 * np.abs(slope).max())
        assert np.abs(slope).sum(1).max() <= lam_prime


def test_a_layout_built_to_spend_the_bound():
    """1-D, one source in the middle of its cell (where |omega| peaks), queries scanning the distances where
    the p-th derivative of the Gaussian peaks: the measured error is a good share of the bound (it is not
    vacuous) and within it.  (Many sources spread evenly cancel each other's errors: one is the worst case
    per unit of S.)"""
    for order in (4, 8, 12):
        h = spacing_for(order, 1, 1e-4)
        x = np.array([[0.5 * h]])
        grid = make_grid(np.zeros(1), np.full(1, h), 1.0, order, h)  # the source's cell is [0, h]
        z, wz = proxy_weights(x, None, grid)
        q = np.linspace(-8, 8, 4001)[:, None]
        g, v = oracle(q, z, wz, 1.0)
        g_ref, v_ref = oracle(q, x, None, 1.0)
        err_g, err_v = errors(g, v, g_ref, v_ref, None, [1.0], 1)
        e_v, e_g = interpolation_error(order, h, 1)
        assert err_v <= e_v and err_g <= e_g
        assert err_v / e_v > 0.1 and err_g / e_g > 0.02, (order, err_v / e_v, err_g / e_g)


# ------------------------------------------------------------------------------------ whole runs


@pytest.mark.sampled(every=3)  # the default suite: each kernel and dimension once (9 examples); --runslow: 27
@pytest.mark.parametrize("kernel", sorted(MIXTURES))
@pytest.mark.parametrize("dim", (1, 2, 3))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), log_eps=st.floats(-9, -2), spread=st.floats(0.5, 30.0), signed=st.booleans())
def test_property_far_field_run_keeps_the_per_query_bound(seed, dim, log_eps, spread, signed, kernel):
    """Random layouts and tolerances, for each kernel (rbf, rational_quadratic with alpha = 1, imq with c = 1,
    beta = 1/2) and dimension, the far field forced: every query within EPS S kmax and EPS S gmax of the float64
    oracle (float64 runs: nothing but the approximation)."""
    rng = np.random.default_rng(seed)
    n = 1500
    ls = rng.uniform(0.5, 2.0, dim)
    x = rng.normal(size=(n, dim)) * spread * ls + rng.uniform(-1e4, 1e4, dim)
    w = rng.normal(size=n) if signed else rng.uniform(0.1, 3.0, n)
    eps = 10.0 ** log_eps
    try:
        g, v = kernel_gradients(x, weights=w, lengthscale=ls, tolerance=eps, dtype="float64", return_value=True,
                                method="far_field", kernel=kernel)
    except InputError as exc:  # only a grid too large for the data's extent may refuse
        assert "too many lengthscales" in str(exc)
        return
    g_ref, v_ref = oracle(x, x, w, ls, MIXTURES[kernel])
    err_g, err_v = errors(g, v, g_ref, v_ref, w, ls, n, MIXTURES[kernel])
    assert err_v <= eps and err_g <= eps, (err_v, err_g, eps)


@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_auto_picks_the_far_field_where_it_pays_and_keeps_the_bound(dtype):
    """A 2-D standard-normal cloud at lengthscale 0.5: pruning would keep most pairs, the far field is
    chosen, and in float32 the error stays within the bound plus float32 rounding."""
    x = np.random.default_rng(3).normal(size=(40000, 2))
    problem = make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, dtype=dtype)
    assert problem.method.name == "far_field"
    assert problem.plan.pairs_to_compute < 0.01 * problem.plan.pairs  # N p^D stencil terms
    g, v = kernel_gradients(x, lengthscale=0.5, tolerance=1e-6, dtype=dtype, return_value=True)
    sample = np.random.default_rng(4).choice(len(x), 300, replace=False)
    g_ref, v_ref = oracle(x[sample], x, None, 0.5)
    err_g, err_v = errors(g[sample].astype(np.float64), v[sample].astype(np.float64), g_ref, v_ref, None, [0.5],
                          len(x))
    rounding = 0.0 if dtype == "float64" else 1e-6  # float32 rounding of sums of ~S kmax, relative to S kmax
    assert err_v <= 1e-6 + rounding and err_g <= 1e-6 + rounding, (err_v, err_g)


def test_plan_says_why_not():
    """Kernels without a derived bound, D > 3 and sparse data fall back, each with its reason; a forced
    far field is refused with the same reason."""
    rng = np.random.default_rng(5)
    x2 = rng.normal(size=(3000, 2))
    cases = [
        (dict(kernel="periodic"), x2, "derived for the Gaussian scale mixtures rbf, rational_quadratic, imq"),
        (dict(kernel="matern32"), rng.normal(size=(3000, 3)) * 3, "split at every precision from 4 to 16384"),
        (dict(kernel="imq", mode="jacfwd"), x2, "that mode asks for the tiles' autodiff"),
        (dict(kernel="imq"), rng.normal(size=(3000, 3)) * 3, "entries in its FFT for imq"),
        # a far outlier: a grid of 10^9 nodes, declined on its size (its FFT bound is never evaluated)
        (dict(kernel="rational_quadratic"), np.vstack([rng.normal(size=(3000, 1)), [[1e8]]]), "too many lengthscales"),
        ({}, rng.normal(size=(3000, 4)), "pays in D <= 3 only"),
        ({}, rng.uniform(0, 1e5, size=(3000, 3)), "too many lengthscales"),
    ]
    for options, x, reason in cases:
        problem = make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, **options)
        assert problem.method.name != "far_field"
        assert reason in problem.plan.exact_reason, problem.plan.exact_reason
        with pytest.raises(InputError, match="cannot run this problem"):
            make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, method="far_field",
                         **options)
    # Where it does not pay (few points over a grid of many nodes), auto says so and prunes or computes all.
    x = rng.uniform(0, 10, size=(5000, 3))
    problem = make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True)
    assert problem.method.name != "far_field"
    assert "is not used" in problem.plan.exact_reason, problem.plan.exact_reason


def test_forced_methods_agree_within_the_bound():
    """method="pruned" and "far_field" on the same problem: each within its bound of the other's."""
    x = np.random.default_rng(6).normal(size=(4000, 2))
    a = kernel_gradients(x, lengthscale=0.5, tolerance=1e-5, dtype="float64", method="pruned")
    b = kernel_gradients(x, lengthscale=0.5, tolerance=1e-5, dtype="float64", method="far_field")
    assert np.linalg.norm(a - b, axis=1).max() <= 2e-5 * len(x) * SLOPE / 0.5
    with pytest.raises(InputError, match="not a method"):
        kernel_gradients(x, lengthscale=0.5, tolerance=1e-5, method="fmm")


def test_cli_plan_names_the_far_field_and_method_flag(tmp_path):
    """`kgrad plan` names the far field with its grid and bound; `--method pruned` plans pruning instead;
    `--method far_field` on a kernel without a bound exits 2 with the reason."""
    from cluster_fixtures import kgrad

    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(8).normal(size=(30000, 2)).astype(np.float32))
    base = ["plan", "--points", str(points), "--lengthscale", "0.5", "--tolerance", "1e-6"]
    with ThreadPoolExecutor(3) as pool:  # three processes at once: each is mostly imports
        auto, pruned, refused = pool.map(kgrad, (base, base + ["--method", "pruned"],
                                                 base + ["--kernel", "periodic", "--method", "far_field"]))
    assert auto.returncode == 0, auto.stderr
    assert "method        far_field: sources spread on a grid of" in auto.stdout
    assert "the grid above instead of the" in auto.stdout
    assert pruned.returncode == 0 and "method        pruned" in pruned.stdout, pruned.stderr
    assert refused.returncode == 2
    assert "method='far_field' cannot run this problem" in refused.stderr
    assert "Gaussian scale mixtures" in refused.stderr


def test_variance_and_ard_scale_the_sums_and_the_bound():
    """variance s2 and one lengthscale per dimension: the far field's sums are s2 times the rbf's, within EPS S
    s2 (kmax = s2, gmax = s2 exp(-1/2) / l_min) of the exact dense run."""
    x = np.random.default_rng(9).normal(size=(20000, 2))
    ls, s2, eps = [0.5, 0.8], 3.0, 1e-6
    g, v = kernel_gradients(x, lengthscale=ls, variance=s2, tolerance=eps, dtype="float64", method="far_field",
                            return_value=True)
    g_ref, v_ref = kernel_gradients(x, lengthscale=ls, variance=s2, dtype="float64", return_value=True)
    assert np.abs(v - v_ref).max() <= eps * len(x) * s2
    assert np.linalg.norm(g - g_ref, axis=1).max() <= eps * len(x) * s2 * SLOPE / 0.5
    assert np.abs(v - v_ref).max() > 0  # an approximation, not the dense run under another name


def test_grid_does_not_depend_on_the_workers_and_tiny_tolerances_decline():
    """The plan's grid (and so the bits) is the same for 1 and 8 workers; below 1e-10 the far field
    declines; a 1-D series too long for one grid axis declines with the reason."""
    x = np.random.default_rng(10).normal(size=(30000, 2))
    grids = {w: make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, workers=w).layout.grid
             for w in (1, 8)}
    one, eight = grids[1], grids[8]
    assert (one.shape, one.order, one.spacing) == (eight.shape, eight.order, eight.spacing)
    assert np.array_equal(one.origin, eight.origin) and np.array_equal(one.step, eight.step)
    tiny = make_problem(x, x, lengthscale=0.5, tolerance=1e-11, sources_are_points=True)
    assert "below tolerance 1e-10" in tiny.plan.exact_reason
    line = np.linspace(0, 1e5, 20000)[:, None]
    long = make_problem(line, line, lengthscale=1.0, tolerance=1e-6, sources_are_points=True)
    assert "along a dimension" in long.plan.exact_reason, long.plan.exact_reason


# ------------------------------------------------------------------------- rational_quadratic and imq


@pytest.mark.parametrize("name,params", [("rbf", {}), ("rational_quadratic", {"alpha": 0.3}),
                                         ("rational_quadratic", {"alpha": 4.0}), ("imq", {}),
                                         ("imq", {"c": 2.5, "beta": 1.5})])
def test_scale_mixture_constants(name, params):
    """Each kernel's mixture: kmax and its profile are the kernel's own (pipeline.kernels), slope is sup |f'|
    (the pruning tables' measure), the moments are the Gamma law's (numeric integral over tau), and the
    mixture of Gaussians gives back the profile."""
    from pipeline.kernels import make_spec
    from pipeline.pruning import kernel_bounds

    spec = make_spec(name, 1, lengthscale=1.0, variance=2.0, **params)
    kernel = mixture_for(spec)
    bounds = kernel_bounds(spec)
    assert kernel.kmax == pytest.approx(bounds.kmax, rel=1e-12)
    assert kernel.slope * kernel.kmax == pytest.approx(bounds.slope_max, rel=1e-3)
    r = np.linspace(0, 30, 3001)
    assert kernel.slope * kernel.kmax >= np.abs(np.gradient(kernel.kmax * kernel.profile(r * r), r)).max() * (1 - 1e-4)
    if kernel.shape is None:
        return
    a, b = kernel.shape, kernel.rate
    s = np.linspace(-90, 8, 400_001)  # tau = e^s
    tau = np.exp(s)
    density = np.exp(a * math.log(b) + a * s - b * tau - math.lgamma(a))  # Gamma(a, b) density times tau
    step = s[1] - s[0]
    for n in (0.0, 0.5, 2.0, 4.5, 8.0):
        assert kernel.moment(n) == pytest.approx(float((density * tau ** n).sum() * step), rel=1e-6)
    for r2 in (0.0, 0.3, 4.0, 50.0):
        mixed = float((density * np.exp(-0.5 * tau * r2)).sum() * step)
        assert mixed == pytest.approx(float(kernel.profile(r2)), rel=1e-6)


@pytest.mark.parametrize("dim,order,part", [(1, 8, 1), (2, 6, 3), (3, 4, 4096)])
def test_spreading_in_parts_is_the_one_pass_sum(monkeypatch, dim, order, part):
    """Sources cut into parts of any size (whole blocks: down to one block each) give the sum in one part, up
    to the rounding of adding the parts (a few units of 2^-52 of the sum of |w| per node): far from the
    origin, duplicated, mixed-sign weights."""
    import pipeline.proxies as proxies

    rng = np.random.default_rng(dim)
    x = rng.normal(size=(30000, dim)) * 4 + 1e5
    x[:5000] = x[5000:10000]  # duplicates
    w = rng.normal(size=len(x))
    grid = make_grid(x.min(0), x.max(0), np.full(dim, 0.6), order, 0.4)
    monkeypatch.setattr(proxies, "SPREAD_ENTRIES", 4096)  # blocks of a few rows, so that there are many
    whole = spread(x, w, grid)
    monkeypatch.setattr(proxies, "SPREAD_PART_SOURCES", part)
    parts = proxies.spread_parts(x, w, grid)
    assert len(parts) > 3
    parted = spread(x, w, grid)
    assert np.abs(parted - whole).max() <= 1e-14 * np.abs(w).sum()
    assert math.isclose(whole.sum(), w.sum(), rel_tol=1e-9, abs_tol=1e-9)  # the basis sums to one


def test_spreading_on_a_clusters_workers_has_the_bits_of_one_pass(monkeypatch):
    """The far field's spreading as tasks on real worker processes (pipeline.execute.map_on_workers), in many
    parts: the bits of the in-process sum in the same parts."""
    import functools

    from distributed import Client, LocalCluster

    import pipeline.proxies as proxies
    from pipeline.execute import map_on_workers

    rng = np.random.default_rng(5)
    x = rng.normal(size=(20000, 3)) * 3 - 7e3
    w = rng.normal(size=len(x))
    grid = make_grid(x.min(0), x.max(0), np.full(3, 0.8), 10, 0.5)
    monkeypatch.setattr(proxies, "SPREAD_PART_SOURCES", 1)  # parts of one block (the workers' block size)
    here = spread(x, w, grid)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        on_workers = functools.partial(map_on_workers, client)
        assert len(proxies.spread_parts(x, w, grid)) >= 4
        assert spread(x, w, grid, on_workers).tobytes() == here.tobytes()


@pytest.mark.slow  # a local cluster and a run (CI runs it)
def test_a_run_that_spreads_on_its_workers_has_the_apis_bits(monkeypatch, tmp_path):
    """run_workflow on a local cluster with the spreading done by tasks on its workers, in many parts
    (thresholds lowered in this process, the client's): the output has the bits of the in-process API."""
    import zarr

    import pipeline.methods.far_field as far_field
    import pipeline.proxies as proxies
    from pipeline.cluster import local_cluster
    from pipeline.workflow import RunOptions, run_workflow

    monkeypatch.setattr(far_field, "SPREAD_ON_WORKERS_TERMS", 0)
    monkeypatch.setattr(proxies, "SPREAD_PART_SOURCES", 1)  # parts of one block
    x = np.random.default_rng(12).normal(size=(40000, 3)) * 2 + 5e3
    np.save(tmp_path / "p.npy", x)
    grid = make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, dtype="float64",
                        method="far_field").layout.grid
    assert len(proxies.spread_parts(x, None, grid)) >= 4
    g, v = kernel_gradients(x, lengthscale=0.5, tolerance=1e-6, dtype="float64", method="far_field",
                            return_value=True)
    with local_cluster(2) as cluster:
        attrs = run_workflow(RunOptions(points=str(tmp_path / "p.npy"), out=str(tmp_path / "o.zarr"),
                                        lengthscale=0.5, tolerance=1e-6, dtype="float64", method="far_field",
                                        scheduler=cluster.scheduler_address, security=cluster.security,
                                        progress=False))
    assert attrs["method"] == "far_field"
    out = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert np.asarray(out["gradient"][:]).tobytes() == g.tobytes()
    assert np.asarray(out["value"][:]).tobytes() == v.tobytes()


@pytest.mark.parametrize("dim", (1, 2, 3))
def test_fft_node_sums_equal_the_direct_sums_within_their_rounding(dim):
    """fft_node_sums against the node-to-node sums in float64 (every pair), weights of mixed sign; the
    difference stays within fft_rounding (plus float64's own)."""
    from pipeline.proxies import make_grid

    rng = np.random.default_rng(dim)
    for kernel in (RQ, IMQ):
        grid = make_grid(np.zeros(dim), np.full(dim, 2.0), np.full(dim, 0.5), 6, 0.37)
        weights = rng.normal(size=grid.n_nodes)
        sums = grid_sums.node_sums(weights, grid, kernel)
        nodes = np.stack(np.unravel_index(np.arange(grid.n_nodes), grid.shape), axis=1) * grid.spacing
        r2 = ((nodes[:, None, :] - nodes[None, :, :]) ** 2).sum(-1)
        # the same float64 kernel values, summed in longdouble: what is left is the FFT's rounding and the
        # result's last rounding to float64 (2^-53 of at most S' kmax; 2^-52 covers the direct sums' own)
        direct = kernel.profile(r2).astype(np.longdouble) @ weights.astype(np.longdouble)
        bound = (grid_sums.fft_rounding(grid, kernel) + 2.0 ** -52) * np.abs(weights).sum()
        assert float(np.abs(sums - direct).max()) <= bound
        assert grid_sums.fft_rounding(grid, kernel) > 0 and grid_sums.fft_rounding(grid, RBF) == 0


@pytest.mark.parametrize("kernel,params", [("rational_quadratic", {"alpha": 1.0}), ("imq", {"c": 1.0, "beta": 0.5})])
def test_auto_picks_the_far_field_for_scale_mixtures_in_2d(kernel, params):
    """A 2-D cloud at lengthscale 0.5 with rational_quadratic or imq: the far field is chosen (node sums by
    FFT), and its bound holds against the oracle."""
    x = np.random.default_rng(11).normal(size=(20000, 2))
    problem = make_problem(x, x, lengthscale=0.5, tolerance=1e-6, sources_are_points=True, kernel=kernel,
                           params=params)
    assert problem.method.name == "far_field", problem.plan.exact_reason
    assert not problem.layout.kernel.separable
    g, v = kernel_gradients(x, lengthscale=0.5, tolerance=1e-6, dtype="float64", return_value=True, kernel=kernel,
                            **params)
    sample = np.random.default_rng(12).choice(len(x), 300, replace=False)
    mixture = MIXTURES[kernel]
    g_ref, v_ref = oracle(x[sample], x, None, 0.5, mixture)
    err_g, err_v = errors(g[sample], v[sample], g_ref, v_ref, None, [0.5], len(x), mixture)
    assert err_v <= 1e-6 and err_g <= 1e-6, (err_v, err_g)
    assert err_v > 0


@pytest.mark.slow
@pytest.mark.parametrize("dim", (1, 2))
def test_kgrad_run_with_a_scale_mixture_writes_the_apis_bits(tmp_path, dim):
    """`kgrad run --kernel imq --param c=2 --tolerance 1e-6` (2 local workers, node sums by FFT on the
    client, interpolation in the tasks from the boxes of nodes they read) writes what kernel_gradients
    returns, bit for bit, in 1 and 2 dimensions."""
    from cluster_fixtures import kgrad
    from test_cli import read_output

    x = np.random.default_rng(13).normal(size=(12000, dim))
    np.save(tmp_path / "points.npy", x)
    out = tmp_path / "out.zarr"
    run = kgrad(["run", "--points", str(tmp_path / "points.npy"), "--kernel", "imq", "--param", "c=2",
                 "--lengthscale", "0.4", "--tolerance", "1e-6", "--dtype", "float64", "--workers", "2",
                 "--method", "far_field", "--out", str(out)])
    assert run.returncode == 0, run.stderr
    ds, attrs = read_output(out)
    g, v = kernel_gradients(x, lengthscale=0.4, tolerance=1e-6, dtype="float64", return_value=True, kernel="imq",
                            c=2.0, method="far_field")
    assert np.array_equal(ds["gradient"].values, g) and np.array_equal(ds["value"].values, v)


@pytest.mark.parametrize("dim", (1, 2, 3))
def test_a_task_reading_only_its_box_gets_the_whole_grids_bits(dim):
    """interpolate() from the box of nodes box_range() names for a group of neighbouring queries (what a task
    reads from OUT/order/grid) gives the bits of the whole grid, in 1, 2 and 3 dimensions."""
    rng = np.random.default_rng(dim)
    x = rng.uniform(0, 10, size=(3000, dim))
    grid = make_grid(x.min(0), x.max(0), np.ones(dim), 6, 0.3)
    sums = grid_sums.node_sums(spread(x, None, grid), grid, RBF)
    queries = x[np.all(np.abs(x - 5) < 1.5, axis=1)]
    lower, upper = grid_sums.box_range(queries, grid)
    assert np.all(upper - lower < np.asarray(grid.shape))  # a proper part of the grid
    box = sums.reshape(grid.shape)[tuple(slice(a, b) for a, b in zip(lower, upper))]
    g_box, v_box = grid_sums.interpolate(queries, box, grid, lower)
    g, v = grid_sums.interpolate(queries, sums, grid)
    assert np.array_equal(g_box, g) and np.array_equal(v_box, v)
    assert grid_sums.fft_unit_roundoff() in (2.0 ** -64, 2.0 ** -53)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 400), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 1000]))
def test_spreading_order_is_the_full_sort(dim, m, seed, levels):
    """proxies.spreading_order (sorted by stencil and first coordinate, then ties re-sorted) is the permutation
    of a lexsort on every key: (stencil index, each coordinate, weight), whatever the ties: duplicated rows,
    rows equal in their first coordinate only, equal weights, -0.0 beside 0.0, few cells or many."""
    from pipeline.proxies import spreading_order

    rng = np.random.default_rng(seed)
    x = rng.integers(-levels, levels + 1, size=(m, dim)).astype(np.float64) / 2  # coarse: many ties
    x[rng.random(m) < 0.2] = -0.0
    x[m // 2:] = x[:m - m // 2] if rng.random() < 0.5 else x[m // 2:]  # duplicated rows
    w = rng.integers(-2, 3, size=m).astype(np.float64)
    index = rng.integers(0, max(1, m // levels), size=m)
    full = np.lexsort((w,) + tuple(x[:, d] for d in range(dim - 1, -1, -1)) + (index,))
    assert np.array_equal(spreading_order(index, x, w), full)
