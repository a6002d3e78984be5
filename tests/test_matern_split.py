"""The Matern kernels in the far field (pipeline/matern_split.py): the split's closed forms and moments against
scipy's quadrature, the cut-off radius against the short-range part itself, the close pairs' sums against a
direct sum, and whole runs (API and `kgrad run`) within the per-query bound of the float64 oracle."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_gradients
from scipy import integrate

from pipeline.api import kernel_gradients
from pipeline.errors import InputError
from pipeline.matern_split import NU, SLOPE, matern_profile, near_sums, split_for, tail_terms, upper_gamma
from pipeline.problem import make_problem

MATERNS = tuple(sorted(NU))


def _quad_tail(nu: float, threshold: float, r: float, m: float) -> float:
    """``int_0^c t^(m-1) exp(-t - a/t) dt`` (a = nu r^2 / 2, c = nu / T) by quadrature over ``s = sqrt(t)``
    (``2 s^(2m-1) exp(-s^2 - a/s^2)``: no singularity at 0 for m >= 1/2), split where ``exp(-a/s^2)`` turns on."""
    a, c = 0.5 * nu * r * r, nu / threshold

    def integrand(s):
        return 2.0 * s ** (2.0 * m - 1.0) * math.exp(-s * s - a / (s * s)) if s > 0 else 0.0

    top = math.sqrt(c)
    cuts = sorted({0.0, min(top, math.sqrt(a)), min(top, 4.0 * math.sqrt(a)), top})
    return sum(integrate.quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-13, limit=400)[0]
               for lo, hi in zip(cuts, cuts[1:]) if hi > lo)


@pytest.mark.parametrize("name", MATERNS)
@pytest.mark.parametrize("threshold", (4.0, 256.0, 16384.0))
def test_short_range_part_and_its_slope_are_the_integrals(name, threshold):
    """f_n / s2 = F_nu / Gamma(nu) and d(f_n / s2)/d(r^2) = -(nu/2) F_(nu-1) / Gamma(nu), within 1e-13 of
    scipy's quadrature (absolute, kmax units), from r = 0 to far beyond the cut-off."""
    nu = NU[name]
    radii = np.array([0.0, 1e-5, 1e-3, 0.01, 0.05, 0.2, 0.7, 2.0])
    value, slope = tail_terms(nu, threshold, radii ** 2)
    for r, f, df in zip(radii, value, slope):
        assert abs(f - _quad_tail(nu, threshold, r, nu) / math.gamma(nu)) <= 1e-13
        if r > 0 and nu > 0.5:  # d f_n / dr = 2 r f_n'(r^2); matern12's is infinite at 0 (checked below)
            exact = -(nu / 2.0) * _quad_tail(nu, threshold, r, nu - 1.0) / math.gamma(nu)
            assert abs(2 * r * (df - exact)) <= 1e-13, (r, df, exact)
    if nu == 0.5:  # by differences: the closed form's slope is d/dr of its value
        r = radii[2:]
        step = 1e-6 * r
        up, _ = tail_terms(nu, threshold, (r + step) ** 2)
        down, _ = tail_terms(nu, threshold, (r - step) ** 2)
        assert np.allclose(2 * r * slope[2:], (up - down) / (2 * step), rtol=1e-6, atol=1e-9)
        assert slope[0] == 0.0  # a pair at distance 0: no gradient, as for the kernel


@pytest.mark.parametrize("name", MATERNS)
def test_the_two_parts_add_up_and_the_smooth_part_is_a_positive_mixture(name):
    """f_s + f_n = f to rounding; 0 <= f_s <= f; f_n decreases; f_n(0) is the tail's mass."""
    kernel = split_for(name, 1.0, 64.0)
    r2 = np.linspace(0.0, 25.0, 5001)
    near, _ = tail_terms(kernel.nu, kernel.threshold, r2)
    smooth = kernel.profile(r2)
    full = matern_profile(kernel.nu, r2)
    assert np.allclose(smooth + near, full, rtol=0, atol=1e-15)
    assert np.all(smooth >= -1e-15) and np.all(smooth <= full + 1e-15)
    assert np.all(np.diff(near) <= 1e-16)
    assert near[0] == pytest.approx(kernel.mass, rel=1e-12)


@pytest.mark.parametrize("name", MATERNS)
@pytest.mark.parametrize("threshold", (4.0, 1024.0))
def test_moments_of_the_smooth_part(name, threshold):
    """E[tau^n 1{tau <= T}] = nu^n Gamma(nu - n, nu/T) / Gamma(nu), for n up to beyond nu (where the whole
    kernel's moments are infinite), against quadrature; and the upper incomplete gamma at s <= 0."""
    kernel = split_for(name, 1.0, threshold)
    nu, c = kernel.nu, kernel.nu / threshold
    for n in (0.0, 0.5, 1.0, 2.5, 4.0, 6.5, 8.5):
        exact = integrate.quad(lambda t: (nu / t) ** n * t ** (nu - 1) * math.exp(-t), c, np.inf,
                               epsrel=1e-12, limit=400)[0] / math.gamma(nu)
        assert kernel.moment(n) == pytest.approx(exact, rel=1e-9)
        assert kernel.moment(n) <= threshold ** n  # tau <= T
    for s in (-3.0, -2.5, -1.0, -0.5, 0.0):
        exact = integrate.quad(lambda t: t ** (s - 1) * math.exp(-t), 0.01, np.inf, epsrel=1e-12, limit=400)[0]
        assert upper_gamma(s, 0.01) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("name", MATERNS)
@pytest.mark.parametrize("error", (1e-3, 1e-7, 1e-10))
def test_left_out_pairs_are_within_the_cut_off_bound(name, error):
    """Beyond near_radius(error), f_n <= error kmax and |f_n'| <= error slope (both sampled far out), and
    the radius is the smallest that says so (just inside it, the bound exceeds error)."""
    for threshold in (4.0, 64.0, 4096.0):
        kernel = split_for(name, 1.0, threshold)
        radius = kernel.near_radius(error)
        assert max(kernel.cut_off_error(radius)) <= error * (1 + 1e-12)
        r = radius * np.geomspace(1.0, 20.0, 400)
        value, slope = tail_terms(kernel.nu, threshold, r * r)
        assert np.all(value <= error) and np.all(np.abs(2 * r * slope) <= error * kernel.slope)
        if radius > math.sqrt(2.0 / threshold) * 1.0001:
            assert max(kernel.cut_off_error(radius * 0.999)) > error


def test_slopes_are_the_kernels_largest():
    r = np.linspace(1e-9, 10, 200001)
    for nu, slope in SLOPE.items():
        f = matern_profile(nu, r * r)
        sampled = np.max(-np.diff(f) / np.diff(r))  # mean slopes over steps of 5e-5: at most the largest
        assert sampled <= slope and sampled == pytest.approx(slope, rel=1e-4)


def _direct_near(queries, sources, weights, kernel, ls, radius):
    q, x = queries / ls, sources / ls
    d = q[:, None, :] - x[None]
    r2 = np.einsum("qmd,qmd->qm", d, d)
    f, df = tail_terms(kernel.nu, kernel.threshold, r2)
    close = r2 < radius * radius
    f, df = np.where(close, f, 0) * weights, np.where(close, df, 0) * weights
    return np.einsum("qm,qmd->qd", 2 * df, d) / ls, f.sum(1), int(close.sum())


def test_close_pair_sums_are_direct_sums_and_their_bits_do_not_depend_on_the_company(monkeypatch):
    """near_sums equals the direct sum over the pairs closer than R; each query's bits are the same whatever
    other queries it is computed with, whatever extra sources (kept in their order) are passed, and however the
    candidates are cut into batches (a search instead of the dense cell table, too)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, (3000, 2)) + 1e4
    x[100:130] = x[99]  # duplicates
    w = rng.normal(size=len(x))
    ls = np.array([0.5, 2.0])
    kernel = split_for("matern32", 1.0, 64.0)
    radius = 0.3
    g, v, pairs = near_sums(x, x, w, kernel, ls, radius)
    g_ref, v_ref, pairs_ref = _direct_near(x, x, w, kernel, ls, radius)
    assert pairs == pairs_ref
    assert np.abs(g - g_ref).max() <= 1e-12 * np.abs(w).sum() and np.abs(v - v_ref).max() <= 1e-12 * np.abs(w).sum()
    some = np.arange(1000, 1300)
    keep = np.flatnonzero(np.any(np.linalg.norm((x[some, None] - x[None]) / ls, axis=2) < radius * 1.5, axis=0))
    g_part, v_part, _ = near_sums(x[some], x[keep], w[keep], kernel, ls, radius)
    assert np.array_equal(g_part, g[some]) and np.array_equal(v_part, v[some])
    from pipeline import matern_split

    monkeypatch.setattr(matern_split, "NEAR_CANDIDATES", 500)  # batches of a few queries
    monkeypatch.setattr(matern_split, "NEAR_TABLE_CELLS", 1)
    g_small, v_small, pairs_small = near_sums(x, x, w, kernel, ls, radius)
    assert pairs_small == pairs and np.array_equal(g_small, g) and np.array_equal(v_small, v)


def test_the_plan_and_the_bits_do_not_depend_on_the_row_order():
    """The split (T, grid, radius, task size) and every bit are the same for the rows in another order."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 100, (30000, 2))
    w = rng.normal(size=len(x))
    p = rng.permutation(len(x))
    runs = []
    for rows in (np.arange(len(x)), p):
        problem = make_problem(x[rows], x[rows], kernel="matern32", lengthscale=5.0, tolerance=1e-6,
                               sources_are_points=True, params={}, variance=1.0, dtype="float64", mode="auto",
                               weights=w[rows], method="far_field")
        g, v, _ = problem.compute()
        runs.append((problem.method.describe(problem.planned), problem.plan.rows_per_task, g, v, rows))
    (d0, r0, g0, v0, _), (d1, r1, g1, v1, rows) = runs
    assert d0 == d1 and r0 == r1
    assert np.array_equal(g0[rows], g1) and np.array_equal(v0[rows], v1)


def _layout(name: str, dim: int, rng):
    n = 1200
    ls = np.full(dim, 0.6)
    x = rng.normal(size=(n, dim)) * 4.0
    w = rng.uniform(0.2, 2.0, n)
    if name == "far-from-origin":
        x += 1e5
    elif name == "duplicates":
        x[: n // 2] = x[0]
    elif name == "mixed-sign":
        w = rng.normal(size=n)
    elif name == "ard":
        ls = np.geomspace(0.05, 20.0, dim) if dim > 1 else np.array([0.05])
        x = rng.normal(size=(n, dim)) * ls * 6.0
    return x, w, ls


@pytest.mark.sampled(every=4)
@pytest.mark.parametrize("name", MATERNS)
@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("layout", ("far-from-origin", "duplicates", "mixed-sign", "ard"))
def test_matern_far_field_keeps_the_per_query_bound(layout, dim, name):
    """The far field forced on a Matern kernel, float64: every query within EPS S kmax (v) and EPS S gmax (g)
    of the float64 oracle."""
    rng = np.random.default_rng(zlib.crc32(f"{layout}-{dim}-{name}".encode()))
    x, w, ls = _layout(layout, dim, rng)
    eps = 1e-6
    try:
        g, v = kernel_gradients(x, weights=w, kernel=name, lengthscale=ls, tolerance=eps, dtype="float64",
                                return_value=True, method="far_field")
    except InputError as exc:  # only a grid too large for the data's extent may refuse
        assert "too many lengthscales" in str(exc) and dim == 3, exc
        return
    g_ref, v_ref = reference_gradients(x, x, w, kernel=name, lengthscale=ls)
    g_ref = g_ref.reshape(g.shape)
    s = np.abs(w).sum()
    gmax = SLOPE[NU[name]] / ls.min()
    assert np.abs(v - v_ref).max() <= eps * s
    assert np.linalg.norm(g - g_ref, axis=-1).max() <= eps * s * gmax


@pytest.mark.sampled(every=3)
@pytest.mark.parametrize("name", MATERNS)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), log_eps=st.floats(-9, -3), spread=st.floats(1.0, 20.0))
def test_property_matern_far_field_keeps_the_bound(seed, log_eps, spread, name):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1000, 2)) * spread + rng.uniform(-1e3, 1e3, 2)
    w = rng.normal(size=len(x))
    eps = 10.0 ** log_eps
    try:
        g, v = kernel_gradients(x, weights=w, kernel=name, lengthscale=1.0, tolerance=eps, dtype="float64",
                                return_value=True, method="far_field")
    except InputError as exc:  # only a grid too large for the data's extent may refuse
        assert "too many lengthscales" in str(exc), exc
        return
    g_ref, v_ref = reference_gradients(x, x, w, kernel=name, lengthscale=1.0)
    s = np.abs(w).sum()
    assert np.abs(v - v_ref).max() <= eps * s
    assert np.linalg.norm(g - g_ref, axis=1).max() <= eps * s * SLOPE[NU[name]]


def test_auto_picks_the_split_for_a_gp_field_and_plan_says_so():
    """A 2-D GP field at lengthscale 5 in a 100-box: pruning would keep most pairs, the split far field is
    chosen, and the plan says how (the precision, the radius, the close pairs)."""
    x = np.random.default_rng(2).uniform(0, 100, (100000, 2))
    problem = make_problem(x, x, kernel="matern32", lengthscale=5.0, tolerance=1e-6, sources_are_points=True,
                           params={}, variance=1.0, dtype="float32", mode="auto", weights=None)
    assert problem.method.name == "far_field"
    text = problem.method.describe(problem.planned)
    assert "smooth part" in text and "closer than" in text, text


@pytest.mark.slow
@pytest.mark.parametrize("name,dim,separate", [("matern32", 2, False), ("matern12", 1, False), ("matern52", 3, False),
                                               ("matern32", 2, True)])
def test_kgrad_run_with_a_matern_kernel_writes_the_apis_bits(tmp_path, name, dim, separate):
    """`kgrad run --kernel maternXY --tolerance 1e-6 --method far_field` on 2 local workers (each task reads the
    sorted sources of the tiles near its rows for the close pairs) writes what kernel_gradients returns, bit for
    bit, with weights; with sources of their own (`--sources`) too."""
    from cluster_fixtures import kgrad
    from test_cli import read_output

    rng = np.random.default_rng(21)
    x = rng.normal(size=(12000, dim)) * 2.0
    sources = rng.normal(size=(9000, dim)) * 2.0 + 0.5 if separate else None
    w = rng.normal(size=len(x) if sources is None else len(sources))
    np.save(tmp_path / "points.npy", x)
    np.save(tmp_path / "weights.npy", w)
    extra = []
    if separate:
        np.save(tmp_path / "sources.npy", sources)
        extra = ["--sources", str(tmp_path / "sources.npy")]
    out = tmp_path / "out.zarr"
    run = kgrad(["run", "--points", str(tmp_path / "points.npy"), "--weights", str(tmp_path / "weights.npy"),
                 *extra, "--kernel", name, "--lengthscale", "0.7", "--tolerance", "1e-6", "--dtype", "float64",
                 "--workers", "2", "--method", "far_field", "--out", str(out)])
    assert run.returncode == 0, run.stderr
    ds, attrs = read_output(out)
    g, v = kernel_gradients(x, sources, weights=w, kernel=name, lengthscale=0.7, tolerance=1e-6, dtype="float64",
                            return_value=True, method="far_field")
    assert np.array_equal(ds["gradient"].values.reshape(g.shape), g) and np.array_equal(ds["value"].values, v)
