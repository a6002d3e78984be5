"""Error-bounded pruning: which source tiles a block of queries may skip under ``--tolerance EPS``.

The guarantee, per query j (``S = sum_i |w_i|``; ``kmax = max k`` and ``gmax = max |grad_q k|`` over all possible
pairs, i.e. the kernel's own constants from its profile: ``kmax = f(0)``, ``gmax = sup |f'| / l_min``):

    |g^_j - g_j| <= EPS * S * gmax          |v^_j - v_j| <= EPS * S * kmax

For a kernel with a radial profile ``k = f(r)`` (``r`` the distance in lengthscales) that decreases to 0,
a query at distance at least ``d`` from every source of a tile loses, by skipping the tile, at most
``W_t f(d)`` in ``v`` and ``W_t sup_{r >= d} |f'(r)| / l_min`` in ``|g|`` (``W_t = sum |w|`` over the
tile; ``|grad_q k| = |f'(r)| |(q - x) / l^2| / r <= |f'(r)| / l_min``, the smallest lengthscale).  A block
of queries skips the sources farthest from its bounding box first, as long as the sum of those terms stays
within the budget ``EPS * S * kmax`` (and ``EPS * S * sup |f'|`` for the gradient), so every query of the
block keeps the bound: the skipped mass is counted against it, not just cut off at a radius.  The search
has four levels: super-tiles (:data:`SUPER_TILES` tiles), tiles (:data:`INDEX_TILE` consecutive sources in
spatial order), single sources of the tiles left, then, for each sub-block of the block's rows, mini-tiles
of the sources left (:func:`select_mini_tiles`), each level spending a share of the budget.

Tail bounds come from a table of ``f`` and ``|f'|`` at fixed radii (float64, JAX's derivative of the
kernel's own profile, kept in the user's cache: :func:`profile_table`), read at the grid point at or below
``d``: both are non-increasing there, so the table value bounds every ``r >= d``.  Up to the peak of
``|f'|`` (where it is not yet decreasing) nothing is skipped.  Pure numpy after the table is built;
deterministic.

Distances are between bounding boxes in scaled coordinates (each dimension divided by its lengthscale),
so ARD is handled the same way in every dimension.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .kernels import KernelSpec

# Radii of the tail table (lengthscales): 0, then geometric from 1e-12 to 1e12 (ratio ~1.00084 per step, so
# a table read overestimates the tail of rbf at r = 6.4 by about 4%: a little less pruning, never more error).
TABLE_SIZE = 1 << 16
TABLE_MIN, TABLE_MAX = 1e-12, 1e12
_LOG_STEP = float(np.log(TABLE_MAX / TABLE_MIN) / (TABLE_SIZE - 2))  # log(ratio) of consecutive radii
INDEX_TILE = 64  # sources per tile of the index (the selection unit; calls pack single sources)
SUPER_TILES = 32  # tiles per super-tile: the first, coarse level of the search
LEVEL_ONE_SHARE = 0.25  # share of the budget the super-tile level may spend
LEVEL_TWO_SHARE = 0.5  # ... and with the tile level; single sources get the rest
LEVEL_ONE_GROUP = 8  # query blocks whose super-tile distances are computed at once
LEVEL_TWO_ENTRIES = 1 << 16  # (block, tile) entries of the tile level worked on at once
FAR_SHARE = 1.0 / 64  # share of a block's per-source budget its farthest sources may take, counted as one bin
SHRINK = 1.0 - 1e-9  # distances are shrunk by this factor against rounding in the box arithmetic


def prunes(spec: KernelSpec, mode: str = "auto") -> bool:
    """True for kernels whose radial profile decreases to 0 (rbf, the Matern family, rational_quadratic,
    imq); periodic, dot-product and user kernels, and ``mode`` jacfwd/jacrev, run exact."""
    kernel = spec.kernel
    return mode == "auto" and kernel.radial_profile is not None and kernel.stationary and not kernel.user


@dataclass(frozen=True)
class KernelBounds:
    """A kernel's constants and tail tables, in units of its profile ``f(r)`` (r in lengthscales).

    ``kmax = f(0)``; ``gmax = sup |f'(r)| / l_min`` (:attr:`slope_max` is ``sup |f'|``); ``value_tail(d)``
    and ``slope_tail(d)`` bound ``f`` and ``|f'|`` on ``[d, inf)``."""

    kmax: float
    slope_max: float
    min_lengthscale: float
    radii: np.ndarray
    values: np.ndarray  # f(radii): non-increasing
    slopes: np.ndarray  # sup_{r >= radii} |f'(r)|: inf up to the peak of |f'|

    @property
    def gmax(self) -> float:
        return self.slope_max / self.min_lengthscale

    @functools.cached_property
    def free_radius(self) -> float:
        """The smallest table radius from which both tables are 0 (inf if none): a source at least this far
        (after :data:`SHRINK`) costs exactly nothing to skip."""
        nonzero = np.flatnonzero((self.values > 0) | (self.slopes > 0))
        last = int(nonzero[-1]) + 1 if len(nonzero) else 0
        return float(self.radii[last]) if last < len(self.radii) else np.inf

    def bins(self, d) -> np.ndarray:
        """Index of the largest table radius <= d (after :data:`SHRINK`): the radii are 0 then geometric, so
        the index comes from a logarithm, corrected so that ``radii[index] <= d < radii[index + 1]``."""
        d = np.asarray(d, np.float64) * SHRINK
        with np.errstate(divide="ignore", over="ignore"):  # d = 0: log -> -inf, clipped to bin 0
            guess = np.log(d * (1.0 / TABLE_MIN))
        guess *= 1.0 / _LOG_STEP
        np.floor(guess, out=guess)
        guess += 1.0
        np.clip(guess, 0, TABLE_SIZE - 1, out=guess)
        index = guess.astype(np.int64)
        last = TABLE_SIZE - 1
        while True:  # at most a step or two off (rounding of the logarithm): corrected both ways, so the
            high = self.radii[index] > d  # index does not depend on how the logarithm rounds
            low = (index < last) & (self.radii[np.minimum(index + 1, last)] <= d)
            if not (high.any() or low.any()):
                return index
            index = index - high + low

    def _read(self, table: np.ndarray, d) -> np.ndarray:
        return table[self.bins(d)]

    def value_tail(self, d) -> np.ndarray:
        return self._read(self.values, d)

    def slope_tail(self, d) -> np.ndarray:
        return self._read(self.slopes, d)

    def error_bounds(self, tolerance: float, weight_sum: float) -> dict:
        """The guaranteed bounds on |g^ - g| and |v^ - v| per query, in kernel units."""
        return {"gradient": float(tolerance * weight_sum * self.gmax),
                "value": float(tolerance * weight_sum * self.kmax)}


@functools.lru_cache(maxsize=32)
def kernel_bounds(spec: KernelSpec) -> KernelBounds | None:
    """The tail tables of a pruning kernel (None for the others, or if the profile is not decreasing)."""
    if not prunes(spec):
        return None
    radii = np.concatenate([[0.0], np.geomspace(TABLE_MIN, TABLE_MAX, TABLE_SIZE - 1)])
    f, df_dr2 = profile_table(spec, radii)
    slope = np.abs(2.0 * radii * df_dr2)  # |df/dr| = 2 r |f'(r2)|
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(slope))):
        return None
    peak = int(np.argmax(slope))
    if peak <= 1 and spec.name != "matern12":  # |f'| may peak below the table: gmax would be too small
        return None
    # The profile must decrease (and |f'| after its peak), up to float64 rounding of the evaluation; the
    # tables are then made non-increasing exactly (running maximum from the right).
    loose = 1e-9
    if np.any(np.diff(f) > loose * f[:-1]) or np.any(np.diff(slope[peak:]) > loose * slope[peak:-1]):
        return None
    values = np.maximum.accumulate(f[::-1])[::-1]
    slopes = np.maximum.accumulate(slope[::-1])[::-1]
    slopes[: peak + 1] = np.inf  # the true peak lies between grid points peak - 1 and peak + 1
    return KernelBounds(kmax=float(f[0]), slope_max=float(slope[peak]),
                        min_lengthscale=float(min(spec.lengthscale)), radii=radii, values=values, slopes=slopes)


TABLE_FORMAT = 1  # what a cached table holds (f and f'(r^2) at the radii, float64): changed with its meaning


def table_location(spec: KernelSpec, radii: np.ndarray) -> tuple[str, str] | None:
    """Where :func:`profile_table` keeps the table of ``spec`` at ``radii``: (folder, file name), or None
    (``KGRAD_NO_CACHE`` set, or no version metadata or source files to key it by).  The key covers the
    kernel's name and parameters, the source of the modules that define and read the table, the radii, the
    table format, JAX's and jaxlib's versions and ``XLA_FLAGS``."""
    import hashlib
    import os
    import sys
    from importlib.metadata import version
    from pathlib import Path

    from . import kernels, tiles
    from .cache import default_cache_dir

    if os.environ.get("KGRAD_NO_CACHE"):
        return None
    try:
        versions = (version("jax"), version("jaxlib"))
        code = b"".join(Path(module.__file__).read_bytes() for module in (kernels, tiles, sys.modules[__name__]))
    except Exception:  # noqa: BLE001 (no metadata or no source files: no caching)
        return None
    key = hashlib.sha256(repr((TABLE_FORMAT, spec.name, float(spec.variance), spec.params, versions,
                               os.environ.get("XLA_FLAGS"))).encode() + code + radii.tobytes()).hexdigest()
    return os.path.join(default_cache_dir(), "kernel-tables"), f"{key[:40]}.f64"


def profile_table(spec: KernelSpec, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``f(r^2)`` and ``f'(r^2)`` at ``radii`` (float64): JAX's derivative of the kernel's own profile, one
    compile, on the CPU.

    A process that has not imported JAX (a run's client) keeps the table in the user's cache directory
    (:func:`table_location`: private, each file checked by its SHA-256, :func:`pipeline.cache.load_checked`)
    and reads it from there next time, so that it plans without importing JAX (0.3 s; a second with
    ml_dtypes 0.7.0)."""
    import sys

    from .cache import load_checked, store_checked

    where = table_location(spec, radii)
    if where is not None:
        data = load_checked(*where)
        if data is not None and len(data) == 2 * radii.size * 8:
            stored = np.frombuffer(data, np.float64).reshape(2, radii.size)
            return stored[0].copy(), stored[1].copy()
    keep = where is not None and "jax" not in sys.modules  # a process with JAX loaded (the API, a worker) only reads
    import jax
    import jax.numpy as jnp

    from .precision import thread_x64
    from .tiles import split_params

    profile = spec.kernel.radial_profile
    with thread_x64(True), jax.default_device(jax.devices("cpu")[0]):
        dynamic, static = split_params(spec, "float64")
        p = {**dynamic, **dict(static)}
        table = jax.jit(jax.vmap(jax.value_and_grad(lambda r2: profile(r2, p))))  # one compile: f and f'(r2)
        f, df_dr2 = (np.asarray(a, np.float64) for a in table(jnp.asarray(radii ** 2)))
    if keep:
        store_checked(*where, np.stack([f, df_dr2]).tobytes())
    return f, df_dr2


@dataclass(frozen=True)
class TileIndex:
    """Bounding boxes (scaled coordinates, float64) and weight sums ``W = sum |w|`` of the source tiles
    (``cols`` consecutive sources in spatial order) and of super-tiles (:data:`SUPER_TILES` tiles)."""

    lower: np.ndarray  # (T, D)
    upper: np.ndarray  # (T, D)
    weight: np.ndarray  # (T,)
    counts: np.ndarray  # (T,) sources per tile (the last tile may be partial)

    @property
    def n_tiles(self) -> int:
        return len(self.weight)

    @functools.cached_property
    def supers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = np.arange(0, self.n_tiles, SUPER_TILES)
        return (np.minimum.reduceat(self.lower, starts, axis=0), np.maximum.reduceat(self.upper, starts, axis=0),
                np.add.reduceat(self.weight, starts))

    def as_array(self) -> np.ndarray:
        """(T, 2 D + 2) float64, as stored in a run's scratch group."""
        return np.concatenate([self.lower, self.upper, self.weight[:, None], self.counts[:, None]], axis=1)

    @classmethod
    def from_array(cls, table: np.ndarray) -> "TileIndex":
        dim = (table.shape[1] - 2) // 2
        return cls(table[:, :dim], table[:, dim:2 * dim], table[:, 2 * dim], table[:, 2 * dim + 1].astype(np.int64))


def tile_index(sources_scaled: np.ndarray, weights: np.ndarray | None, cols: int) -> TileIndex:
    """The index of sources (M, D) in spatial order, already divided by the lengthscales, cut into tiles of
    ``cols`` rows (``weights`` None: ones)."""
    x = np.asarray(sources_scaled, np.float64)
    m = len(x)
    starts = np.arange(0, m, cols)
    w = np.ones(m) if weights is None else np.abs(np.asarray(weights, np.float64))
    counts = np.diff(np.append(starts, m))
    return TileIndex(np.minimum.reduceat(x, starts, axis=0), np.maximum.reduceat(x, starts, axis=0),
                     np.add.reduceat(w, starts), counts)


def box_distance(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """Smallest Euclidean distance between boxes (broadcasting over leading axes; last axis: D)."""
    gap = np.maximum(lo_b - hi_a, lo_a - hi_b)
    np.maximum(gap, 0.0, out=gap)
    return np.sqrt(np.einsum("...d,...d->...", gap, gap))


def point_box_distance(lower, upper, points: np.ndarray) -> np.ndarray:
    """Distance from each point (K, D) to one box ((D,) bounds) or to its own box ((K, D) bounds): the same
    numbers as :func:`box_distance`, fewer passes."""
    nearest = np.clip(points, lower, upper)
    nearest -= points
    return np.sqrt(np.einsum("kd,kd->k", nearest, nearest))


@dataclass(frozen=True)
class Budget:
    """What a block may skip: ``value`` (in units of f) and ``slope`` (in units of |f'|)."""

    value: float
    slope: float

    @classmethod
    def of(cls, bounds: KernelBounds, tolerance: float, weight_sum: float) -> "Budget":
        return cls(tolerance * weight_sum * bounds.kmax, tolerance * weight_sum * bounds.slope_max)


def _skippable(d: np.ndarray, weight: np.ndarray, bounds: KernelBounds, value_left, slope_left) -> tuple:
    """Along the last axis, farthest first: which entries fit in the budget left (a prefix of that order),
    and the budget each row spends.  Entries of zero weight cost nothing.

    Entries at or beyond :attr:`KernelBounds.free_radius` cost exactly 0 and come first in that order (most
    of a level's entries on data spanning many lengthscales), so only the others are sorted, each row's in
    one padded row: the same cumulative sums, in the same order, as sorting every entry."""
    d = np.asarray(d, np.float64)
    rows_shape = d.shape[:-1]
    d2 = d.reshape(int(np.prod(rows_shape)), d.shape[-1])
    w2 = np.broadcast_to(weight, d.shape).reshape(d2.shape)
    value_left = np.broadcast_to(np.asarray(value_left, np.float64), rows_shape).reshape(-1)
    slope_left = np.broadcast_to(np.asarray(slope_left, np.float64), rows_shape).reshape(-1)
    free_radius = bounds.free_radius  # inf: the tables never reach 0, and no entry is free (not even at inf)
    free = d2 * SHRINK >= free_radius if np.isfinite(free_radius) else np.zeros(d2.shape, bool)
    paid = ~free
    counts = paid.sum(axis=-1)
    width = int(counts.max(initial=0))
    if width * 2 > d2.shape[-1]:  # few free entries (more than half of the widest row is not): sort them all
        skip, spent_v, spent_g = _skippable_sorted(d2, w2, bounds, value_left, slope_left)
    else:
        rows, cols = np.nonzero(paid)  # row by row, columns ascending
        order = np.lexsort((-d2[rows, cols], rows))  # stable: ties keep column order, as the full sort does
        rows, cols = rows[order], cols[order]
        place = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        dp = np.zeros((len(d2), width))
        wp = np.zeros((len(d2), width))
        dp[rows, place] = d2[rows, cols]
        wp[rows, place] = w2[rows, cols]
        # free entries fit when the budget left is not negative (their cost is 0), and come first
        start_ok = (value_left >= 0.0) & (slope_left >= 0.0)
        fits, spent_v, spent_g = _prefix_fits(dp, wp, bounds, value_left, slope_left)
        fits &= start_ok[:, None]
        skip = free & start_ok[:, None]
        skip[rows, cols] = fits[rows, place]
    return skip.reshape(d.shape), spent_v.reshape(rows_shape), spent_g.reshape(rows_shape)


def _skippable_sorted(d: np.ndarray, weight: np.ndarray, bounds: KernelBounds, value_left: np.ndarray,
                      slope_left: np.ndarray) -> tuple:
    """:func:`_skippable` for rows (R, K), every entry sorted."""
    order = np.argsort(-d, axis=-1, kind="stable")
    fits, spent_v, spent_g = _prefix_fits(np.take_along_axis(d, order, axis=-1),
                                          np.take_along_axis(weight, order, axis=-1), bounds, value_left, slope_left)
    skip = np.zeros(d.shape, bool)
    np.put_along_axis(skip, order, fits, axis=-1)
    return skip, spent_v, spent_g


def _prefix_fits(d_sorted: np.ndarray, w_sorted: np.ndarray, bounds: KernelBounds, value_left: np.ndarray,
                 slope_left: np.ndarray) -> tuple:
    """Rows (R, K) farthest first: which entries are in the prefix that fits the budget left (R,), and
    what each row's prefix spends."""
    has = w_sorted > 0
    bins = bounds.bins(d_sorted)  # the tails of both tables are read at the same radius
    with np.errstate(invalid="ignore"):  # 0 * inf where a tile of zero weight is close: costs nothing
        cost_v = np.cumsum(np.where(has, w_sorted * bounds.values[bins], 0.0), axis=-1)
        cost_g = np.cumsum(np.where(has, w_sorted * bounds.slopes[bins], 0.0), axis=-1)
    fits = (cost_v <= value_left[:, None]) & (cost_g <= slope_left[:, None])
    fits = np.cumprod(fits, axis=-1).astype(bool)  # a prefix: stop at the first that does not fit
    spent_v = np.where(fits, cost_v, 0.0).max(axis=-1, initial=0.0)
    spent_g = np.where(fits, cost_g, 0.0).max(axis=-1, initial=0.0)
    return fits, spent_v, spent_g


@dataclass(frozen=True)
class Selection:
    """What the query blocks compute: per block the tile ids it keeps (ascending), and the budget its
    skipped tiles spent (the rest is left for skipping single sources, :func:`select_sources`)."""

    kept: list
    spent_value: np.ndarray  # (B,)
    spent_slope: np.ndarray  # (B,)
    lower: np.ndarray  # (B, D): the blocks' boxes, in lengthscales
    upper: np.ndarray


def select_tiles(block_lower: np.ndarray, block_upper: np.ndarray, index: TileIndex, bounds: KernelBounds,
                 budget: Budget) -> Selection:
    """For each query block (boxes (B, D), scaled), the tiles it must look at.

    Super-tiles far enough away are skipped whole with at most :data:`LEVEL_ONE_SHARE` of the budget, then
    tiles of the remaining super-tiles with up to :data:`LEVEL_TWO_SHARE` of it in all.  Both levels work on
    groups of blocks at once (rows padded with tiles of zero weight at distance 0, which cost nothing and sort
    after every real tile), with the numbers of one block at a time."""
    s_lo, s_hi, s_w = index.supers
    b = len(block_lower)
    skip_super = np.zeros((b, len(s_w)), bool)
    spent_v, spent_g = np.zeros(b), np.zeros(b)
    for g in range(0, b, LEVEL_ONE_GROUP):  # bounded temporaries: LEVEL_ONE_GROUP x super-tiles x D
        rows = slice(g, g + LEVEL_ONE_GROUP)
        d_super = box_distance(block_lower[rows, None, :], block_upper[rows, None, :], s_lo[None], s_hi[None])
        n = len(d_super)
        skip_super[rows], spent_v[rows], spent_g[rows] = _skippable(
            d_super, s_w, bounds, np.full(n, budget.value * LEVEL_ONE_SHARE), np.full(n, budget.slope * LEVEL_ONE_SHARE))
    n_tiles = index.n_tiles
    within = np.arange(SUPER_TILES)
    candidates = []  # per block: the tiles of its kept super-tiles, ascending
    for j in range(b):
        tiles = (np.flatnonzero(~skip_super[j])[:, None] * SUPER_TILES + within[None]).ravel()
        candidates.append(tiles[tiles < n_tiles])
    kept = []
    for group in _groups([len(t) for t in candidates], LEVEL_TWO_ENTRIES):
        width = max(len(candidates[j]) for j in group)
        if width == 0:
            kept.extend(np.zeros(0, np.int64) for _ in group)
            continue
        ids = np.zeros((len(group), width), np.int64)
        real = np.zeros((len(group), width), bool)
        for row, j in enumerate(group):
            ids[row, :len(candidates[j])] = candidates[j]
            real[row, :len(candidates[j])] = True
        rows = np.asarray(group)
        d = box_distance(block_lower[rows, None, :], block_upper[rows, None, :], index.lower[ids], index.upper[ids])
        d[~real] = 0.0
        skip, more_v, more_g = _skippable(d, np.where(real, index.weight[ids], 0.0), bounds,
                                          budget.value * LEVEL_TWO_SHARE - spent_v[rows],
                                          budget.slope * LEVEL_TWO_SHARE - spent_g[rows])
        spent_v[rows] += more_v
        spent_g[rows] += more_g
        keep = real & ~skip
        kept.extend(ids[row][keep[row]] for row in range(len(group)))
    return Selection(kept, spent_v, spent_g, block_lower, block_upper)


def _groups(sizes: list, entries: int) -> list:
    """Consecutive runs of indices into ``sizes`` whose (count x largest size) stays within ``entries`` (at
    least one index each): the groups of blocks whose padded rows are worked on at once."""
    groups, current, widest = [], [], 0
    for j, size in enumerate(sizes):
        if current and (len(current) + 1) * max(widest, size) > entries:
            groups.append(current)
            current, widest = [], 0
        current.append(j)
        widest = max(widest, size)
    if current:
        groups.append(current)
    return groups


def far_bins(bounds: KernelBounds, total: np.ndarray, value_left: np.ndarray, slope_left: np.ndarray) -> np.ndarray:
    """Per block, the first table bin at which sources of total weight ``total`` (all its candidates) would cost
    at most :data:`FAR_SHARE` of the budget left: ``f(radius) <= FAR_SHARE * value_left / total``, and the same
    for the slope.  Counting every farther source at this bin's radius costs at most that share, and the
    rows of bins the per-source level sums over end there (about 7000 bins per block on clustered data
    otherwise: the table's ratio is 1.00084 per bin, and candidates reach tens of lengthscales)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value_cap = FAR_SHARE * np.asarray(value_left, np.float64) / total
        slope_cap = FAR_SHARE * np.asarray(slope_left, np.float64) / total
    return np.maximum(np.searchsorted(-bounds.values, -value_cap), np.searchsorted(-bounds.slopes, -slope_cap))


def select_mini_tiles(sub_lower: np.ndarray, sub_upper: np.ndarray, sub_block: np.ndarray, mini_lower: np.ndarray,
                      mini_upper: np.ndarray, mini_weight: np.ndarray, mini_start: np.ndarray, mini_count: np.ndarray,
                      bounds: KernelBounds, value_left: np.ndarray, slope_left: np.ndarray) -> list:
    """The sub-block level: after a block's single sources are selected, its kept sources are cut into
    *mini-tiles* (a few consecutive kept sources, boxes (T, D) scaled, ``|w|`` sums (T,)) and each of its
    sub-blocks (boxes (S, D) scaled; ``sub_block[s]``: its block) skips the mini-tiles farthest from its own
    box while its budget allows (``value_left``, ``slope_left``: per sub-block), by the rule of the
    per-source level (:func:`skip_farthest`).  Block ``b``'s mini-tiles are ``[mini_start[b], mini_start[b] +
    mini_count[b])``.  Returns, per sub-block, the ids of the mini-tiles it keeps (ascending).  Sub-blocks
    are smaller than their block, so farther from most of its sources: on clustered data this halves the
    pairs."""
    n_sub = len(sub_lower)
    per_row = np.asarray(mini_count, np.int64)[sub_block]
    if n_sub == 0 or per_row.sum() == 0:
        return [np.zeros(0, np.int64) for _ in range(n_sub)]
    row_starts = np.concatenate([[0], np.cumsum(per_row)])
    row = np.repeat(np.arange(n_sub), per_row)
    ids = np.arange(row_starts[-1]) - row_starts[row] + np.asarray(mini_start, np.int64)[sub_block][row]
    gap = np.maximum(mini_lower[ids] - sub_upper[row], sub_lower[row] - mini_upper[ids])
    np.maximum(gap, 0.0, out=gap)
    distance = np.sqrt(np.einsum("kd,kd->k", gap, gap))
    keep = skip_farthest(distance, mini_weight[ids], row_starts, bounds, value_left, slope_left)
    return [ids[a:z][keep[a:z]] for a, z in zip(row_starts[:-1], row_starts[1:])]


def select_sources(block_lower: np.ndarray, block_upper: np.ndarray, points: np.ndarray, weight: np.ndarray,
                   bounds: KernelBounds, value_left: float, slope_left: float) -> np.ndarray:
    """The last level, for one block: of candidate sources (scaled points (K, D), ``|w|`` (K,)), the
    positions it must compute (ascending).  :func:`select_sources_of_blocks` for a single block."""
    points = np.asarray(points, np.float64)
    keep = select_sources_of_blocks(np.asarray(block_lower)[None], np.asarray(block_upper)[None], points,
                                    np.asarray(weight, np.float64), np.array([0, len(points)]), bounds,
                                    np.array([value_left], np.float64), np.array([slope_left], np.float64))
    return np.flatnonzero(keep)


def select_sources_of_blocks(block_lower: np.ndarray, block_upper: np.ndarray, points: np.ndarray,
                             weight: np.ndarray, starts: np.ndarray, bounds: KernelBounds, value_left: np.ndarray,
                             slope_left: np.ndarray) -> np.ndarray:
    """The last level, for blocks ``b`` (boxes (B, D), scaled) at once: block ``b``'s candidate sources are
    rows ``[starts[b], starts[b + 1])`` of ``points`` (scaled (K, D)) and ``weight`` (``|w|``, (K,)), with
    ``value_left[b]`` and ``slope_left[b]`` of its budget left.  Returns (K,) bool: the sources to compute.

    Each block skips its farthest sources while its budget allows, whole table bins at a time: each source's
    cost is read at its bin's lower radius (as :meth:`KernelBounds.value_tail` does), costs are summed per
    (block, bin) with one ``bincount`` and accumulated from the farthest bin in (no sort of the distances).
    Bins too near to be skipped even by a source of the smallest positive weight (``w_min f(r) >`` the budget
    left) are merged into one, which cannot fit either, so each block's row of bins spans only the radii
    where skipping can happen.  The sums of a block are those of the block alone, in the same order, so the
    kept sets do not depend on how blocks are grouped."""
    points = np.asarray(points, np.float64)
    starts = np.asarray(starts, np.int64)
    if len(points) == 0:
        return np.zeros(0, bool)
    counts = np.diff(starts)
    distance = point_box_distance(np.repeat(block_lower, counts, axis=0), np.repeat(block_upper, counts, axis=0),
                                  points)
    return skip_farthest(distance, weight, starts, bounds, value_left, slope_left)


def skip_farthest(distance: np.ndarray, weight: np.ndarray, starts: np.ndarray, bounds: KernelBounds,
                  value_left: np.ndarray, slope_left: np.ndarray) -> np.ndarray:
    """The rule of :func:`select_sources_of_blocks` on distances already known: row ``b`` is entries
    ``[starts[b], starts[b + 1])`` (distance (K,) in lengthscales, ``|w|`` (K,)) with ``value_left[b]`` and
    ``slope_left[b]`` of budget.  Returns (K,) bool: the entries to compute."""
    weight = np.asarray(weight, np.float64)
    value_left = np.asarray(value_left, np.float64)
    slope_left = np.asarray(slope_left, np.float64)
    starts = np.asarray(starts, np.int64)
    n_blocks = len(starts) - 1
    if len(distance) == 0:
        return np.zeros(0, bool)
    counts = np.diff(starts)
    block = np.repeat(np.arange(n_blocks), counts)
    bins = bounds.bins(distance)
    positive = weight > 0
    if not positive.any():
        return positive
    filled = counts > 0
    # Sources so far that all of a block's candidates there would cost at most FAR_SHARE of its budget are
    # counted at that radius (a larger tail: never less safe), so each block's row of bins ends there.
    total = np.zeros(n_blocks)
    total[filled] = np.add.reduceat(weight, starts[:-1][filled])
    bins = np.minimum(bins, far_bins(bounds, total, value_left, slope_left)[block])
    # Bins below ``never`` cannot be skipped: w_min * f(radius) or w_min * |f'| is over the budget left.
    w_min = float(weight[positive].min())
    with np.errstate(invalid="ignore"):
        never = np.maximum(np.searchsorted(-(bounds.values * w_min), -value_left),
                           np.searchsorted(-(bounds.slopes * w_min), -slope_left))
    lowest = np.full(n_blocks, TABLE_SIZE, np.int64)
    highest = np.full(n_blocks, -1, np.int64)
    lowest[filled] = np.minimum.reduceat(bins, starts[:-1][filled])
    highest[filled] = np.maximum.reduceat(bins, starts[:-1][filled])
    base = np.maximum(np.maximum(never - 1, 0), np.minimum(lowest, TABLE_SIZE - 1))  # each block's first bin
    width = int(max(1, (highest - base).max() + 1))
    relative = np.maximum(bins, base[block]) - base[block]
    mass = np.bincount(block * width + relative, weights=weight, minlength=n_blocks * width).reshape(n_blocks, width)
    mass = mass[:, ::-1]  # farthest bin first
    table = np.minimum(base[:, None] + np.arange(width - 1, -1, -1)[None, :], TABLE_SIZE - 1)
    held = mass > 0
    with np.errstate(invalid="ignore"):
        cost_v = np.cumsum(np.where(held, mass * bounds.values[table], 0.0), axis=1)
        cost_g = np.cumsum(np.where(held, mass * bounds.slopes[table], 0.0), axis=1)
    fits = (cost_v <= value_left[:, None]) & (cost_g <= slope_left[:, None])
    skipped = np.where(fits.all(axis=1), width, np.argmin(fits, axis=1))  # a prefix of the farthest bins
    cut = base + width - skipped  # bins >= cut are skipped
    return (bins < cut[block]) & positive
