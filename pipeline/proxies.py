"""Proxy sources on a regular grid: the far-field method's interpolation, its error bound and its weights.

Every source ``x_i`` (weight ``w_i``) is replaced by the nodes ``z_n`` of a regular grid near it, with
weights ``W_n = sum_i w_i L_n(x_i)``, where ``L_n`` is the tensor-product Lagrange basis of degree
``p - 1`` on the ``p`` grid nodes per dimension around the grid cell holding ``x_i`` (the cell is the
middle interval of those nodes).  Then, for any query ``q``,

    v^(q) = sum_n W_n k(q, z_n) = sum_i w_i (I k(q, .))(x_i)
    g^(q) = sum_n W_n grad_q k(q, z_n) = grad_q v^(q) = sum_i w_i (I grad_q k(q, .))(x_i)

where ``I`` interpolates a function of the source position from its values at the grid nodes.  So the
proxies are just more sources for the tiles that compute every other run, ``g^`` is the exact gradient of
the approximated sum ``v^``, and the error of both is the interpolation error of ``y -> k(q, y)`` and
``y -> grad_q k(q, y)``, bounded below for every ``q`` at once.

Bound (``rbf``, coordinates in lengthscales, spacing ``h``; the derivation is in docs/design.md):

* 1-D, a function ``F`` on a line, the ``p`` nodes ``m h`` (``m = 1 - p/2 .. p/2``) around ``t`` in ``[0, h]``:
  ``|F(t) - I F(t)| <= |omega(t)| max|F^(p)| / p!`` with ``|omega(t)| = prod |t - m h| <= C_p h^p``,
  ``C_p = prod_{j=1}^{p/2} (j - 1/2)^2`` (at the middle of the cell).
* rbf slices: ``d^n/dt^n exp(-t^2/2) = (-1)^n He_n(t) exp(-t^2/2)`` and Cramer's inequality
  ``|He_n(t)| exp(-t^2/4) <= K sqrt(n!)``, ``K = 1.086435``: ``|F^(p)| <= K sqrt(p!)`` for ``k`` (and
  ``s K sqrt(p!)`` for a gradient component along another dimension, ``s = exp(-1/2)`` the largest
  ``|f'|``), ``K sqrt((p+1)!)`` for the component along the interpolated dimension.
* D dimensions: ``I - 1 = sum_d I_1 .. I_{d-1} (I_d - 1)``, so the tensor error is at most
  ``sum_d Lambda^(d-1) e_d`` with the 1-D Lebesgue constant ``Lambda = max_t sum_m |L_m(t)|``.
* Per query: ``|v^ - v| <= S E_v kmax`` and ``|g^ - g| <= S E_g gmax`` (``S = sum |w_i|``,
  ``gmax = s / l_min``), with :func:`interpolation_error` giving ``E_v`` and ``E_g``.

Weights are accumulated in float64 (numpy ``bincount``, sources in the order of their stencils, ties by
coordinates and weight, a fixed number of rows at a time): the same bits wherever they are computed and
whatever the input's row order.  Pure numpy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .scale_mixtures import RBF, GaussianMixture

CRAMER = 1.086435  # |He_n(t)| exp(-t^2/4) <= CRAMER sqrt(n!) for every n and real t (Cramer's inequality)
SLOPE_MAX_RBF = math.exp(-0.5)  # max |f'(r)| of f(r) = exp(-r^2/2), at r = 1
ORDERS = (4, 6, 8, 10, 12, 14, 16)  # nodes per dimension the plan chooses from (even: the cell is central)
GRID_MAX_NODES = 1 << 26  # nodes of the grid's bounding box (float64 accumulator: 512 MiB)
SPREAD_ENTRIES = 1 << 22  # (source, node) terms accumulated per bincount call (bounded temporaries)
SPREAD_PART_SOURCES = 1 << 18  # sources per part of the spreading (a task on a run's workers)
# The stencil's constants (Lebesgue constants of the basis and of its derivative, max |omega'|) are maxima of
# polynomials over the cell, sampled at this many points; the sampled maximum is raised by half the sampling
# step times a bound on the function's slope (the sum of its derivative's absolute coefficients), so the
# constants are upper bounds (:func:`sampled_max`).
LEBESGUE_SAMPLES = 20001


def offsets(order: int) -> np.ndarray:
    """Node offsets (in grid steps) of a cell's stencil: ``1 - p/2 .. p/2``; the cell is ``[0, 1]``."""
    return np.arange(order, dtype=np.float64) - order // 2 + 1


@functools.lru_cache(maxsize=None)
def basis_coefficients(order: int) -> np.ndarray:
    """(order, order) float64: row k holds the coefficients (constant term first) of the stencil's k-th
    Lagrange polynomial ``L_k(t) = prod_{j != k} (t - m_j) / (m_k - m_j)``."""
    m = offsets(order)
    rows = []
    for k in range(order):
        c = np.ones(1)
        for j in range(order):
            if j != k:
                c = np.polynomial.polynomial.polymul(c, [-m[j], 1.0]) / (m[k] - m[j])
        rows.append(c)
    return np.array(rows)


def evaluate(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Polynomials (rows of ``coefficients``, constant term first) at ``t`` (any shape): shape
    ``t.shape + (rows,)``, by Horner's rule elementwise (each value's bits do not depend on the others)."""
    t = np.asarray(t, np.float64)[..., None]
    out = np.broadcast_to(coefficients[:, -1], t.shape[:-1] + (len(coefficients),)).copy()
    for j in range(coefficients.shape[1] - 2, -1, -1):
        out *= t
        out += coefficients[:, j]
    return out


def lagrange(order: int, t: np.ndarray) -> np.ndarray:
    """The ``order`` Lagrange basis polynomials of the stencil at ``t`` (any shape, in grid steps, in
    ``[0, 1]``): shape ``t.shape + (order,)``, float64; they sum to 1."""
    return evaluate(basis_coefficients(order), t)


def node_constant(order: int) -> float:
    """``C_p``: the largest ``|prod_m (t - m)|`` over the cell ``t`` in ``[0, 1]`` (at ``t = 1/2``)."""
    return float(np.prod([(j - 0.5) ** 2 for j in range(1, order // 2 + 1)]))


def sampled_max(polynomials: np.ndarray) -> float:
    """An upper bound on ``max_t sum_k |P_k(t)|`` over the cell ``[0, 1]`` (rows of ``polynomials``: their
    coefficients, constant term first): the maximum over LEBESGUE_SAMPLES points plus half the step times
    ``sum_k sum_j |coefficients of P_k'|``, which bounds the slope of ``sum_k |P_k|`` on ``[0, 1]``."""
    t = np.linspace(0.0, 1.0, LEBESGUE_SAMPLES)
    sampled = float(np.abs(evaluate(polynomials, t)).sum(axis=-1).max())
    slope = sum(float(np.abs(np.polynomial.polynomial.polyder(row)).sum()) for row in polynomials)
    return sampled + 0.5 * slope / (LEBESGUE_SAMPLES - 1)


@functools.lru_cache(maxsize=None)
def lebesgue_constant(order: int) -> float:
    """``Lambda``: an upper bound on ``sum_m |L_m(t)|`` over the cell (:func:`sampled_max`)."""
    return sampled_max(basis_coefficients(order))


def interpolation_error(order: int, spacing: float, dim: int, kernel: GaussianMixture = RBF) -> tuple[float, float]:
    """``(E_v, E_g)``: the interpolation error of ``k`` in units of ``kmax`` and of ``grad_q k`` in units of
    ``gmax``, per unit of ``sum |w|``, for ``order`` nodes per dimension at ``spacing`` lengthscales, in
    ``dim`` dimensions (see the module docstring), for rbf or another Gaussian scale mixture ``kernel``
    (:mod:`pipeline.scale_mixtures`: the bound on a derivative of order n is multiplied by ``E[tau^(n/2)]``)."""
    lam = lebesgue_constant(order)
    base = node_constant(order) * spacing ** order / math.sqrt(math.factorial(order))  # C_p h^p / sqrt(p!)
    value_1d = CRAMER * base * kernel.moment(order / 2)
    derivative = CRAMER * base * kernel.moment((order + 1) / 2)  # one more derivative: one more sqrt(tau)
    along = derivative * math.sqrt(order + 1)  # a gradient component, along its own dimension
    across = SLOPE_MAX_RBF * derivative  # ... along another dimension
    value = value_1d * sum(lam ** k for k in range(dim))
    component = along + across * sum(lam ** k for k in range(1, dim))  # the component's own dimension first
    gradient = math.sqrt(dim) * component / kernel.slope  # |vector| <= sqrt(D) max component, / l_min
    return value, gradient


def largest_spacing(bound, error: float) -> float | None:
    """The largest spacing h (lengthscales, to 0.1%) in [1e-6, 4] with ``bound(h) <= error`` (None: none).
    A bound need not be monotone in h (interpolation grows with h, a rounding allowance as 1/h), so a
    geometric scan from the top finds the largest good spacing first, then bisection refines it against
    the next, failing, one."""
    scan = np.geomspace(4.0, 1e-6, 400)
    first = next((i for i, h in enumerate(scan) if bound(float(h)) <= error), None)
    if first is None:
        return None
    low, high = float(scan[first]), float(scan[max(0, first - 1)])
    if high == low:
        return low
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        if bound(mid) <= error:
            low = mid
        else:
            high = mid
    return low


def spacing_for(order: int, dim: int, error: float) -> float | None:
    """The largest spacing at which :func:`interpolation_error` (the source side alone) stays within
    ``error`` for both ``g`` and ``v``."""
    return largest_spacing(lambda h: max(interpolation_error(order, h, dim)), error)


@dataclass(frozen=True)
class Grid:
    """A regular grid in input units: node ``n`` (a D-tuple of ints) sits at ``origin + n * step``;
    ``shape`` nodes per dimension cover every stencil of the sources it was made for."""

    origin: np.ndarray  # (D,) float64, input units
    step: np.ndarray  # (D,) float64: spacing times the lengthscale of each dimension
    order: int  # nodes per dimension of each source's stencil
    spacing: float  # lengthscales between nodes (every dimension)
    shape: tuple  # nodes per dimension

    @property
    def n_nodes(self) -> int:
        return int(np.prod(np.asarray(self.shape, np.float64)))

    @property
    def stencil_size(self) -> int:
        """Nodes each source or query touches: ``order ** D``."""
        return self.order ** len(self.shape)

    def summary(self) -> dict:
        return {"order": self.order, "spacing_lengthscales": self.spacing, "nodes_per_dim": list(self.shape)}


def make_grid(lower: np.ndarray, upper: np.ndarray, lengthscale, order: int, spacing: float) -> Grid:
    """The grid for sources in the box ``[lower, upper]`` (input units)."""
    lower = np.asarray(lower, np.float64)
    step = spacing * np.broadcast_to(np.asarray(lengthscale, np.float64), lower.shape)
    origin = lower - (order // 2 - 1) * step  # the first stencil's first node is node 0
    cells = np.floor((np.asarray(upper, np.float64) - lower) / step)
    shape = tuple(int(c) + order for c in cells)
    return Grid(origin, step, order, float(spacing), shape)


def _strides(shape) -> np.ndarray:
    strides = np.ones(len(shape), np.int64)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def stencils(points: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """For points (r, D) inside the grid's box: the flat index of each stencil's first node (r,) and the
    position in its cell, in grid steps (r, D), in ``[0, 1]``."""
    shape = np.asarray(grid.shape, np.int64)
    first = grid.origin + (grid.order // 2 - 1) * grid.step  # the lower node of the first cell
    u = (np.asarray(points, np.float64) - first) / grid.step
    cell = np.floor(u)
    np.clip(cell, 0, shape - grid.order, out=cell)  # the top edge stays in the last cell (t = 1)
    return cell.astype(np.int64) @ _strides(grid.shape), u - cell


def stencil_offsets(grid: Grid) -> np.ndarray:
    """Flat offsets of a stencil's p^D nodes from its first node, in row-major order of the D node axes."""
    strides = _strides(grid.shape)
    flat = np.zeros(1, np.int64)
    for d in range(len(grid.shape)):
        flat = (flat[:, None] + (np.arange(grid.order) * strides[d])[None, :]).ravel()
    return flat


def tensor_weights(factors: list) -> np.ndarray:
    """Row-wise outer products of per-dimension factors (each (r, p)): (r, p^D), row-major like
    :func:`stencil_offsets`."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, :, None] * f[:, None, :]).reshape(len(out), -1)
    return out


def spread(sources: np.ndarray, weights: np.ndarray | None, grid: Grid, map_parts=None) -> np.ndarray:
    """The proxies' weights ``W_n = sum_i w_i L_n(x_i)`` on every node of the grid (flat, float64).

    Sources are taken in the order of their stencils' first node (ties by coordinates, then weight: the
    input's row order does not change a bit) and cut into parts of about :data:`SPREAD_PART_SOURCES`
    (:func:`spread_parts`); each part is spread by :func:`spread_part` (``map_parts(function, parts)``: on a
    run's workers, or here when None), its sums starting from zero, and the parts' sums are added in order.
    The cut depends only on the sources and the grid, so the bits do not depend on where the parts are
    computed."""
    x = np.asarray(sources, np.float64)
    total = np.zeros(grid.n_nodes)
    parts = spread_parts(x, weights, grid)
    function = functools.partial(spread_part, grid=grid)
    for first, sums in (map_parts or _map_here)(function, parts):
        total[first:first + len(sums)] += sums
    return total


def _map_here(function, items) -> list:
    return [function(*item) for item in items]


def spread_parts(sources: np.ndarray, weights: np.ndarray | None, grid: Grid) -> list:
    """``[(sources (r, D) float64, weights (r,) float64)]``: the sources in the spreading order (their stencils'
    first node, then coordinates, then weight), cut into parts of whole :func:`spread_part` blocks, about
    :data:`SPREAD_PART_SOURCES` each.  The cut depends only on the sources and the grid."""
    x = np.asarray(sources, np.float64)
    m, dim = x.shape
    w = np.ones(m) if weights is None else np.asarray(weights, np.float64)
    if m == 0:
        return []
    index, _ = stencils(x, grid)
    order = spreading_order(index, x, w)
    rows = _spread_block_rows(grid)
    size = rows * max(1, SPREAD_PART_SOURCES // rows)
    return [(x[order[start:start + size]], w[order[start:start + size]]) for start in range(0, m, size)]


def spreading_order(index: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The permutation that sorts sources by (stencil index, coordinates in order, weight): that of
    ``np.lexsort`` on all ``D + 2`` keys, sorted by the first two keys, then rows tied on both (duplicates, or a
    common first coordinate within a cell) re-sorted by every key.  Rows tied on both keys are adjacent, and
    the full key orders their runs as the first two do, so each run's sorted rows go back into its places
    (about a third of the time of the full sort on 10^6 distinct sources)."""
    order = np.lexsort((x[:, 0], index))
    if len(order) < 2:
        return order
    first, coordinate = index[order], x[order, 0]
    same = (first[1:] == first[:-1]) & (coordinate[1:] == coordinate[:-1])
    if same.any():
        tied = np.zeros(len(order), bool)
        tied[1:] |= same
        tied[:-1] |= same
        where = np.flatnonzero(tied)
        rows = order[where]
        order[where] = rows[np.lexsort((w[rows],) + tuple(x[rows, d] for d in range(x.shape[1] - 1, -1, -1))
                                       + (index[rows],))]
    return order


def _spread_block_rows(grid: Grid) -> int:
    return max(1, SPREAD_ENTRIES // grid.stencil_size)


def spread_part(sources: np.ndarray, weights: np.ndarray, grid: Grid) -> tuple[int, np.ndarray]:
    """One part of :func:`spread` (sources in the spreading order, float64): ``(first, sums)``, the sums of
    its terms on the nodes ``first, first + 1, ...`` (flat) that its stencils reach.  A block of rows at a
    time, each block's terms summed with ``bincount`` over the node range it touches only."""
    dim = sources.shape[1]
    index, t = stencils(sources, grid)
    offsets_flat = stencil_offsets(grid)
    first = int(index[0])  # the smallest (sorted)
    sums = np.zeros(int(index[-1]) - first + int(offsets_flat[-1]) + 1)
    rows = _spread_block_rows(grid)
    for start in range(0, len(sources), rows):
        block = slice(start, start + rows)
        basis = lagrange(grid.order, t[block])  # (r, D, p)
        terms = tensor_weights([basis[:, d] for d in range(dim)]) * weights[block, None]
        low = int(index[start]) - first
        flat = (index[block] - first - low)[:, None] + offsets_flat[None, :]
        part = np.bincount(flat.ravel(), weights=terms.ravel())
        sums[low:low + len(part)] += part
    return first, sums


def proxy_weights(sources: np.ndarray, weights: np.ndarray | None, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The proxy sources of ``sources`` (M, D) with ``weights`` (M,) (None: ones) on ``grid``: the nodes
    with a nonzero weight, ``(positions (K, D) float64, W (K,) float64)``, in the grid's row-major order."""
    total = spread(sources, weights, grid)
    nodes = np.flatnonzero(total)
    multi = np.stack(np.unravel_index(nodes, grid.shape), axis=1).astype(np.float64)
    return grid.origin + multi * grid.step, total[nodes]
