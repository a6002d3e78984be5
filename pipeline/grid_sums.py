"""Grid sums for the far-field method: the proxies' kernel sums at every grid node, and their interpolation
at the queries, with the error bound of the whole chain (rbf, rational_quadratic, imq; pure numpy, float64
but for the FFT, in longdouble).

With the proxies' weights ``W`` on a regular grid (:func:`pipeline.proxies.spread`), the sums

    U_m = sum_n W_n k(y_m, z_n)                          (every node m, every node n)

are, for rbf, products with one small matrix per dimension, because rbf is a product over dimensions:
``k = s2 prod_d exp(-(y_d - z_d)^2 / (2 l_d^2))``, so ``U = W x_1 T_1 x_2 T_2 ...`` with
``T_d[a, b] = exp(-((a - b) h)^2 / 2)`` (h: the spacing in lengthscales); for rational_quadratic and imq
(not products) a convolution by FFT (:func:`fft_node_sums`).  No pair is skipped.

Each query then interpolates ``U`` from its own stencil of ``p^D`` nodes:

    v^(q) = sum_m L_m(q) U_m            g^(q) = grad v^(q) = sum_m grad L_m(q) U_m

so ``g^`` is the exact gradient of ``v^`` (inside each grid cell; at a cell face, of either side's
polynomial).  With ``v~(y) = sum_n W_n k(y, z_n)`` (the proxies' sum, a smooth function of y whose
derivatives along any line are bounded by ``S' = sum |W_n|`` times the kernel's), the error is

    |v^ - v| <= |v~ - v| + |I v~ - v~| <= S E_v + S' Q_v
    |g^ - g| <= |grad v~ - grad v| + |grad (I v~ - v~)| <= S E_g + S' Q_g

with ``E_v, E_g`` the source side (:func:`pipeline.proxies.interpolation_error`) and ``Q_v, Q_g`` the
query side (:func:`query_error`).  The derivation is in docs/design.md.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .proxies import (CRAMER, Grid, basis_coefficients, evaluate, interpolation_error, lagrange,
                      largest_spacing, lebesgue_constant, node_constant, offsets, sampled_max, stencils)
from .scale_mixtures import RBF, GaussianMixture

GATHER_ROWS = 1 << 12  # queries interpolated at a time (bounded temporaries: rows x p^D)


@functools.lru_cache(maxsize=None)
def _slope_coefficients(order: int) -> np.ndarray:
    return np.array([np.polynomial.polynomial.polyder(c) for c in basis_coefficients(order)])


def lagrange_derivative(order: int, t: np.ndarray) -> np.ndarray:
    """d/dt of the stencil's Lagrange basis at ``t`` (grid steps): shape ``t.shape + (order,)``."""
    return evaluate(_slope_coefficients(order), t)


@functools.lru_cache(maxsize=None)
def derivative_constants(order: int) -> tuple[float, float]:
    """``(C'_p, Lambda')``: upper bounds on ``|omega'(t)|`` and ``sum_m |L_m'(t)|`` over the cell (grid steps;
    :func:`pipeline.proxies.sampled_max`)."""
    omega = np.polynomial.polynomial.polyfromroots(offsets(order))
    c_prime = sampled_max(np.polynomial.polynomial.polyder(omega)[None, :])
    return c_prime, sampled_max(_slope_coefficients(order))


def query_error(order: int, spacing: float, dim: int, kernel: GaussianMixture = RBF) -> tuple[float, float]:
    """``(Q_v, Q_g)``: the error of interpolating ``v~`` (and of the gradient of the interpolant) per unit
    of ``S'``, in units of kmax and gmax (``spacing`` in lengthscales; derivative bounds of order n times
    the kernel's moment ``E[tau^(n/2)]``, :mod:`pipeline.scale_mixtures`)."""
    lam = lebesgue_constant(order)
    c_prime, lam_prime = derivative_constants(order)
    c_p = node_constant(order)
    h = spacing
    m_p, m_next = kernel.moment(order / 2), kernel.moment((order + 1) / 2)
    value_1d = CRAMER * c_p * h ** order / math.sqrt(math.factorial(order)) * m_p
    value = value_1d * sum(lam ** k for k in range(dim))
    # One component e: d_e (I - 1) = d_e (I_e - 1) + (d_e I_e)(I_rest - 1).
    own = CRAMER * (c_prime * h ** (order - 1) / math.sqrt(math.factorial(order)) * m_p
                    + c_p * h ** order / math.sqrt(math.factorial(order + 1)) * m_next)
    rest = (lam_prime / h) * value_1d * sum(lam ** k for k in range(dim - 1))
    gradient = math.sqrt(dim) * (own + rest) / kernel.slope
    return value, gradient


# float64 rounding of the chain, counted with the bound: the node sums U hold relative rounding of a few
# units of 2^-52 per product (sums of positive-weighted terms of at most S' kmax), which the interpolation
# amplifies by at most Lambda^D for v and Lambda^(D-1) Lambda' / h (times sqrt(D) / slope) for g; this
# allowance is 2^-52 times ROUNDING_UNITS of those.  Below MIN_TOLERANCE the far field is not used.
ROUNDING_UNITS = 1024.0
MIN_TOLERANCE = 1e-10
# Node sums by FFT (kernels that are not products over dimensions) run in extended precision (numpy's
# longdouble: 64-bit significand on x86-64, unit roundoff 2^-64); a transform of P entries has a normwise
# relative error of at most FFT_UNITS unit roundoffs per level, log2(P) levels (an allowance: the classic
# analysis of radix-2 Cooley-Tukey gives about 6 per level); see fft_rounding.
FFT_UNITS = 16.0
FFT_DTYPE = np.longdouble


@functools.lru_cache(maxsize=None)
def fft_unit_roundoff() -> float:
    """The unit roundoff of the FFT as numpy runs it on :data:`FFT_DTYPE` (numpy before 2.0 computes
    longdouble transforms in float64; x86-64's longdouble has 2^-64, elsewhere it may be float64's 2^-53)."""
    return float(np.finfo(np.fft.rfft(np.zeros(4, FFT_DTYPE)).real.dtype).epsneg)


def fft_rounding(grid: Grid, kernel: GaussianMixture) -> float:
    """The rounding of :func:`fft_node_sums` per unit of ``S'`` (kmax units), at every node: with ``A = F W``,
    ``B = F K`` (``P`` entries) computed with normwise relative error ``e = FFT_UNITS u log2 P`` and the
    inverse likewise, ``|U^ - U|_inf <= |U^ - U|_2 <= (3 e + 8 u) |W|_1 |K|_1`` (Young's inequality on each
    term; ``|K|_1``: :meth:`pipeline.scale_mixtures.GaussianMixture.offset_sum_bound`; ``u``: the unit
    roundoff of the transforms, :func:`fft_unit_roundoff`).  The float64 parts (the kernel's values, the result's last rounding)
    are relative roundings of terms at most ``S' kmax``, counted in :data:`ROUNDING_UNITS`."""
    if kernel.separable:
        return 0.0
    unit = fft_unit_roundoff()
    padded = fft_entries(grid.shape)
    levels = FFT_UNITS * unit * math.log2(padded)
    return (3.0 * levels + 8.0 * unit) * kernel.offset_sum_bound(grid.shape, grid.spacing)


def total_error(order: int, spacing: float, dim: int, kernel: GaussianMixture = RBF,
                node_rounding: float = 0.0) -> tuple[float, float]:
    """The whole chain's bound per unit of ``S``, using ``S' <= Lambda^D S``: ``(E_v + Lambda^D (Q_v + r_v),
    E_g + Lambda^D (Q_g + r_g))`` with the rounding allowances ``r`` (:data:`ROUNDING_UNITS`, plus
    ``node_rounding`` per unit of S', kmax units: the FFT's, :func:`fft_rounding`)."""
    e_v, e_g = interpolation_error(order, spacing, dim, kernel)
    q_v, q_g = query_error(order, spacing, dim, kernel)
    lam = lebesgue_constant(order)
    _, lam_prime = derivative_constants(order)
    unit = ROUNDING_UNITS * 2.0 ** -52 + node_rounding
    r_v = unit * lam ** dim
    r_g = unit * math.sqrt(dim) * lam ** (dim - 1) * lam_prime / spacing / kernel.slope
    growth = lam ** dim
    return e_v + growth * (q_v + r_v), e_g + growth * (q_g + r_g)


def spacing_for(order: int, dim: int, error: float, kernel: GaussianMixture = RBF,
                node_rounding: float = 0.0) -> float | None:
    """The largest spacing at which :func:`total_error` stays within ``error`` (None: none from 1e-6 to 4
    lengthscales; :func:`pipeline.proxies.largest_spacing`)."""
    return largest_spacing(lambda h: max(total_error(order, h, dim, kernel, node_rounding)), error)


def node_sums(weights: np.ndarray, grid: Grid, kernel: GaussianMixture) -> np.ndarray:
    """``U`` (flat, float64): the kernel sums of the proxies' weights (flat, :func:`pipeline.proxies.spread`)
    at every node: for rbf one matrix product per dimension, for the other mixtures :func:`fft_node_sums`."""
    if not kernel.separable:
        return fft_node_sums(weights, grid, kernel)
    field = np.asarray(weights, np.float64).reshape(grid.shape)
    for d, n in enumerate(grid.shape):
        offset = np.arange(n, dtype=np.float64) * grid.spacing
        matrix = np.exp(-0.5 * (offset[:, None] - offset[None, :]) ** 2)
        field = np.moveaxis(np.tensordot(matrix, field, axes=([1], [d])), 0, d)
    return (kernel.kmax * field).ravel()


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (lengths numpy's FFT handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    fives = 1
    while fives < best:
        odd = fives
        while odd < best:
            length = odd
            while length < n:
                length *= 2
            best = min(best, length)
            odd *= 3
        fives *= 5
    return best


def fft_shape(shape: tuple) -> tuple:
    """The transforms' shape for a linear convolution over a grid of ``shape`` nodes: at least 2 n - 1
    per dimension (no wrap-around), rounded up to a fast length."""
    return tuple(_fast_length(2 * n - 1) for n in shape)


def fft_entries(shape: tuple) -> float:
    """The number of entries of the transforms over a grid of ``shape`` nodes (:func:`fft_shape`), as a float
    (a grid far too large to transform must not overflow an integer product)."""
    return float(np.prod(fft_shape(shape), dtype=np.float64))


def fft_node_sums(weights: np.ndarray, grid: Grid, kernel: GaussianMixture) -> np.ndarray:
    """``U_m = sum_n W_n k(z_m - z_n)`` at every node by a real FFT convolution (:data:`FFT_DTYPE`): the kernel at
    every offset ``|m_d| < n_d`` (``(m h)^2`` summed over dimensions, in lengthscales), zero elsewhere, so
    the circular convolution over the padded shape is the linear one.  Rounding: :func:`fft_rounding`."""
    shape = grid.shape
    padded = fft_shape(shape)
    r2 = np.zeros(padded)
    gap = np.zeros(padded, bool)
    for d, (n, size) in enumerate(zip(shape, padded)):
        m = np.arange(size, dtype=np.float64)
        m = np.where(m < n, m, m - size)  # offsets 0..n-1, then -(size-1)..-1 (wrapped)
        where = [None] * len(shape)
        where[d] = slice(None)
        r2 += ((m * grid.spacing) ** 2)[tuple(where)]
        gap |= (np.abs(m) >= n)[tuple(where)]
    kernel_grid = kernel.profile(r2).astype(FFT_DTYPE)
    kernel_grid[gap] = 0.0
    del r2, gap
    axes = tuple(range(len(shape)))
    spectrum = np.fft.rfftn(kernel_grid, s=padded, axes=axes)
    del kernel_grid
    spectrum *= np.fft.rfftn(np.asarray(weights, FFT_DTYPE).reshape(shape), s=padded, axes=axes)
    field = np.fft.irfftn(spectrum, s=padded, axes=axes)
    del spectrum
    return (kernel.kmax * field[tuple(slice(0, n) for n in shape)].astype(np.float64)).ravel()


def interpolate(queries: np.ndarray, sums: np.ndarray, grid: Grid, corner=None) -> tuple[np.ndarray, np.ndarray]:
    """``g^`` (r, D) and ``v^`` (r,) at queries (r, D) inside the grid's box, float64, from the node sums
    ``sums``: the whole grid (flat, row-major), or the box of nodes from ``corner`` (D node indices) on that
    :func:`box_range` names, as a D-dimensional array.  Each query's sums run over its own stencil in a fixed
    order: the bits do not depend on which queries are computed together, nor on the box read."""
    q = np.asarray(queries, np.float64)
    r, dim = q.shape
    g, v = np.empty((r, dim)), np.empty(r)
    p = grid.order
    shape = grid.shape
    if corner is None:  # the whole grid, flat
        box, corner = np.asarray(sums).reshape(shape), np.zeros(dim, np.int64)
    else:
        box, corner = np.asarray(sums), np.asarray(corner, np.int64)
    # Windows of p consecutive nodes along the last axis: a stencil is p^(D-1) such runs.
    runs = sliding_window_view(box, p, axis=dim - 1)
    letters = "abc"[:dim]
    step = np.arange(p)
    for start in range(0, r, GATHER_ROWS):
        rows = slice(start, min(start + GATHER_ROWS, r))
        index, t = stencils(q[rows], grid)
        cell = np.stack(np.unravel_index(index, shape), axis=1) - corner
        picks = []
        for d in range(dim - 1):  # (r, p, ..., p) indices of the runs, broadcast
            where = [None] * (dim - 1)
            where[d] = slice(None)
            picks.append(cell[(slice(None), d) + (None,) * (dim - 1)] + step[tuple(where)][None])
        picks.append(cell[(slice(None), dim - 1) + (None,) * (dim - 1)])
        values = runs[tuple(picks)]  # (r, p, ..., p)
        basis = lagrange(p, t)  # (r, D, p)
        slope = lagrange_derivative(p, t)
        # Contract the node axes from the last one in (numpy's own loops, no BLAS: each row's sums run in the
        # same order whatever the rows around it), with the basis or its slope: the partial sums with at most
        # one slope are kept, so the value and the D components cost about 2 r p^D in all.
        partial = {(): values}
        for d in range(dim - 1, -1, -1):
            spec = "r" + letters[:d + 1] + ",r" + letters[d] + "->r" + letters[:d]
            partial = {(kind,) + key: np.einsum(spec, array, (slope if kind else basis)[:, d])
                       for key, array in partial.items() for kind in ((False, True) if True not in key else (False,))}
        v[rows] = partial[(False,) * dim]
        for e in range(dim):
            g[rows, e] = partial[tuple(d == e for d in range(dim))] / grid.step[e]
    return g, v


def box_range(queries: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The box of nodes ``[lower_d, upper_d)`` (per axis) that the stencils of ``queries`` read."""
    dim = len(grid.shape)
    if len(queries) == 0:
        return np.zeros(dim, np.int64), np.zeros(dim, np.int64)
    index, _ = stencils(queries, grid)
    cell = np.stack(np.unravel_index(index, grid.shape), axis=1)
    return cell.min(axis=0).astype(np.int64), cell.max(axis=0).astype(np.int64) + grid.order
