"""Independent float64 numpy oracle for kgrad's summed kernel gradients (no JAX).

For queries ``q_j`` (N, D), sources ``x_i`` (M, D) and weights ``w_i`` (M,)::

    g_j = sum_i w_i * grad_q k(q_j, x_i)      (N, D)   derivative w.r.t. the FIRST argument
    v_j = sum_i w_i * k(q_j, x_i)             (N,)

Every gradient below is derived by hand from the formulas table of the README (``docs/design.md``)
(``r^2 = sum_d ((q_d - x_d) / l_d)^2``, ``s2`` = variance, ``delta = q - x``):

==================  ======================================  ===============================================
name                k(q, x)                                 grad_q k(q, x)
==================  ======================================  ===============================================
rbf                 s2 exp(-r^2/2)                          -k delta / l^2
matern12            s2 exp(-r)                              -k delta / (l^2 r)          (0 at r = 0)
matern32            s2 (1 + sqrt3 r) exp(-sqrt3 r)          -3 s2 exp(-sqrt3 r) delta / l^2
matern52            s2 (1 + sqrt5 r + 5r^2/3) exp(-sqrt5 r) -(5/3) s2 (1 + sqrt5 r) exp(-sqrt5 r) delta / l^2
rational_quadratic  s2 (1 + r^2/(2a))^(-a)                  -s2 (1 + r^2/(2a))^(-a-1) delta / l^2
imq                 s2 (c^2 + r^2)^(-b)                     -2 b s2 (c^2 + r^2)^(-b-1) delta / l^2
periodic            s2 exp(-2 sum sin^2(pi delta/p) / l^2)  -k (2 pi / (p l^2)) sin(2 pi delta / p)
linear              s2 q.x                                  s2 x
polynomial          s2 (q.x + c)^n                          s2 n (q.x + c)^(n-1) x
==================  ======================================  ===============================================

The radial kernels share ``grad_q k = 2 f'(r^2) delta / l^2`` with ``f'`` = dk/d(r^2); the table folds
the factor 2 in.  ``delta`` is formed explicitly in float64 (no ``|q|^2 + |x|^2 - 2 q.x`` expansion), so
the oracle stays exact for points far from the origin and for duplicate points.

The work is done in row blocks so that N, M of a few thousand need only tens of MB.
"""

from __future__ import annotations

import math

import numpy as np

KERNEL_NAMES = (
    "rbf",
    "matern12",
    "matern32",
    "matern52",
    "rational_quadratic",
    "imq",
    "periodic",
    "linear",
    "polynomial",
)
STATIONARY = ("rbf", "matern12", "matern32", "matern52", "rational_quadratic", "imq", "periodic")
RADIAL = ("rbf", "matern12", "matern32", "matern52", "rational_quadratic", "imq")
DOT = ("linear", "polynomial")
USES_LENGTHSCALE = STATIONARY
DEFAULTS = {
    "rational_quadratic": {"alpha": 1.0},
    "imq": {"c": 1.0, "beta": 0.5},
    "periodic": {"period": 1.0},
    "polynomial": {"c": 1.0, "degree": 2},
}

_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)
_BLOCK_ELEMENTS = 1 << 21  # elements of one (rows, M, D) float64 temporary: 16 MB


def _params(kernel: str, params: dict) -> dict:
    known = DEFAULTS.get(kernel, {})
    unknown = set(params) - set(known)
    if unknown:
        raise ValueError(f"kernel {kernel!r} has no parameter(s) {sorted(unknown)}")
    return {**known, **params}


def _as_2d(a, name):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N, D) or (N,), got shape {a.shape}")
    return a


def _lengthscale(lengthscale, dim):
    ls = np.asarray(lengthscale, dtype=np.float64).reshape(-1)
    if ls.size == 1:
        ls = np.full(dim, ls[0])
    if ls.size != dim:
        raise ValueError(f"lengthscale has {ls.size} values for D={dim}")
    return ls


def _radial_block(kernel, r2, s2, p):
    """(k, h) on a block of squared scaled distances, with grad_q k = h * delta / l^2."""
    if kernel == "rbf":
        k = s2 * np.exp(-0.5 * r2)
        return k, -k
    if kernel == "matern12":
        r = np.sqrt(r2)
        k = s2 * np.exp(-r)
        safe_r = np.where(r > 0, r, 1.0)
        return k, np.where(r > 0, -k / safe_r, 0.0)
    if kernel == "matern32":
        a = _SQRT3 * np.sqrt(r2)
        e = np.exp(-a)
        return s2 * (1.0 + a) * e, -3.0 * s2 * e
    if kernel == "matern52":
        a = _SQRT5 * np.sqrt(r2)
        e = np.exp(-a)
        return s2 * (1.0 + a + a * a / 3.0) * e, -(5.0 / 3.0) * s2 * (1.0 + a) * e
    if kernel == "rational_quadratic":
        alpha = float(p["alpha"])
        base = 1.0 + r2 / (2.0 * alpha)
        k = s2 * base ** (-alpha)
        return k, -k / base
    if kernel == "imq":
        c, beta = float(p["c"]), float(p["beta"])
        base = c * c + r2
        k = s2 * base ** (-beta)
        return k, -2.0 * beta * k / base
    raise ValueError(kernel)


def _pair_terms(kernel, qb, x, ls, s2, p):
    """Kernel values K (B, M) and per-pair gradients G (B, M, D) of one query block."""
    if kernel in RADIAL:
        delta = qb[:, None, :] - x[None, :, :]
        scaled = delta / ls
        r2 = np.einsum("bmd,bmd->bm", scaled, scaled)
        k, h = _radial_block(kernel, r2, s2, p)
        return k, h[:, :, None] * (delta / (ls * ls))
    if kernel == "periodic":
        period = float(p["period"])
        delta = qb[:, None, :] - x[None, :, :]
        sn = np.sin(np.pi * delta / period) / ls
        k = s2 * np.exp(-2.0 * np.einsum("bmd,bmd->bm", sn, sn))
        dk = -(2.0 * np.pi / (period * ls * ls)) * np.sin(2.0 * np.pi * delta / period)
        return k, k[:, :, None] * dk
    if kernel == "linear":
        s = qb @ x.T
        return s2 * s, np.broadcast_to(s2 * x[None, :, :], (len(qb),) + x.shape)
    if kernel == "polynomial":
        c, degree = float(p["c"]), int(p["degree"])
        base = qb @ x.T + c
        k = s2 * base**degree
        dk = s2 * degree * base ** (degree - 1)
        return k, dk[:, :, None] * x[None, :, :]
    raise ValueError(f"unknown kernel {kernel!r}; known: {KERNEL_NAMES}")


def reference_gradients(points, sources=None, weights=None, kernel="rbf", lengthscale=1.0,
                        variance=1.0, **params):
    """Float64 oracle: ``(g, v)`` with g (N, D) (or (N,) for 1-D ``points``) and v (N,)."""
    one_d = np.ndim(points) == 1
    q = _as_2d(points, "points")
    x = q if sources is None else _as_2d(sources, "sources")
    if x.shape[1] != q.shape[1]:
        raise ValueError(f"points have D={q.shape[1]}, sources D={x.shape[1]}")
    n, dim = q.shape
    m = x.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (m,):
        raise ValueError(f"weights must have shape ({m},), got {w.shape}")
    p = _params(kernel, params)
    ls = _lengthscale(lengthscale, dim)
    s2 = float(variance)

    g = np.zeros((n, dim))
    v = np.zeros(n)
    rows = max(1, _BLOCK_ELEMENTS // max(1, m * dim))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        k, grad = _pair_terms(kernel, q[start:stop], x, ls, s2, p)
        v[start:stop] = k @ w
        g[start:stop] = np.einsum("bmd,m->bd", grad, w)
    return (g[:, 0] if one_d else g), v


# ---------------------------------------------------------------------------------------------------------
# Scalar, loop-based values straight from the README's kernel table (math module only): an independent check of
# the vectorised values above, for a handful of pairs.


def scalar_kernel(kernel, q, x, lengthscale=1.0, variance=1.0, **params):
    """k(q, x) for two single points, written as literally as possible from the README's kernel table."""
    p = _params(kernel, params)
    q = [float(t) for t in np.atleast_1d(q)]
    x = [float(t) for t in np.atleast_1d(x)]
    ls = [float(t) for t in _lengthscale(lengthscale, len(q))]
    s2 = float(variance)
    r2 = sum(((qd - xd) / ld) ** 2 for qd, xd, ld in zip(q, x, ls))
    r = math.sqrt(r2)
    if kernel == "rbf":
        return s2 * math.exp(-r2 / 2)
    if kernel == "matern12":
        return s2 * math.exp(-r)
    if kernel == "matern32":
        return s2 * (1 + math.sqrt(3) * r) * math.exp(-math.sqrt(3) * r)
    if kernel == "matern52":
        return s2 * (1 + math.sqrt(5) * r + 5 * r2 / 3) * math.exp(-math.sqrt(5) * r)
    if kernel == "rational_quadratic":
        return s2 * (1 + r2 / (2 * p["alpha"])) ** (-p["alpha"])
    if kernel == "imq":
        return s2 * (p["c"] ** 2 + r2) ** (-p["beta"])
    if kernel == "periodic":
        total = sum(math.sin(math.pi * (qd - xd) / p["period"]) ** 2 / ld**2 for qd, xd, ld in zip(q, x, ls))
        return s2 * math.exp(-2 * total)
    dot = sum(qd * xd for qd, xd in zip(q, x))
    if kernel == "linear":
        return s2 * dot
    if kernel == "polynomial":
        return s2 * (dot + p["c"]) ** p["degree"]
    raise ValueError(kernel)


# ---------------------------------------------------------------------------------------------------------
# Finite differences of the oracle's own value v: proves the hand-derived gradients independently.


def finite_difference_gradients(points, sources=None, weights=None, kernel="rbf", lengthscale=1.0,
                                variance=1.0, step=1e-5, **params):
    """Central differences of ``v`` w.r.t. each query coordinate (4th order, float64).

    ``v_j`` depends only on ``q_j``, so perturbing coordinate d of every query at once gives column d of g.
    """
    q = _as_2d(points, "points")
    x = q.copy() if sources is None else _as_2d(sources, "sources")  # sources fixed while q moves
    n, dim = q.shape
    ls = _lengthscale(lengthscale, dim)
    scale = ls if kernel in USES_LENGTHSCALE else np.maximum(1.0, np.max(np.abs(q), axis=0))
    g = np.zeros((n, dim))
    for d in range(dim):
        h = step * scale[d]
        vals = []
        for k in (-2, -1, 1, 2):
            shifted = q.copy()
            shifted[:, d] += k * h
            vals.append(reference_gradients(shifted, x, weights, kernel, lengthscale, variance, **params)[1])
        g[:, d] = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
    return g


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the accuracy metric of the tests)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    scale = np.max(np.abs(expected))
    diff = np.max(np.abs(actual - expected)) if actual.size else 0.0
    if not np.all(np.isfinite(actual)):
        return math.inf
    return float(diff / scale) if scale > 0 else float(diff)


# ---------------------------------------------------------------------------------------------------------
# Accuracy bounds used by the tests (metric: relative_error, i.e. max abs error / max magnitude).

FLOAT64_BOUND = 1e-10
# float32 on well-conditioned data (measured worst cases ~1e-6 to 4e-6 on 2-core x86, see test_accuracy.py).
FLOAT32_BOUND = 2e-5
# How many times the error that merely rounding the inputs to float32 causes an implementation may reach.
INPUT_ROUNDING_FACTOR = 10.0


def float32_input_error(points, sources=None, weights=None, kernel="rbf", lengthscale=1.0, variance=1.0,
                        reference=None, **params):
    """(g_err, v_err): relative error caused only by storing the inputs in float32.

    Stationary kernels see only q - x, so inputs are first re-centred (in float64) on the sources' mean,
    as any careful float32 implementation would; other kernels are rounded as they are.  This is the
    conditioning of the problem in float32: no float32 implementation can be expected to beat it, and a
    good one stays within a small multiple of it.  ``reference``: the float64 (g, v), if already computed.
    """
    q = _as_2d(points, "points")
    x = q if sources is None else _as_2d(sources, "sources")
    center = x.mean(axis=0) if kernel in STATIONARY else np.zeros(q.shape[1])
    q32 = (q - center).astype(np.float32).astype(np.float64)
    x32 = (x - center).astype(np.float32).astype(np.float64)
    w32 = None if weights is None else np.asarray(weights).astype(np.float32).astype(np.float64)
    g, v = reference if reference is not None else reference_gradients(q, x, weights, kernel, lengthscale,
                                                                        variance, **params)
    g = g if g.ndim == 2 else g[:, None]
    g32, v32 = reference_gradients(q32, x32, w32, kernel, lengthscale, variance, **params)
    return relative_error(g32, g), relative_error(v32, v)


def accuracy_bounds(dtype, points, sources=None, weights=None, kernel="rbf", lengthscale=1.0, variance=1.0,
                    reference=None, **params):
    """(g_bound, v_bound) for ``dtype``: fixed for float64; float32 adds the input-rounding error."""
    if dtype == "float64":
        return FLOAT64_BOUND, FLOAT64_BOUND
    g_in, v_in = float32_input_error(points, sources, weights, kernel, lengthscale, variance, reference,
                                     **params)
    return FLOAT32_BOUND + INPUT_ROUNDING_FACTOR * g_in, FLOAT32_BOUND + INPUT_ROUNDING_FACTOR * v_in
