"""The Matern kernels in the far field: a smooth part on the grid plus a short-range part summed over close pairs.

A Matern kernel of smoothness ``nu`` (1/2, 3/2, 5/2; r in lengthscales) is a Gaussian scale mixture,

    f(r) / s2 = E[exp(-tau r^2 / 2)]          tau = nu / t,  t ~ Gamma(shape nu, rate 1),

but ``E[tau^n]`` is infinite for ``n >= nu``: the kernel has finitely many derivatives at r = 0, and the grid's
bound (:mod:`pipeline.grid_sums`) needs every one.  Split the mixture at a precision ``T`` (lengthscales^-2):

    f = f_s + f_n,   f_s(r) = s2 E[exp(-tau r^2 / 2) 1{tau <= T}],   f_n(r) = s2 E[exp(-tau r^2 / 2) 1{tau > T}].

* ``f_s`` is a Gaussian scale mixture whose every moment is finite,
  ``E[tau^n 1{tau <= T}] = nu^n Gamma(nu - n, nu / T) / Gamma(nu)`` (upper incomplete gamma, first argument
  possibly <= 0: :func:`upper_gamma`), so the far field's grid and its rigorous bound apply to it unchanged
  (:class:`TruncatedMatern`, the same interface as :class:`pipeline.scale_mixtures.GaussianMixture`; node sums by
  FFT of ``f_s = f - f_n`` at the grid's offsets).
* ``f_n`` is short-ranged: ``f_n(r) <= mass exp(-T r^2 / 2)`` and, for ``T r^2 >= 2``, ``|f_n'(r)| <= mass T r
  exp(-T r^2 / 2)`` (each term ``tau r exp(-tau r^2 / 2)`` decreases in ``tau`` there), ``mass = P(tau > T)``.
  So the pairs closer than a radius ``R`` (:meth:`TruncatedMatern.near_radius`) are summed exactly with
  ``f_n`` (:func:`near_sums`), and the farther ones' ``f_n`` is left out within its share of the bound.

``f_n`` in closed form: with ``a = nu r^2 / 2``, ``c = nu / T`` and ``F_m(a, c) = int_0^c t^(m-1) exp(-t - a/t) dt``,
``f_n / s2 = F_nu / Gamma(nu)`` and ``d(f_n / s2) / d(r^2) = -(nu / 2) F_(nu-1) / Gamma(nu)``.  With
``b = sqrt(a)``, ``S = sqrt(c)``, ``u = b / S``, ``P = exp(-(a / c + c))`` and ``E_pm = erfcx(u -+ S)``:

    F_(1/2)      = (sqrt(pi) / 2) P (E_- - E_+)
    a F_(-1/2)   = (b sqrt(pi) / 2) P (E_- + E_+)
    F_(m+1)      = m F_m + a F_(m-1) - c^m P          (integration by parts)

(from the antiderivatives of ``exp(-s^2 - b^2/s^2)`` with ``erf(s -+ b/s)``, ``t = s^2``; erfcx keeps every term
finite).  Everything here is numpy and scipy in float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

NU = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}
# sup_r |f'(r)| / f(0) of each Matern kernel: 1 at r = 0 (nu = 1/2); sqrt(3)/e at r = 1/sqrt(3) (3/2);
# (5/3) r (1 + sqrt5 r) exp(-sqrt5 r) at r = (sqrt5 + 5) / 10 (5/2).
_R52 = (math.sqrt(5.0) + 5.0) / 10.0
SLOPE = {0.5: 1.0, 1.5: math.sqrt(3.0) / math.e,
         2.5: (5.0 / 3.0) * _R52 * (1.0 + math.sqrt(5.0) * _R52) * math.exp(-math.sqrt(5.0) * _R52)}
NEAR_SHARE = 0.125  # of the tolerance, left for the close pairs' cut-off at R (the grid gets the rest)


def upper_gamma(s: float, c: float) -> float:
    """``Gamma(s, c) = int_c^inf t^(s-1) exp(-t) dt`` for any real ``s`` and ``c > 0``: scipy's regularised
    function for ``s > 0``, ``E_1(c)`` for ``s = 0``, and below by ``Gamma(s, c) = (c^s exp(-c) - Gamma(s + 1, c))
    / (-s)``: a difference of two positive terms whose first dominates for the ``c = nu / T <= 0.625`` the plan
    uses (within 3e-14 relative of quadrature there; it loses digits only for c of tens)."""
    if s > 0:
        return float(special.gamma(s) * special.gammaincc(s, c))
    steps = math.ceil(-s) if s != math.floor(s) else int(-s)
    start = s + steps  # in (0, 1), or 0
    value = float(special.exp1(c)) if start == 0 else float(special.gamma(start) * special.gammaincc(start, c))
    for k in range(steps):
        t = start - 1 - k
        value = (value - c ** t * math.exp(-c)) / t
    return value


@functools.lru_cache(maxsize=4096)
def truncated_moment(nu: float, threshold: float, n: float) -> float:
    """``E[tau^n 1{tau <= T}] = nu^n Gamma(nu - n, nu / T) / Gamma(nu)`` (the plan asks for the same ones often)."""
    return nu ** n * upper_gamma(nu - n, nu / threshold) / math.gamma(nu)


def matern_profile(nu: float, r2: np.ndarray) -> np.ndarray:
    """``f / s2`` of the Matern kernel of smoothness ``nu`` at squared distances ``r2`` (lengthscales^2)."""
    r = np.sqrt(np.asarray(r2, np.float64))
    if nu == 0.5:
        return np.exp(-r)
    if nu == 1.5:
        a = math.sqrt(3.0) * r
        return (1.0 + a) * np.exp(-a)
    a = math.sqrt(5.0) * r
    return (1.0 + a + a * a / 3.0) * np.exp(-a)


def tail_terms(nu: float, threshold: float, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(f_n / s2, d(f_n / s2) / d(r^2))`` at squared distances ``r2`` (lengthscales^2), float64 (see the module
    docstring).  For ``nu = 1/2`` the derivative is infinite at r = 0; there it is returned as 0 (the gradient
    of a pair at distance 0 is 0, as for the kernel itself)."""
    r2 = np.asarray(r2, np.float64)
    c = nu / threshold
    a = 0.5 * nu * r2
    b = np.sqrt(a)
    root_c = math.sqrt(c)
    u = b / root_c
    p = np.exp(-(a / c + c))
    minus, plus = special.erfcx(u - root_c), special.erfcx(u + root_c)
    half = (math.sqrt(math.pi) / 2.0) * p * (minus - plus)  # F_(1/2)
    a_minus_half = (math.sqrt(math.pi) / 2.0) * b * p * (minus + plus)  # a F_(-1/2)
    if nu == 0.5:
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(a > 0, -0.25 * a_minus_half / np.where(a > 0, a, 1.0), 0.0)
        return half / math.sqrt(math.pi), slope / math.sqrt(math.pi)
    three_halves = 0.5 * half + a_minus_half - root_c * p  # F_(3/2)
    if nu == 1.5:
        gamma = math.sqrt(math.pi) / 2.0
        return three_halves / gamma, -0.75 * half / gamma
    five_halves = 1.5 * three_halves + a * half - c * root_c * p  # F_(5/2)
    gamma = 0.75 * math.sqrt(math.pi)
    return five_halves / gamma, -1.25 * three_halves / gamma


@dataclass(frozen=True)
class TruncatedMatern:
    """The smooth part ``f_s`` of a Matern kernel (precisions ``tau <= threshold``), in the interface of
    :class:`pipeline.scale_mixtures.GaussianMixture`; bounds are in units of the whole kernel's ``kmax = s2`` and
    ``gmax = slope s2 / l_min``."""

    name: str
    kmax: float  # s2, the whole kernel's f(0)
    nu: float
    threshold: float  # T, lengthscales^-2

    separable = False  # not a product over dimensions: node sums by FFT

    def moment(self, n: float) -> float:
        """``E[tau^n 1{tau <= T}]`` (finite for every n)."""
        return truncated_moment(self.nu, self.threshold, n)

    @property
    def slope(self) -> float:
        """The whole kernel's ``sup |f'| / f(0)``: the run's gmax is the Matern kernel's."""
        return SLOPE[self.nu]

    @property
    def mass(self) -> float:
        """``P(tau > T) = f_n(0) / s2``."""
        return float(special.gammainc(self.nu, self.nu / self.threshold))

    def profile(self, r2: np.ndarray) -> np.ndarray:
        """``f_s / s2 = f / s2 - f_n / s2`` at squared distances ``r2`` (lengthscales^2), float64."""
        return matern_profile(self.nu, r2) - tail_terms(self.nu, self.threshold, r2)[0]

    def offset_sum_bound(self, shape: tuple, spacing: float) -> float:
        """An upper bound on ``sum_m f_s(|m| h) / s2`` over the offsets ``|m_d| < shape[d]``: ``0 <= f_s <= f``
        and ``f`` decreases, so each offset counts at most ``f(h max_d |m_d|)``; offsets with ``max_d |m_d| = j``
        number at most ``(2 j + 1)^D - (2 j - 1)^D``."""
        dim = len(shape)
        j = np.arange(max(shape), dtype=np.float64)
        count = (2.0 * j + 1.0) ** dim - np.maximum(2.0 * j - 1.0, 0.0) ** dim
        return float((count * matern_profile(self.nu, (j * spacing) ** 2)).sum())

    def near_radius(self, error: float) -> float:
        """The smallest ``R`` (lengthscales, at least ``sqrt(2 / T)``) beyond which ``f_n``'s pairs, left out,
        change a query's value by at most ``error S kmax`` and its gradient by at most ``error S gmax``:
        ``mass exp(-T R^2 / 2) <= error`` and ``mass T R exp(-T R^2 / 2) / slope <= error`` (both decrease in
        ``R`` there)."""
        t, mass = self.threshold, self.mass

        def excess(radius: float) -> float:
            tail = mass * math.exp(-0.5 * t * radius * radius)
            return max(tail, tail * t * radius / self.slope) - error

        lower = math.sqrt(2.0 / t)
        if excess(lower) <= 0:
            return lower
        upper = 2.0 * lower
        while excess(upper) > 0:
            upper *= 2.0
        for _ in range(60):
            middle = 0.5 * (lower + upper)
            lower, upper = (lower, middle) if excess(middle) <= 0 else (middle, upper)
        return upper


    def cut_off_error(self, radius: float) -> tuple[float, float]:
        """``(value, gradient)``: the bound per unit of S (kmax, gmax units) on leaving out ``f_n`` beyond
        ``radius`` lengthscales (:meth:`near_radius`)."""
        tail = self.mass * math.exp(-0.5 * self.threshold * radius * radius)
        return tail, tail * self.threshold * radius / self.slope


def split_for(name: str, variance: float, threshold: float) -> TruncatedMatern:
    return TruncatedMatern(name, float(variance), NU[name], float(threshold))


NEAR_ROWS = 1 << 12  # queries whose cells are looked up at a time ...
NEAR_CANDIDATES = 1 << 22  # ... and whose candidate pairs are summed at a time (more rows where they have few)
NEAR_TABLE_CELLS = 1 << 22  # up to this many cells in the sources' box: a dense table (64 MiB), else a search


def near_sums(queries: np.ndarray, sources: np.ndarray, weights: np.ndarray | None, kernel: TruncatedMatern,
              lengthscale, radius: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``g`` (r, D), ``v`` (r,) of ``f_n`` over the pairs closer than ``radius`` lengthscales, and the number of
    such pairs (float64).  ``sources`` must hold every source within ``radius`` of the queries (it may hold
    more), in one fixed order of all the sources (a subsequence of it).

    The pairs are found in cells: the sources binned in cubes a little wider than ``radius`` (lengthscales,
    fixed at the origin), each query's candidates are the sources of the 3^D cells around its own, in a fixed
    order of those cells and, within a cell, in the sources' order.  So each query sums its pairs in an order
    that depends on its own position and the sources' order only: the bits do not depend on which other
    queries or sources were passed along."""
    scale = np.asarray(lengthscale, np.float64)
    q = np.asarray(queries, np.float64) / scale
    x = np.asarray(sources, np.float64) / scale
    r, dim = q.shape
    g, v = np.zeros((r, dim)), np.zeros(r)
    if len(x) == 0 or r == 0:
        return g, v, 0
    w = None if weights is None else np.asarray(weights, np.float64)
    width = radius * (1.0 + 1e-9)  # a pair closer than radius is at most one cell apart along each axis
    cells = np.floor(x / width).astype(np.int64)
    low = cells.min(axis=0) - 1
    shape = tuple(int(n) for n in cells.max(axis=0) - low + 2)  # a margin of one cell on each side
    keys = np.ravel_multi_index(tuple((cells - low).T), shape)
    by_cell = np.argsort(keys, kind="stable")  # within a cell: the sources' own order
    keys, first, counts = np.unique(keys[by_cell], return_index=True, return_counts=True)
    x = x[by_cell]  # the sources cell by cell (each query's candidates are a few runs of consecutive rows)
    w = None if w is None else w[by_cell]
    n_cells = math.prod(shape)
    table = None
    if n_cells <= NEAR_TABLE_CELLS:  # few cells: a dense table instead of a search per lookup
        table = np.zeros((n_cells, 2), np.int64)
        table[keys, 0], table[keys, 1] = first, counts
    steps = np.stack(np.meshgrid(*([np.arange(-1, 2)] * dim), indexing="ij"), axis=-1).reshape(-1, dim)
    squared = radius * radius
    pairs = 0
    for start in range(0, r, NEAR_ROWS):
        stop = min(start + NEAR_ROWS, r)
        rows = stop - start
        home = np.floor(q[start:stop] / width).astype(np.int64) - low
        begin = np.zeros((rows, len(steps)), np.int64)
        size = np.zeros((rows, len(steps)), np.int64)
        for k, step in enumerate(steps):
            cell = home + step
            inside = np.all((cell >= 0) & (cell < np.asarray(shape)), axis=1)
            key = np.ravel_multi_index(tuple(np.where(inside[:, None], cell, 0).T), shape)
            if table is not None:
                begin[:, k] = table[key, 0]
                size[:, k] = np.where(inside, table[key, 1], 0)
            else:
                at = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
                begin[:, k] = first[at]
                size[:, k] = np.where(inside & (keys[at] == key), counts[at], 0)
        # Candidates query by query, each query's cells in the order of `steps`: (i, row of the sources by cell),
        # at most about NEAR_CANDIDATES at a time (a query with more, e.g. among many duplicates, goes alone).
        per_row = size.sum(axis=1)
        cuts = np.searchsorted(np.cumsum(per_row), np.arange(1, 1 + per_row.sum() // NEAR_CANDIDATES)
                               * NEAR_CANDIDATES, side="right")
        bounds = np.unique(np.concatenate([[0], cuts, [rows]]))
        for a, b in zip(bounds[:-1], bounds[1:]):
            pairs += _close_pairs(q[start + a:start + b], x, w, begin[a:b], size[a:b], kernel, squared, scale,
                                  g[start + a:start + b], v[start + a:start + b])
    return kernel.kmax * g, kernel.kmax * v, pairs


def _close_pairs(block: np.ndarray, x: np.ndarray, w: np.ndarray | None, begin: np.ndarray, size: np.ndarray,
                 kernel: TruncatedMatern, squared: float, scale: np.ndarray, g: np.ndarray, v: np.ndarray) -> int:
    """Sum ``f_n`` over the candidates of ``block`` (queries in lengthscales; ``begin``, ``size``: the runs of
    rows of ``x`` (the sources by cell, in lengthscales) of each query's cells) closer than ``sqrt(squared)``,
    into ``g`` and ``v`` (per unit of s2); returns the pairs summed."""
    rows, dim = block.shape
    flat_size = size.ravel()
    total = int(flat_size.sum())
    i = np.repeat(np.arange(rows), size.sum(axis=1))
    ends = np.cumsum(flat_size)
    j = np.arange(total) - np.repeat(ends - flat_size - begin.ravel(), flat_size)
    diff = np.empty((total, dim))
    for d in range(dim):  # one column at a time: numpy gathers 1-D arrays fastest
        diff[:, d] = block[:, d][i] - x[:, d][j]
    r2 = np.einsum("kd,kd->k", diff, diff)
    keep = np.flatnonzero(r2 < squared)
    i, j, diff, r2 = i[keep], j[keep], diff[keep], r2[keep]
    value, slope = tail_terms(kernel.nu, kernel.threshold, r2)
    if w is not None:
        value, slope = value * w[j], slope * w[j]
    v[:] = np.bincount(i, value, minlength=rows)
    for d in range(dim):  # grad_q f_n = f_n'(r^2) 2 (q - x) / l^2 (diff is already in lengthscales)
        g[:, d] = np.bincount(i, slope * diff[:, d], minlength=rows) * (2.0 / scale[d])
    return len(i)
