"""The pruned method's computation (``tolerance > 0``, :mod:`pipeline.methods.pruned`): query blocks in the
run's spatial order against the source tiles each block keeps (:mod:`pipeline.pruning` decides which).

Points and sources are put in one spatial order each, once per run (:func:`spatial_order`: Morton order in
lengthscales).  In that order, query block ``b`` is rows ``[b * rows, (b + 1) * rows)`` and source tile
``t`` is rows ``[t * INDEX_TILE, (t + 1) * INDEX_TILE)``, wherever the rows are computed, so a block's bits do not
depend on how blocks are grouped into tasks or spread over workers: the in-process API and ``kgrad run``
give the same bits.  Each block gathers its kept tiles into the fixed-shape calls of the dense path
(:func:`pipeline.blocks.block_sums`, zero-weight tiles as padding) and adds the partial sums in
ascending tile order.

Used by :func:`pipeline.api.kernel_gradients` (all tiles in memory) and by the workers (only the tiles
their blocks need, read from the run's sorted copy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .block_precision import block_setup, needs_x64
from .blocks import block_sums, run_blocks
from .kernels import KernelSpec
from .pruning import (INDEX_TILE, Budget, KernelBounds, Selection, TileIndex, select_sources,
                      select_sources_of_blocks, select_tiles, tile_index)
from .sources import PreparedSources, prepare_sources
from .spatial import in_input_order, spatial_order, tile_rows
from .tiles import TileShape


def block_boxes(queries: np.ndarray, spec: KernelSpec, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (lower, upper), each (B, D) in lengthscales, of consecutive blocks of ``rows`` rows."""
    scaled = np.asarray(queries, np.float64) / np.asarray(spec.lengthscale, np.float64)
    starts = np.arange(0, len(scaled), rows)
    return np.minimum.reduceat(scaled, starts, axis=0), np.maximum.reduceat(scaled, starts, axis=0)


def blocks_to_compute(queries: np.ndarray, spec: KernelSpec, rows: int, index: TileIndex, bounds: KernelBounds,
                      budget: Budget) -> Selection:
    """For consecutive blocks of ``rows`` query rows (spatial order): the tiles each must look at."""
    if len(queries) == 0:
        return Selection([], np.zeros(0), np.zeros(0), np.zeros((0, queries.shape[1])), np.zeros((0, queries.shape[1])))
    lower, upper = block_boxes(queries, spec, rows)
    return select_tiles(lower, upper, index, bounds, budget)


@dataclass(frozen=True)
class SourceTiles:
    """Some (or all) source tiles, prepared as the dense path prepares sources, plus one zero-weight tile.

    ``ids``: the global ids of the tiles held (ascending); tile ``ids[k]`` holds flat source positions
    ``[k * cols, k * cols + counts)``; the positions from ``len(ids) * cols`` on are the zero-weight tile.
    ``scaled`` and ``abs_weight`` (per position, float64) are what the per-source pruning level reads."""

    ids: np.ndarray
    prepared: PreparedSources  # (held + 1 calls, 1 tile, cols, D)
    scaled: np.ndarray  # (positions, D): coordinates in lengthscales
    abs_weight: np.ndarray  # (positions,): |w|, 0 on padding

    @property
    def cols(self) -> int:
        return self.prepared.coords.shape[2]

    @classmethod
    def build(cls, ids: np.ndarray, sources: np.ndarray, weights: np.ndarray | None, spec: KernelSpec,
              dtype: str, cols: int, center: np.ndarray, meta: PreparedSources | None = None) -> "SourceTiles":
        """``sources`` (and ``weights``): the rows of the tiles ``ids``, in order.  ``meta``: the run's
        whole-source facts (count, bounding box, whether float32 terms may cancel) that each block's precision depends on."""
        sources = np.asarray(sources)
        m = len(sources)
        padded = -(-m // cols) * cols + cols  # whole tiles, then the zero-weight tile
        rows = np.empty((padded, sources.shape[1]), sources.dtype)
        rows[:m] = sources
        rows[m:] = sources[0] if m else 0.0  # real coordinates with weight 0: contribute exactly 0
        w = np.zeros(padded)
        w[:m] = 1.0 if weights is None else np.asarray(weights, np.float64)
        prepared = prepare_sources(rows, w, spec, dtype, TileShape(1, cols, 1), center=center)
        if meta is not None:
            prepared = dataclasses.replace(prepared, count=meta.count, lower=meta.lower, upper=meta.upper,
                                           may_cancel=meta.may_cancel)
        scaled = rows.astype(np.float64) / np.asarray(spec.lengthscale, np.float64)
        return cls(np.asarray(ids, np.int64), prepared, scaled, np.abs(w))

    def positions(self, tiles: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Flat positions of the real sources of the tiles ``tiles`` (global ids, all held), tile by tile in the
        order given (ascending for ascending ids)."""
        where = np.searchsorted(self.ids, tiles)
        if len(tiles) and (where.max() >= len(self.ids) or np.any(self.ids[where] != tiles)):
            raise ValueError("a block needs a source tile that was not loaded")
        return tile_rows(tiles, counts, self.cols, slots=where)

    def gather(self, positions: np.ndarray, shape: TileShape) -> PreparedSources:
        """The sources at ``positions`` packed into whole calls of ``shape`` (padded with weight 0)."""
        per_call = shape.cols * shape.tiles_per_call
        calls = -(-len(positions) // per_call)
        padded = np.full(calls * per_call, len(self.ids) * self.cols, np.int64)
        padded[:len(positions)] = positions
        p = self.prepared
        dim = p.coords.shape[-1]

        def pick(a, *tail):
            if a is None:
                return None
            return a.reshape(-1, *tail)[padded].reshape(calls, shape.tiles_per_call, shape.cols, *tail)

        return dataclasses.replace(p, coords=pick(p.coords, dim), weights=pick(p.weights),
                                   coords_lo=pick(p.coords_lo, dim), weights_lo=pick(p.weights_lo))


def call_pieces(positions: np.ndarray, shape: TileShape) -> list[tuple[np.ndarray, TileShape]]:
    """Kept sources cut into calls: whole calls of ``shape`` first, then the rest in calls of 4, 2 and 1
    tiles (each a power of two below ``tiles_per_call``), so that little of the last call is padding.  At
    most ``log2(tiles_per_call) + 1`` compiled shapes per process; the order is fixed (deterministic)."""
    pieces, start, per_tile = [], 0, shape.cols
    full = len(positions) // shape.sources_per_call * shape.sources_per_call
    if full:
        pieces.append((positions[:full], shape))
        start = full
    left = -(-(len(positions) - start) // per_tile)  # tiles still needed
    tiles = shape.tiles_per_call
    while left > 0:
        tiles = max(1, tiles // 2) if tiles > left else tiles
        if tiles <= left or tiles == 1:
            take = min(tiles, left)
            pieces.append((positions[start:start + take * per_tile], TileShape(shape.rows, shape.cols, tiles)))
            start += take * per_tile
            left -= take
    return pieces


SOURCE_GROUP = 32  # query blocks whose single sources are selected at once (select_sources_of_blocks)


def compute_blocks(queries: np.ndarray, selection: Selection, tiles: SourceTiles, counts: np.ndarray,
                   bounds: KernelBounds, budget: Budget, spec: KernelSpec, mode: str, dtype: str, shape: TileShape,
                   threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """g (n, D), v (n,) in ``dtype`` and the pairs computed, for query rows (n, D) in spatial order cut into
    blocks of ``shape.rows`` rows: block ``b`` against the sources of its tiles ``selection.kept[b]`` that
    the rest of its budget cannot skip (:func:`~pipeline.pruning.select_sources_of_blocks`, for
    :data:`SOURCE_GROUP` blocks at a time), packed into whole calls (``counts``: sources per tile, global)."""
    queries = np.asarray(queries)
    n, dim = queries.shape
    g = np.empty((n, dim), dtype=dtype)
    v = np.empty(n, dtype=dtype)
    starts = list(range(0, n, shape.rows))
    setups = [block_setup(queries[s:s + shape.rows], tiles.prepared, spec, mode, dtype) for s in starts]
    computed = np.zeros(len(starts), np.int64)
    value_left = budget.value - selection.spent_value
    slope_left = budget.slope - selection.spent_slope
    x64 = needs_x64(spec, mode, dtype) or any(s.variant.uses_float64 for s in setups)
    for first in range(0, len(starts), SOURCE_GROUP):
        group = np.arange(first, min(first + SOURCE_GROUP, len(starts)))
        kept_tiles = [np.asarray(selection.kept[b], np.int64) for b in group]
        candidates = tiles.positions(np.concatenate(kept_tiles), counts)
        bounds_of = np.concatenate([[0], np.cumsum([int(counts[t].sum()) for t in kept_tiles])])
        keep = select_sources_of_blocks(selection.lower[group], selection.upper[group], tiles.scaled[candidates],
                                        tiles.abs_weight[candidates], bounds_of, bounds, value_left[group],
                                        slope_left[group])
        kept = [candidates[a:z][keep[a:z]] for a, z in zip(bounds_of[:-1], bounds_of[1:])]

        def one_block(k: int, first: int = first, kept: list = kept) -> None:
            b = first + k
            rows = slice(starts[b], min(starts[b] + shape.rows, n))
            computed[b] = (rows.stop - rows.start) * len(kept[k])
            g_sum, v_sum = 0.0, 0.0
            for piece, piece_shape in call_pieces(kept[k], shape):
                sources = tiles.gather(piece, piece_shape)
                g_part, v_part = block_sums(queries[rows], sources, spec, mode, dtype, piece_shape, setups[b])
                g_sum, v_sum = g_sum + g_part, v_sum + v_part
            g[rows], v[rows] = g_sum, v_sum

        run_blocks(one_block, len(group), x64, threads)
    return g, v, int(computed.sum())


ESTIMATE_BLOCKS = 128  # query blocks sampled (evenly) for the plan's estimate of the pairs left
ESTIMATE_FINE_EVERY = 16  # ... and every 16th of them also through the per-source level
ESTIMATE_DENSE_EARLY = 0.8  # those alone leave more than this share of the pairs: dense, no more sampling


@dataclass(frozen=True)
class Layout:
    """A pruned run's spatial order and pruning data, fixed before any block runs."""

    point_order: np.ndarray  # (N,) int64: input row of each position in spatial order
    source_order: np.ndarray | None  # (M,) or None: the points are the sources (same order)
    index: TileIndex  # source tiles in spatial order
    bounds: KernelBounds
    budget: Budget
    weight_sum: float  # S = sum |w|
    tolerance: float
    estimated_pairs: int  # from a sample of blocks (the run records the exact count)
    meta: PreparedSources = dataclasses.field(repr=False, default=None)  # count, box, may_cancel of all sources

    @property
    def error_bounds(self) -> dict:
        return self.bounds.error_bounds(self.tolerance, self.weight_sum)


def make_layout(points: np.ndarray, sources: np.ndarray | None, weights: np.ndarray | None, spec: KernelSpec,
                tolerance: float, bounds: KernelBounds, rows: int, cols: int = INDEX_TILE) -> Layout:
    """Spatial orders, the tile index and an estimate of the pairs a pruned run computes.  ``sources``
    None: the points are the sources."""
    points = np.asarray(points)
    point_order = spatial_order(points, spec.lengthscale, weights if sources is None else None)
    source_order = None if sources is None else spatial_order(sources, spec.lengthscale, weights)
    x = points if sources is None else np.asarray(sources)
    x_order = point_order if source_order is None else source_order
    scale = np.asarray(spec.lengthscale, np.float64)
    w_sorted = None if weights is None else np.asarray(weights, np.float64)[x_order]
    index = tile_index_of(x, x_order, w_sorted, scale, cols)
    weight_sum = float(index.weight.sum())
    budget = Budget.of(bounds, tolerance, weight_sum)
    n = len(points)
    blocks = -(-n // rows)
    sample = np.unique(np.linspace(0, blocks - 1, min(blocks, ESTIMATE_BLOCKS)).astype(np.int64))
    # The blocks that also go through the per-source level come first: if they leave nearly every pair, the
    # run is dense and the rest of the sample is not needed (a run with nothing to prune pays little).
    fine = np.zeros(len(sample), bool)
    fine[::ESTIMATE_FINE_EVERY] = True
    sample = np.concatenate([sample[fine], sample[~fine]])
    tile_pairs, fine_pairs, fine_tile_pairs, sampled_rows = 0, 0, 0, 0
    w_abs = np.ones(len(x)) if w_sorted is None else np.abs(w_sorted)
    n_fine, m = int(fine.sum()), len(x)
    for k, b in enumerate(sample):
        if k == n_fine and fine_pairs > ESTIMATE_DENSE_EARLY * sampled_rows * m:
            break
        q = points[point_order[b * rows:(b + 1) * rows]]
        sampled_rows += len(q)
        chosen = select_tiles(*block_boxes(q, spec, rows), index, bounds, budget)
        tiles = chosen.kept[0]
        candidates = int(index.counts[tiles].sum())
        tile_pairs += len(q) * candidates
        if k >= n_fine:
            continue
        # The per-source level: its share of the tile level's pairs, applied to the whole sample.
        positions = tile_rows(tiles, index.counts, cols)
        keep = select_sources(chosen.lower[0], chosen.upper[0], np.asarray(x[x_order[positions]], np.float64) / scale,
                              w_abs[positions], bounds, budget.value - chosen.spent_value[0],
                              budget.slope - chosen.spent_slope[0])
        fine_pairs += len(q) * len(keep)
        fine_tile_pairs += len(q) * candidates
    share = fine_pairs / fine_tile_pairs if fine_tile_pairs else 1.0
    estimated = int(round(tile_pairs * share / max(sampled_rows, 1) * n))
    signed = bool(weights is not None and len(weights) and np.min(weights) < 0 < np.max(weights))
    meta = PreparedSources(None, None, np.zeros(points.shape[1]), len(x), lower=np.min(x, 0).astype(np.float64),
                           upper=np.max(x, 0).astype(np.float64), may_cancel=signed)
    return Layout(point_order, source_order, index, bounds, budget, weight_sum, tolerance, estimated, meta)


def tile_index_of(sources: np.ndarray, order: np.ndarray, weights_sorted: np.ndarray | None, scale: np.ndarray,
                  cols: int) -> TileIndex:
    """The tile index of sources (M, D) in the given order, built a slab at a time (bounded memory)."""
    slab = cols * 4096
    parts = [tile_index(np.asarray(sources[order[s:s + slab]], np.float64) / scale,
                        None if weights_sorted is None else weights_sorted[s:s + slab], cols)
             for s in range(0, len(order), slab)]
    return TileIndex(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("lower", "upper", "weight", "counts")))


def compute_in_memory(points: np.ndarray, sources: np.ndarray | None, weights: np.ndarray | None,
                      layout: Layout, spec: KernelSpec, mode: str, dtype: str, shape: TileShape,
                      center: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """The whole pruned computation in this process: g (N, D), v (N,) in input order, and pairs computed."""
    x = points if sources is None else sources
    x_order = layout.point_order if layout.source_order is None else layout.source_order
    tiles = SourceTiles.build(np.arange(layout.index.n_tiles), np.asarray(x)[x_order],
                              None if weights is None else np.asarray(weights)[x_order], spec, dtype, INDEX_TILE,
                              center, layout.meta)
    queries = np.asarray(points)[layout.point_order]
    selection = blocks_to_compute(queries, spec, shape.rows, layout.index, layout.bounds, layout.budget)
    g_sorted, v_sorted, pairs = compute_blocks(queries, selection, tiles, layout.index.counts, layout.bounds,
                                               layout.budget, spec, mode, dtype, shape, threads)
    return in_input_order(g_sorted, layout.point_order), in_input_order(v_sorted, layout.point_order), pairs
